"""Calibration (training split) and evaluation (validation split) batches for a model, via ``outlierfree.data``.

The split, packing and masking are those of training (``outlierfree.data``): a model trained by ``outlierfree train``
is calibrated on its own training split and evaluated on its own validation split (``train_config.json`` beside the
weights names the data, sequence length and validation fraction). Any other checkpoint uses the offline corpus (text)
or Fashion-MNIST (images). MLM masks are drawn from a generator seeded per batch, so float and quantized runs see the
same masked positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import OutlierfreeError, require


def task_of(model: nn.Module) -> str:
    """``mlm``, ``clm``, ``image`` (a classifier) or ``encoder`` (no task head: compare hidden states)."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return "mlm"
    if name.endswith("ForCausalLM"):
        return "clm"
    if name.endswith("ForImageClassification"):
        return "image"
    return "encoder"


def _input_kind(model: nn.Module) -> str:
    return "image" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"


@dataclass
class Batches:
    """Calibration and evaluation batches, and where they came from."""

    calib: list[dict[str, torch.Tensor]]
    eval: list[dict[str, torch.Tensor]]
    task: str
    info: dict[str, Any] = field(default_factory=dict)


def _train_config(model_dir: Path | None) -> dict[str, Any]:
    if model_dir is None:
        return {}
    p = (model_dir if model_dir.is_dir() else model_dir.parent) / "train_config.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _need(n_batches: int, batch_size: int, available: int, what: str, flag: str) -> None:
    need = n_batches * batch_size
    require(available >= need, f"the {what} split has {available} sequences/images but {n_batches} batches of "
            f"{batch_size} need {need}", f"lower {flag} or --batch-size, or pass more data with --data")


def make_batches(model: nn.Module, model_dir: str | Path | None, tokenizer: Any, calib_batches: int,
                 eval_batches: int, batch_size: int = 8, seq_len: int | None = None, seed: int = 0,
                 data: str | None = None) -> Batches:
    """Calibration batches from the training split and evaluation batches from the validation split.

    Raises a one-line error when a split is smaller than asked.
    """
    require(calib_batches >= 0 and eval_batches >= 1, "need at least one evaluation batch",
            "pass --eval-batches >= 1 (and --calib-batches >= 0)")
    require(batch_size >= 1, f"batch size {batch_size} is not positive", "pass --batch-size >= 1")
    task = task_of(model)
    cfg = _train_config(Path(model_dir) if model_dir is not None else None)
    data = data or cfg.get("data")
    g = torch.Generator().manual_seed(seed)
    if _input_kind(model) == "image":
        return _image_batches(model, model_dir, task, cfg, data, calib_batches, eval_batches, batch_size, g)
    require(tokenizer is not None, "this model takes text but no tokenizer was found",
            "save the tokenizer beside the model or pass --tokenizer DIR")
    from ..data.text import load_documents, mask_tokens, pack_clm, pack_mlm, split_documents

    seq_len = int(seq_len or cfg.get("seq_len") or 128)
    limit = _max_len(model)
    if limit is not None and seq_len > limit:
        raise OutlierfreeError(f"--seq-len {seq_len} exceeds the model's {limit} positions", f"pass --seq-len <= {limit}")
    val_fraction = float(cfg.get("val_fraction") or 0.02)
    docs = load_documents(data, cfg.get("text_column", "text"), cfg.get("hf_split", "train"))
    train_docs, val_docs = split_documents(docs, val_fraction)
    pack = pack_clm if task == "clm" else pack_mlm
    perm = torch.randperm(len(train_docs), generator=g).tolist()
    train_docs = [train_docs[i] for i in perm]  # a seeded sample of the training documents

    def rows(split_docs: list[str], n: int) -> torch.Tensor:
        # tokenise only as many documents as needed (the corpus is large for a CPU)
        out, i, chunk = [], 0, 64
        have = 0
        while have < n and i < len(split_docs):
            arr = torch.from_numpy(pack(split_docs[i:i + chunk], tokenizer, seq_len).astype("int64"))
            out.append(arr)
            have += len(arr)
            i += chunk
            chunk *= 2
        return torch.cat(out) if out else torch.zeros(0, seq_len, dtype=torch.long)

    train = rows(train_docs, calib_batches * batch_size)
    val = rows(val_docs, eval_batches * batch_size)
    _need(calib_batches, batch_size, len(train), "training", "--calib-batches")
    _need(eval_batches, batch_size, len(val), "validation", "--eval-batches")
    special = sorted(set(int(i) for i in tokenizer.all_special_ids))
    mlm_p = float(cfg.get("mlm_probability") or 0.15)

    def batch(ids: torch.Tensor, index: int, split: str) -> dict[str, torch.Tensor]:
        b: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "mlm":
            gm = torch.Generator().manual_seed(seed * 1_000_003 + index * 2 + (split == "val"))
            b["input_ids"], b["labels"] = mask_tokens(ids, special, tokenizer.mask_token_id, len(tokenizer), gm, mlm_p)
        return b

    calib = [batch(train[i * batch_size:(i + 1) * batch_size], i, "train") for i in range(calib_batches)]
    ev = [batch(val[i * batch_size:(i + 1) * batch_size], i, "val") for i in range(eval_batches)]
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    top = max(int(torch.cat([train, val]).max()), 0) if len(train) + len(val) else 0
    require(vocab is None or top < vocab, f"the tokenizer produces token id {top} but the model's embedding table "
            f"has {vocab} rows", "pass the tokenizer the model was trained with (--tokenizer DIR)")
    info = {"data": data or "wiki (offline corpus)", "seq_len": seq_len, "val_fraction": val_fraction,
            "batch_size": batch_size, "calib_split": "train", "eval_split": "validation",
            "mlm_probability": mlm_p if task == "mlm" else None, "seed": seed}
    return Batches(calib, ev, task, info)


