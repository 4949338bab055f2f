"""Evaluation batches for analysis: the model's inputs plus what the metrics need to name tokens and find no-op keys.

Text (default): the validation split of the offline corpus (the same hash rule and fraction that training holds
out, :func:`outlierfree.data.split_documents`), tokenised with the model's own tokenizer. Our models (trained by
``outlierfree train``) see sequences packed as in training (``[CLS] s1 [SEP] s2 [SEP] ...`` or ``</s> doc </s> ...``);
other checkpoints see one document per sequence with their tokenizer's own special tokens, right-padded.
Images (ViT): the Fashion-MNIST test images, normalised as in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import OutlierfreeError, require

VAL_FRACTION = 0.02  # training's default --val-fraction: the same documents are held out
# the paper's delimiter tokens are [SEP], [CLS], '.' and ','; other sentence punctuation and newlines behave alike
DELIMITER_TEXTS = {".", ",", ";", ":", "!", "?", "\n", "<0x0A>", "Ċ"}
BACKGROUND_MAX = 10  # an image patch is background when no pixel exceeds this (of 255)


@dataclass
class EvalBatch:
    """One batch: ``inputs`` for the model, plus per-token information (all (B, T) over the model's tokens).

    Attributes:
        inputs: keyword arguments of the model's forward (input_ids/attention_mask or pixel_values).
        mask: boolean (B, T), True for real tokens (False for padding).
        labels: B lists of T token labels (text: the tokenizer's tokens; images: ``[CLS]``, ``p<row>,<col>``).
        keys: boolean (B, T) tensors naming the no-op key sets: ``first`` (position 0), ``delimiter``
            (special tokens and punctuation) and, for images, ``background`` (all-black patches).
    """

    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor
    labels: list[list[str]]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of sequences."""
        return int(self.mask.shape[0])


def from_inputs(inputs: dict[str, torch.Tensor], tokenizer: Any = None) -> EvalBatch:
    """An :class:`EvalBatch` from a plain input dict (``input_ids``/``attention_mask`` or ``pixel_values``)."""
    if "input_ids" in inputs:
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return text_batch(ids, mask, tokenizer, extra={k: v for k, v in inputs.items()
                                                       if k not in ("input_ids", "attention_mask", "labels")})
    require("pixel_values" in inputs, f"cannot analyse a batch with keys {sorted(inputs)}",
            "pass input_ids (and attention_mask) or pixel_values")
    return image_batch(inputs["pixel_values"], None, None)


PACKINGS = ("auto", "packed", "documents")


def check_amounts(batches: int, batch_size: int, seq_len: int | None = None, packing: str | None = None) -> None:
    """One-line errors for amounts of data that cannot work (checked before any model is loaded)."""
    require(batches >= 1, f"--batches must be at least 1, got {batches}", "pass --batches 1 or more")
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}", "pass --batch-size 1 or more")
    require(seq_len is None or seq_len >= 8, f"--seq-len must be at least 8, got {seq_len}", "pass --seq-len 8 or more")
    require(packing is None or packing in PACKINGS, f"unknown --packing {packing!r}", f"use {'|'.join(PACKINGS)}")


# ---- text ------------------------------------------------------------------------------------------------
class TokenLabeler:
    """Token id -> printable label and delimiter flag, cached (a vocabulary can have 262k entries)."""

    def __init__(self, tokenizer: Any = None):
        self.tokenizer = tokenizer
        self.special = set(int(i) for i in getattr(tokenizer, "all_special_ids", None) or [])
        self._cache: dict[int, tuple[str, bool]] = {}

    def __call__(self, tid: int) -> tuple[str, bool]:
        hit = self._cache.get(tid)
        if hit is None:
            hit = self._cache[tid] = self._label(tid)
        return hit

    def _label(self, tid: int) -> tuple[str, bool]:
        if self.tokenizer is None:
            return f"#{tid}", False
        try:
            tok = self.tokenizer.convert_ids_to_tokens(int(tid))
        except Exception:  # ids beyond the vocabulary (a config larger than its tokenizer)
            tok = None
        tok = f"#{tid}" if tok is None else str(tok)
        # strip the word-boundary markers of WordPiece / byte-level BPE / SentencePiece for the delimiter test
        bare = tok.removeprefix("##").lstrip("Ġ▁ ")
        return tok, tid in self.special or bare in DELIMITER_TEXTS or tok in DELIMITER_TEXTS


def text_batch(ids: torch.Tensor, mask: torch.Tensor, tokenizer: Any = None, labeler: TokenLabeler | None = None,
               extra: dict[str, torch.Tensor] | None = None) -> EvalBatch:
    """Batch of token ids (B, T) with mask (B, T); delimiter and first-token key sets from the tokenizer."""
    labeler = labeler or TokenLabeler(tokenizer)
    B, T = ids.shape
    labels, delim = [], torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        row = []
        for t, tid in enumerate(ids[b].tolist()):
            lab, is_delim = labeler(tid)
            row.append(lab)
            delim[b, t] = is_delim and bool(mask[b, t])
        labels.append(row)
    first = torch.zeros(B, T, dtype=torch.bool)
    first[:, 0] = mask[:, 0]
    inputs = {"input_ids": ids, "attention_mask": mask.long(), **(extra or {})}
    return EvalBatch(inputs, mask.bool(), labels, {"first": first, "delimiter": delim})


def is_ours(model: Any) -> bool:
    """Whether ``model`` was built by outlierfree (its variant is recorded in the config)."""
    return getattr(getattr(model, "config", None), "outlierfree", None) is not None


def is_causal(model: Any) -> bool:
    """Whether ``model`` is a decoder-only (causal) language model."""
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM") or \
        getattr(cfg, "model_type", "") in ("opt", "gpt2", "llama", "gemma", "gemma2", "gemma3", "gemma3_text",
                                           "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt_neox", "falcon")


