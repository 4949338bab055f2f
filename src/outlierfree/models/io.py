"""Save and load models: ours (variant in ``config.outlierfree``) and any Hugging Face checkpoint on disk.

Saving is atomic: everything is written into a temporary sibling directory that is renamed over the target, so a
killed process never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..attention.variants import module_names
from ..errors import OutlierfreeError
from ..records import atomic_dir, dumps
from .. import hf_compat
from .build import patch_model


def save_model(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None,
               extra_json: dict[str, Any] | None = None) -> Path:
    """``save_pretrained`` (safetensors) plus the tokenizer, atomically. ``extra_json`` files are written too
    (name -> JSON-serialisable object)."""
    path = Path(path)
    with atomic_dir(path) as tmp, _quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(dumps(obj) + "\n")  # the package's one JSON policy (records)
    return path


def _resolve(path: str | os.PathLike) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model path; raises a one-line error if it is not a model."""
    p = Path(path)
    if not p.exists():
        raise OutlierfreeError(f"model path {str(p)!r} does not exist", "pass a model directory or a .gguf file")
    if p.is_file():
        if p.suffix == ".gguf":
            return p.parent, p.name
        raise OutlierfreeError(f"{str(p)!r} is a file, not a model directory",
                               "pass the directory holding config.json (or a .gguf file)")
    if not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise OutlierfreeError(f"{str(p)!r} has no config.json, so it is not a Hugging Face model directory",
                               "pass a directory written by save_pretrained or `outlierfree train`")
    return p, None


def load_config(path: str | os.PathLike) -> Any:
    """The Hugging Face config of a model directory or GGUF file, with a one-line error if unreadable."""
    from transformers import AutoConfig

    d, gguf = _resolve(path)
    try:
        if gguf is not None:
            return AutoConfig.from_pretrained(d, gguf_file=gguf, local_files_only=True)
        json.loads((d / "config.json").read_text())  # a clear error for corrupt JSON
        return AutoConfig.from_pretrained(d, local_files_only=True)
    except OutlierfreeError:
        raise
    except Exception as e:  # transformers raises many types here; the user needs one line
        raise OutlierfreeError(f"cannot read the config of {str(path)!r}: {_one_line(e)}",
                               "check that it is a complete, supported Hugging Face checkpoint") from e


def load_model(path: str | os.PathLike, model_class: Any = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", *, allow_fallback: bool | None = None) -> nn.Module:
    """Load a model saved by outlierfree (its variant re-applied) or any Hugging Face checkpoint on disk.

    Args:
        path: a model directory, or a ``.gguf`` file that transformers can load (GGUF weights are dequantized).
        model_class: transformers class to instantiate; default: the one in ``config.architectures``.
        dtype: parameter dtype (float32 by default: analysis and simulated quantization want full precision).
        allow_fallback: when the checkpoint holds the base model but not the class's task head (a sentence encoder
            whose config names ``BertForMaskedLM``), load the base model (``BertModel``) instead and print a
            one-line notice to stderr. Default: only when ``model_class`` is not given.
    Never touches the network: everything is read from ``path``. Never returns invented weights: a checkpoint
    directory whose weights do not cover the model (other than a task head it may fall back from) or do not fit
    its shapes raises :class:`OutlierfreeError` naming the tensors.
    """
    d, gguf = _resolve(path)
    config = load_config(path)
    if allow_fallback is None:
        allow_fallback = model_class is None
    cls = model_class or hf_compat.model_class_for(config)
    if model_class is None and gguf is not None and not getattr(config, "architectures", None):
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM  # GGUF files hold language models; their configs name no architecture
    variant = getattr(config, "outlierfree", None)
    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=dtype)
    notice = None
    try:
        with _quiet_transformers():  # gate tensors are "unexpected" to the stock class: we load them below
            if gguf is not None:
                # the config parsed above is passed on: a GGUF file is not parsed for it a second time
                model, info = cls.from_pretrained(d, config=config, output_loading_info=True, gguf_file=gguf,
                                                  **kwargs)
                missing = [k for k in info.get("missing_keys", []) if not _is_extra(k)]
                if missing and variant is not None:
                    raise OutlierfreeError(f"checkpoint {str(path)!r} lacks weights {sorted(missing)[:3]}",
                                           "re-save the model with outlierfree; the file is incomplete")
                q = getattr(model, "hf_quantizer", None)
                if q is not None and all(p.is_floating_point() for p in model.parameters()):
                    # the GGUF blocks were dequantized into ordinary float weights: drop transformers' GGUF
                    # marker, which refuses save_pretrained ("quantized with gguf and not serializable"), so a
                    # fine-tuned GGUF model saves as an ordinary checkpoint directory
                    q.remove_quantization_config(model)
            else:
                model, notice = _load_complete(cls, d, config, kwargs, str(path), allow_fallback)
        recipe = getattr(config, "outlierfree_recipe", None)
        if recipe:  # OSP architecture changes (single-scale norms, embedding projection): re-applied, then loaded
            from .recipe import apply_recipe

            apply_recipe(model, recipe)
        if variant is not None:
            import warnings

            from .build import DeadAttentionWarning

            with warnings.catch_warnings():  # a trained model: its initialisation is history
                warnings.simplefilter("ignore", DeadAttentionWarning)
                patch_model(model, variant, strict=False)  # patched once already (by train or finetune)
        if variant is not None or recipe:
            _load_gates(model, d)
    except OutlierfreeError:
        raise
    except Exception as e:
        raise OutlierfreeError(f"cannot load the model at {str(path)!r}: {_one_line(e)}",
                               "check that the checkpoint is complete and was written by save_pretrained") from e
    model.to(device)
    model.eval()
    if notice is not None:
        print(notice, file=sys.stderr, flush=True)
    return model