def _max_len(model: nn.Module) -> int | None:
    from ..models.hf_compat import max_length

    return max_length(getattr(model, "config", None))


def _image_batches(model: nn.Module, model_dir: str | Path | None, task: str, cfg: dict[str, Any],
                   data: str | None, calib_batches: int, eval_batches: int, batch_size: int,
                   g: torch.Generator) -> Batches:
    from ..data.images import load_images, normalise

    c = model.config
    images = load_images(data, int(c.image_size), float(cfg.get("val_fraction") or 0.1), int(c.num_channels))
    mean, std = images.mean, images.std
    if model_dir is not None:
        p = Path(model_dir)
        norm = (p if p.is_dir() else p.parent) / "image_normalisation.json"
        if norm.is_file():
            d = json.loads(norm.read_text())
            mean, std = tuple(d["mean"]), tuple(d["std"])
    require(images.channels == int(c.num_channels) and images.image_size == int(c.image_size),
            f"the images are {images.channels}x{images.image_size}px but the model takes "
            f"{c.num_channels}x{c.image_size}px", "pass --data with images that match the model")
    _need(calib_batches, batch_size, len(images.train_y), "training", "--calib-batches")
    _need(eval_batches, batch_size, len(images.val_y), "validation", "--eval-batches")
    perm = torch.randperm(len(images.train_y), generator=g)[: calib_batches * batch_size]

    def batch(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": normalise(x, mean, std), "labels": y}

    calib = [batch(images.train_x[perm[i * batch_size:(i + 1) * batch_size]],
                   images.train_y[perm[i * batch_size:(i + 1) * batch_size]]) for i in range(calib_batches)]
    ev = [batch(images.val_x[i * batch_size:(i + 1) * batch_size], images.val_y[i * batch_size:(i + 1) * batch_size])
          for i in range(eval_batches)]
    info = {"data": images.source, "batch_size": batch_size, "calib_split": "train", "eval_split": "validation",
            "normalisation": {"mean": list(mean), "std": list(std)}}
    return Batches(calib, ev, task, info)