def load_texts(data: str | None, val_fraction: float = VAL_FRACTION) -> tuple[list[str], str]:
    """(validation documents, description). ``data`` None: the offline corpus's validation split; a ``.json`` /
    ``.jsonl`` file: its ``text`` (or ``extract``) fields; anything else: what ``outlierfree.data`` reads
    (a .txt file, folder, glob, saved dataset), of which the same validation split is used."""
    from ..data import load_documents, split_documents

    if data is not None and Path(data).suffix in (".json", ".jsonl") and Path(data).is_file():
        docs = _json_texts(Path(data))
        desc = f"{data} (all {len(docs)} documents)"
        return docs, desc
    docs = load_documents(data)
    _, val = split_documents(docs, val_fraction)
    require(val, f"the validation split of {data or 'the offline corpus'} is empty", "pass more text with --data")
    desc = f"{'offline Wikipedia corpus' if data is None else data}: validation split ({len(val)} of {len(docs)} " \
           f"documents, hash rule of outlierfree.data.split_documents, fraction {val_fraction})"
    return val, desc


def _json_texts(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" \
            else json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutlierfreeError(f"cannot parse {str(path)!r} as JSON ({e})", "pass valid JSON / JSON lines") from e
    if isinstance(rows, dict):
        rows = list(rows.values())
    texts = []
    for r in rows if isinstance(rows, list) else []:
        t = r if isinstance(r, str) else (r.get("text") or r.get("extract")) if isinstance(r, dict) else None
        if isinstance(t, str) and t.strip():
            texts.append(" ".join(t.split()))
    require(texts, f"{str(path)!r} holds no text", 'pass a JSON list of strings or objects with a "text" field')
    return texts


def text_sequences(model: Any, tokenizer: Any, docs: list[str], seq_len: int, n: int, seed: int,
                   packing: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ids (N, T), mask (N, T), how) for up to ``n`` sequences of at most ``seq_len`` tokens.

    ``packing``: ``packed`` (training's packing), ``documents`` (one document per sequence, padded) or ``auto``
    (packed for our models, documents for any other checkpoint)."""
    from ..data import pack_clm, pack_mlm

    check_amounts(1, 1, seq_len, packing)
    if packing == "auto":
        packing = "packed" if is_ours(model) else "documents"
    g = torch.Generator().manual_seed(seed)
    if packing == "packed":
        pack = pack_clm if is_causal(model) else pack_mlm
        arr = torch.from_numpy(pack(docs, tokenizer, seq_len).astype("int64"))  # (N_all, T)
        require(len(arr) > 0, f"the data yields no sequence of {seq_len} tokens", "pass more text or a smaller --seq-len")
        ids = arr[torch.randperm(len(arr), generator=g)[:n]]
        how = f"packed as in training ({pack.__name__}), {seq_len} tokens"
        return ids, torch.ones_like(ids, dtype=torch.bool), how
    order = torch.randperm(len(docs), generator=g).tolist()
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    chosen = []
    for i in order:  # documents that tokenise to special tokens only (control characters, nothing) are skipped
        if len(chosen) == n:
            break
        ids = tokenizer(docs[i], truncation=True, max_length=seq_len)["input_ids"]
        if any(t not in special for t in ids):
            chosen.append(ids)
    require(chosen, "the data yields no tokens with this tokenizer", "pass other text with --data or another --tokenizer")
    T = max(len(c) for c in chosen)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    ids = torch.full((len(chosen), T), pad, dtype=torch.long)  # (N, T) right-padded
    mask = torch.zeros(len(chosen), T, dtype=torch.bool)
    for i, c in enumerate(chosen):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = True
    return ids, mask, f"one document per sequence with the tokenizer's special tokens, at most {seq_len} tokens"


def text_batches(model: Any, tokenizer: Any, data: str | None, batches: int, batch_size: int, seq_len: int,
                 seed: int = 0, packing: str = "auto", val_fraction: float = VAL_FRACTION
                 ) -> tuple[list[EvalBatch], dict[str, Any]]:
    """Evaluation batches of text and a description of them (for the report)."""
    check_amounts(batches, batch_size, seq_len, packing)
    docs, desc = load_texts(data, val_fraction)
    ids, mask, how = text_sequences(model, tokenizer, docs, seq_len, batches * batch_size, seed, packing)
    labeler = TokenLabeler(tokenizer)
    out = []
    for s in range(0, len(ids), batch_size):
        m = mask[s:s + batch_size]
        T = int(m.any(0).nonzero().max()) + 1  # drop columns that are padding in every row
        out.append(text_batch(ids[s:s + batch_size, :T], m[:, :T], tokenizer, labeler))
    return out, {"source": desc, "tokenization": how, "sequences": len(ids), "tokens": int(mask.sum())}


def training_data(model_dir: str | Path) -> tuple[str | None, float]:
    """(data, validation fraction) that ``outlierfree train`` used for the model in ``model_dir`` (from its
    train_config.json), so analysis holds out the same documents; the defaults for any other model."""
    cfg_path = Path(model_dir) / "train_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        cfg = {}  # an unreadable record of training: fall back to the defaults training also uses
    frac = cfg.get("val_fraction")
    return cfg.get("data"), float(frac) if isinstance(frac, (int, float)) and 0 < frac < 1 else VAL_FRACTION


# ---- images ----------------------------------------------------------------------------------------------
def image_batch(pixel_values: torch.Tensor, raw: torch.Tensor | None, patch_size: int | None) -> EvalBatch:
    """Batch of images (B, C, H, W) normalised; ``raw`` uint8 images mark background patches (None: none)."""
    B = pixel_values.shape[0]
    labels, background = [], None
    if raw is not None and patch_size:
        P = patch_size
        patches = F.max_pool2d(raw.float().amax(dim=1, keepdim=True), P)  # (B, 1, H/P, W/P): brightest pixel
        n_rows, n_cols = patches.shape[-2:]
        bg = (patches <= BACKGROUND_MAX).flatten(1)  # (B, N) in ViT's row-major patch order
        background = torch.cat([torch.zeros(B, 1, dtype=torch.bool), bg], dim=1)  # (B, 1 + N): [CLS] first
        names = ["[CLS]"] + [f"p{r},{c}" for r in range(n_rows) for c in range(n_cols)]
        labels = [list(names) for _ in range(B)]
        T = 1 + n_rows * n_cols
    else:
        T = None
    keys: dict[str, torch.Tensor] = {}
    if T is not None:
        first = torch.zeros(B, T, dtype=torch.bool)
        first[:, 0] = True
        keys = {"first": first, "background": background}
        mask = torch.ones(B, T, dtype=torch.bool)
    else:
        mask = torch.ones(B, 1, dtype=torch.bool)  # unknown token count: sites are measured without a mask
    return EvalBatch({"pixel_values": pixel_values}, mask, labels, keys)


def image_batches(model: Any, data: str | None, batches: int, batch_size: int, seed: int = 0
                  ) -> tuple[list[EvalBatch], dict[str, Any]]:
    """Fashion-MNIST test images (or ``data``: a folder of idx files or of class subfolders), resized to the
    model's image size and channels, normalised with the training statistics."""
    from ..data import load_images, normalise

    check_amounts(batches, batch_size)
    cfg = model.config
    size, channels, P = int(cfg.image_size), int(getattr(cfg, "num_channels", 1)), int(cfg.patch_size)
    imgs = load_images(data, size)
    x = imgs.val_x if len(imgs.val_x) else imgs.train_x
    require(len(x) > 0, f"no images in {data or 'Fashion-MNIST'}", "pass a folder with images")
    g = torch.Generator().manual_seed(seed)
    x = x[torch.randperm(len(x), generator=g)[:batches * batch_size]]  # (N, C, H, W) uint8
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    mean, std = imgs.mean, imgs.std
    if x.shape[1] != channels:  # grey -> RGB (or the other way) by repeating / averaging the channels
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).to(torch.uint8)
        mean, std = (mean[0],) * channels, (std[0],) * channels
    out = [image_batch(normalise(x[s:s + batch_size], mean, std), x[s:s + batch_size], P)
           for s in range(0, len(x), batch_size)]
    desc = {"source": f"{imgs.source}: {'test' if len(imgs.val_x) else 'train'} images", "sequences": len(x),
            "tokens": len(x) * out[0].mask.shape[1], "tokenization": f"{size}x{size} px, patches of {P}"}
    return out, desc

