"""Building, patching, saving and loading Hugging Face models with outlierfree attention."""

from .build import attention_config_of, build_model, count_parameters, model_config, parameter_count, patch_model
from .io import load_config, load_model, load_tokenizer, save_model
from .sizes import SIZES

__all__ = ["build_model", "patch_model", "model_config", "load_model", "load_config", "load_tokenizer",
           "save_model", "attention_config_of", "count_parameters", "parameter_count", "SIZES"]
