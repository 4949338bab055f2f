"""outlierfree: train transformers that quantize well, and find and measure the outliers of those that do not.

    import outlierfree as of
    model = of.build_model("bert", "tiny", of.AttentionConfig("clipped", alpha=1, alpha_t="row"))  # gamma = -1/T
    of.save_model(model, "out/bert")
    model = of.load_model("out/bert")
"""

from .attention import AttentionConfig, clipped_softmax
from .errors import OutlierfreeError
from .models import build_model, load_model, load_tokenizer, patch_model, save_model

__version__ = "0.1.0"
__all__ = ["AttentionConfig", "clipped_softmax", "build_model", "patch_model", "load_model", "load_tokenizer",
           "save_model", "OutlierfreeError", "__version__"]
