"""Save and load models: ours (variant in ``config.outlierfree``) and any Hugging Face checkpoint on disk.

Saving is atomic: everything is written into a temporary sibling directory that is renamed over the target, so a
killed process never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import OutlierfreeError
from . import hf_compat
from .build import patch_model


def atomic_dir(target: str | os.PathLike) -> "_AtomicDir":
    """Context manager: yields a temporary directory that replaces ``target`` only if the block succeeds."""
    return _AtomicDir(Path(target))


class _AtomicDir:
    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
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
               device: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by outlierfree (its variant re-applied) or any Hugging Face checkpoint on disk.

    Args:
        path: a model directory, or a ``.gguf`` file that transformers can load (GGUF weights are dequantized).
        model_class: transformers class to instantiate; default: the one in ``config.architectures``.
        dtype: parameter dtype (float32 by default: analysis and simulated quantization want full precision).
    Never touches the network: everything is read from ``path``.
    """
    d, gguf = _resolve(path)
    config = load_config(path)
    cls = model_class or hf_compat.model_class_for(config)
    if model_class is None and gguf is not None and not getattr(config, "architectures", None):
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM  # GGUF files hold language models; their configs name no architecture
    variant = getattr(config, "outlierfree", None)
    kwargs: dict[str, Any] = dict(local_files_only=True, dtype=dtype)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        with _quiet_transformers():  # gate tensors are "unexpected" to the stock class: we load them below
            # the config parsed above is passed on: a GGUF file is not parsed for it a second time
            model, info = cls.from_pretrained(d, config=config, output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", []) if "outlierfree_gate" not in k]
        if missing and variant is not None:
            raise OutlierfreeError(f"checkpoint {str(path)!r} lacks weights {sorted(missing)[:3]}",
                                   "re-save the model with outlierfree; the file is incomplete")
        if variant is not None:
            patch_model(model, variant)
            _load_gates(model, d)
    except OutlierfreeError:
        raise
    except Exception as e:
        raise OutlierfreeError(f"cannot load the model at {str(path)!r}: {_one_line(e)}",
                               "check that the checkpoint is complete and was written by save_pretrained") from e
    model.to(device)
    model.eval()
    return model


def _load_gates(model: nn.Module, d: Path) -> None:
    """Load the gate parameters of a gated checkpoint into a freshly patched ``model``.

    ``save_pretrained`` may rename module paths on the way out (transformers 5 writes ViT in its legacy layout), so
    gates are matched by (layer index, parameter name) rather than by full key.
    """
    from safetensors import safe_open

    from ..sites.core import layer_index

    ours = {(layer_index(n), n.split("outlierfree_gate.", 1)[1]): p
            for n, p in model.named_parameters() if "outlierfree_gate." in n}
    if not ours:
        return
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    found: dict[tuple, torch.Tensor] = {}
    for f in files:
        with safe_open(str(d / f), framework="pt") as sf:
            for k in sf.keys():
                if "outlierfree_gate." in k:
                    found[(layer_index(k), k.split("outlierfree_gate.", 1)[1])] = sf.get_tensor(k)
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
