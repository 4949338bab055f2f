"""outlierfree: train transformers that quantize well, and find and measure the outliers of those that do not.

    import outlierfree as of
    model = of.build_model("bert", "tiny", of.AttentionConfig("clipped", alpha=1, alpha_t="row"))  # gamma = -1/T
    of.save_model(model, "out/bert")
    model = of.load_model("out/bert")

The names below are imported on first use (PEP 562), so ``import outlierfree.deploy`` (running an exported model
with tokenizers + numpy + ONNX Runtime / OpenVINO) works where torch is not installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import OutlierfreeError

__version__ = "0.1.0"
# public name -> the submodule that defines it (imported by __getattr__ when the name is first used)
_LAZY = {"AttentionConfig": "attention", "clipped_softmax": "attention", "build_model": "models",
         "patch_model": "models", "load_model": "models", "load_tokenizer": "models", "save_model": "models"}
__all__ = ["AttentionConfig", "clipped_softmax", "build_model", "patch_model", "load_model", "load_tokenizer",
           "save_model", "OutlierfreeError", "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's submodule on first use (it needs torch; ``outlierfree.deploy`` does not)."""
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names (lazy ones included), for tab completion."""
    return sorted(set(globals()) | set(_LAZY))