def _load_complete(cls: Any, d: Path, config: Any, kwargs: dict[str, Any], path: str,
                   allow_fallback: bool) -> tuple[nn.Module, str | None]:
    """``cls.from_pretrained`` that refuses to invent weights: (model, notice or None).

    Every parameter must come from the checkpoint with the model's shape. If only the task head is missing (all
    missing keys lie outside ``base_model_prefix``) and ``allow_fallback``, the base model is loaded instead
    (itself complete) and the notice says so.
    """
    model, missing = _from_pretrained_checked(cls, d, config, kwargs, path)
    if not missing:
        return model, None
    base = model.base_model
    prefix = getattr(model, "base_model_prefix", "")
    if base is model:  # a base model itself: any missing tensor is part of it
        inside, head = missing, []
    else:
        inside = [k for k in missing if k.startswith(prefix + ".")]
        head = [k for k in missing if not k.startswith(prefix + ".")]
    name = type(model).__name__
    if inside:
        where = f"the base model of {name}" if base is not model else name
        raise OutlierfreeError(f"checkpoint {path!r} lacks {_tensors(len(inside))} of {where} ({_few(inside)}), so "
                               f"{'it' if len(inside) == 1 else 'they'} would be random",
                               "the weight files are incomplete or do not belong to this config.json; re-save the "
                               "model with save_pretrained")
    head_name = _head_name(name)
    base_cls = type(base)
    if not allow_fallback:
        raise OutlierfreeError(f"checkpoint {path!r} has no weights for the {head_name} of {name} ({_few(head)}), "
                               f"so the head would be random",
                               f"load the base model instead: pass model_class={base_cls.__name__} or "
                               f"allow_fallback=True")
    del model, base  # one model in memory at a time
    model, missing = _from_pretrained_checked(base_cls, d, config, kwargs, path)
    if missing:
        raise OutlierfreeError(f"checkpoint {path!r} has no weights for the {head_name} of {name}, and its base "
                               f"model {base_cls.__name__} lacks {_tensors(len(missing))} too ({_few(missing)})",
                               "the weight files are incomplete or do not belong to this config.json; re-save the "
                               "model with save_pretrained")
    part = "decoder" if ("CausalLM" in name or "LMHead" in name) else "encoder"
    notice = (f"notice: {path} has no weights for the {head_name} ({_few(head)}); loaded the {part} as "
              f"{base_cls.__name__}, so metrics compare hidden states")
    return model, notice


def _from_pretrained_checked(cls: Any, d: Path, config: Any, kwargs: dict[str, Any],
                             path: str) -> tuple[nn.Module, list[str]]:
    """(model, missing keys that would be random) for ``cls`` loaded from ``d``; raises on mismatched shapes.

    Not missing: our gate tensors (loaded separately), weights tied to a loaded one (a decoder tied to the word
    embeddings) and non-persistent buffers (position ids). A base model whose only missing tensors are its
    pooler is reloaded without one (``add_pooling_layer=False``) rather than given a random pooler.
    """
    import inspect

    model, info = cls.from_pretrained(d, config=config, output_loading_info=True, ignore_mismatched_sizes=True,
                                      **kwargs)
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        shown = "; ".join(f"{k}: {tuple(a)} in the file, {tuple(b)} in the model" for k, a, b in mismatched[:3])
        more = f"; ... {len(mismatched)} tensors" if len(mismatched) > 3 else ""
        verb = "has another shape" if len(mismatched) == 1 else "have other shapes"
        raise OutlierfreeError(f"checkpoint {path!r} does not fit {type(model).__name__}: "
                               f"{_tensors(len(mismatched))} {verb} ({shown}{more})",
                               "the weight files do not belong to this config.json; re-save the model with "
                               "save_pretrained")
    missing = _missing(model, info)
    if (missing and model.base_model is model and all(k.startswith("pooler.") for k in missing)
            and "add_pooling_layer" in inspect.signature(cls.__init__).parameters):
        del model
        model, info = cls.from_pretrained(d, config=config, output_loading_info=True, ignore_mismatched_sizes=True,
                                          add_pooling_layer=False, **kwargs)
        missing = _missing(model, info)
    return model, missing


def _missing(model: nn.Module, info: dict[str, Any]) -> list[str]:
    """The missing keys of a load that leave real weights random, in the model's state-dict order."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if not isinstance(tied, dict):
        tied = {}
    volatile = {f"{mn}.{bn}" if mn else bn for mn, m in model.named_modules()
                for bn in m._non_persistent_buffers_set}
    missing = {k for k in info.get("missing_keys") or [] if not _is_extra(k) and k not in tied
               and k not in volatile}
    order = {k: i for i, k in enumerate(model.state_dict(keep_vars=True))}
    return sorted(missing, key=lambda k: (order.get(k, len(order)), k))


def _head_name(class_name: str) -> str:
    """How a notice names the task head of a transformers class (``BertForMaskedLM`` -> ``masked-LM head``)."""
    for marker, name in (("ForMaskedLM", "masked-LM head"), ("ForCausalLM", "language-model head"),
                         ("LMHead", "language-model head"), ("Classification", "classification head"),
                         ("ForQuestionAnswering", "question-answering head"),
                         ("ForPreTraining", "pre-training heads")):
        if marker in class_name:
            return name
    return "task head"


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _few(keys: list[str], n: int = 3) -> str:
    """``a, b, c, ... 7 tensors`` (all of them when there are at most ``n``)."""
    if len(keys) <= n:
        return ", ".join(keys)
    return ", ".join(keys[:n]) + f", ... {len(keys)} tensors"


# modules outlierfree adds to a stock model: the variants' (gates, sink logits: attention/variants/) and the recipe's
# embedding projection. They are not in the stock class, so transformers skips them on load and _load_gates reads them
RECIPE_MODULES = ("outlierfree_embed_proj",)


def _extra_markers() -> tuple[str, ...]:
    return tuple(f"{name}." for name in (*module_names(), *RECIPE_MODULES))


def _is_extra(key: str) -> bool:
    return any(m in key for m in _extra_markers())


def _extra_key(key: str, layer_index: Any) -> tuple:
    """(layer index, marker + parameter name): how an added parameter is matched between model and file."""
    marker = next(m for m in _extra_markers() if m in key)
    return layer_index(key), marker + key.split(marker, 1)[1]


def _load_gates(model: nn.Module, d: Path) -> None:
    """Load the parameters outlierfree adds (gates, sink logits, embedding projection) into a patched ``model``.

    ``save_pretrained`` may rename module paths on the way out (transformers 5 writes ViT in its legacy layout), so
    gates are matched by (layer index, parameter name) rather than by full key.
    """
    from safetensors import safe_open

    from ..hf_compat import layer_index

    ours = {_extra_key(n, layer_index): p for n, p in model.named_parameters() if _is_extra(n)}
    if not ours:
        return
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    found: dict[tuple, torch.Tensor] = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as sf:
            for k in sf.keys():
                if _is_extra(k):
                    found[_extra_key(k, layer_index)] = sf.get_tensor(k)
    if set(found) != set(ours):
        raise OutlierfreeError(f"the gate weights in {str(d)!r} do not match the gated config "
                               f"({len(found)} tensors for {len(ours)} parameters)", "re-save the model with outlierfree")
    with torch.no_grad():
        for key, p in ours.items():
            if found[key].shape != p.shape:
                raise OutlierfreeError(f"gate weight {key} has shape {tuple(found[key].shape)}, expected "
                                       f"{tuple(p.shape)}", "re-save the model with outlierfree")
            p.copy_(found[key])


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved beside a model (a directory or GGUF file), or a one-line error if there is none."""
    from transformers import AutoTokenizer

    d, gguf = _resolve(path)
    try:
        if gguf is not None:
            return AutoTokenizer.from_pretrained(d, gguf_file=gguf, local_files_only=True)
        return AutoTokenizer.from_pretrained(d, local_files_only=True)
    except Exception as e:
        raise OutlierfreeError(f"no usable tokenizer in {str(path)!r}: {_one_line(e)}",
                               "save the tokenizer beside the model or pass --tokenizer DIR") from e


class _quiet_transformers:
    """Silence transformers' warnings (unexpected gate keys) while loading; errors still raise."""

    def __enter__(self) -> None:
        from transformers.utils import logging

        self.level = logging.get_verbosity()
        self.bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars clutter our own output

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging

        logging.set_verbosity(self.level)
        if self.bars:
            logging.enable_progress_bar()


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:300]
