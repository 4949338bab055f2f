"""The one evaluation-data layer: the calibration and evaluation batches every command feeds a model (``analyze``,
``quantize``, ``export``, ``doctor``, ``reproduce``), from one reading of the model's training record.

    from outlierfree.data.evaluation import model_batches
    b = model_batches(model, "runs/bert/model", tokenizer, calib_batches=16, eval_batches=4)
    b.calib, b.eval   # lists of input dicts (input_ids/attention_mask[/labels] or pixel_values/labels)

Which text a model is fed:

* **A model trained here, on its own data** (``train_config.json`` beside it, and no ``--data`` or ``--data``
  naming the data it trained on): its own validation split, with training's hash rule and fraction
  (:func:`outlierfree.data.split_documents`); ``quantize`` calibrates on its training split. Exactly the
  sequences of the builders this module replaced (tests/data/fixtures/golden.json holds their output).
* **Any other text** (``--data`` for a checkpoint not trained here, or a text the model never trained on): the
  whole text, cut into sequences of ``seq_len`` tokens with the model's tokenizer (:func:`chunk_text`: documents
  are joined by the tokenizer's separator, long ones are cut, nothing is dropped; the last sequence may be
  shorter and is padded). Sequences are taken in file order: **calibration takes the first C sequences and
  evaluation the ones after them**, so the two never overlap; evaluation takes every remaining sequence unless a
  number of evaluation batches is asked for, and ``max_sequences`` bounds how many are read at all.
* **No ``--data`` for a checkpoint not trained here**: the validation split of the offline corpus (as before).

Images: the record's data (default Fashion-MNIST), normalised with the record's ``image_normalisation.json``
when there is one, else the images' own statistics: the same pixels in every command.

``purpose`` selects how a validation split is sampled, which the two kinds of command have always done
differently and whose numbers must not move: ``quantize`` (also export/doctor/reproduce) takes the split's
sequences in order and masks MLM inputs; ``analyze`` draws a seeded sample of the split, unmasked (analysis
measures the model on real tokens), and gets the raw images for its background keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OutlierfreeError, require
from . import defaults
from .training_record import TrainingRecord, read_training_record

PURPOSES = ("quantize", "analyze")
PACKINGS = ("auto", "packed", "documents")
# a long document is tokenised in pieces of about this many characters: bounded memory, and reading stops early
# once enough sequences are made (a 5 MB one-paragraph book with --max-sequences 100 tokenises ~100 sequences)
PIECE_CHARS = 20_000
PIECES_PER_CALL = 64  # pieces per batched tokenizer call


# ---- what kind of model ------------------------------------------------------------------------------------
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


def takes_images(model: Any) -> bool:
    """Whether ``model`` takes pixel values (ViT and other vision transformers)."""
    return getattr(model, "main_input_name", "") == "pixel_values" or \
        getattr(getattr(model, "config", None), "model_type", "") == "vit"


def is_ours(model: Any) -> bool:
    """Whether ``model`` was built by outlierfree (its variant is recorded in the config)."""
    return getattr(getattr(model, "config", None), "outlierfree", None) is not None


def is_causal(model: Any) -> bool:
    """Whether ``model`` is a decoder-only (causal) language model."""
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_decoder", False)) or type(model).__name__.endswith("ForCausalLM") or \
        getattr(cfg, "model_type", "") in ("opt", "gpt2", "llama", "gemma", "gemma2", "gemma3", "gemma3_text",
                                           "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt_neox", "falcon")


def check_seq_len(model: Any, seq_len: int) -> None:
    """One-line error when ``seq_len`` exceeds the model's position embeddings (the forward would fail)."""
    from ..hf_compat import max_length

    limit = max_length(getattr(model, "config", None))
    if limit is not None and seq_len > limit:
        raise OutlierfreeError(f"--seq-len {seq_len} exceeds the model's {limit} positions",
                               f"pass --seq-len <= {limit}")


# ---- batches -----------------------------------------------------------------------------------------------
@dataclass
class Batches:
    """Calibration and evaluation batches (input dicts), the task, and where they came from.

    ``info`` describes the data for the command's report (quantize's keys, or analyze's ``source`` /
    ``tokenization`` / ``sequences`` / ``tokens``); ``pixels`` holds the uint8 images of each evaluation batch
    (images, ``analyze`` only: its background keys are all-black patches)."""

    calib: list[dict[str, torch.Tensor]]
    eval: list[dict[str, torch.Tensor]]
    task: str
    info: dict[str, Any] = field(default_factory=dict)
    pixels: list[torch.Tensor] = field(default_factory=list)


def model_batches(model: nn.Module, model_path: str | Path | None, tokenizer: Any, calib_batches: int = 0,
                  eval_batches: int | None = None, batch_size: int = defaults.BATCH_SIZE, seq_len: int | None = None,
                  seed: int = defaults.SEED, data: str | None = None, *, max_sequences: int | None = None,
                  purpose: str = "quantize", packing: str = "auto", eval_seed: int | None = None,
                  mask_draws: int = 1) -> Batches:
    """Calibration and evaluation batches for ``model`` (see the module docstring for which data).

    Args:
        model_path: where the model was loaded from (its train_config.json / image_normalisation.json are read).
        calib_batches: calibration batches (0 for analysis).
        eval_batches: evaluation batches; None: the command's default on a validation split
            (quantize 4, analyze 8), every remaining sequence of a whole text.
        seq_len: tokens per sequence; None: training's, else 128.
        data: ``--data``; None: the model's training data, else the offline corpus / Fashion-MNIST.
        max_sequences: read at most this many sequences of a whole text (calibration and evaluation together);
            an error for a model evaluated on its own validation split, which ``eval_batches`` sizes.
        purpose: ``quantize`` or ``analyze`` (how a validation split is sampled; see the module docstring).
        packing: analysis of a validation split: ``packed`` (training's packing), ``documents`` (one document per
            sequence) or ``auto`` (packed for our models).
        eval_seed: the seed of the evaluation batches' MLM masks (None: ``seed``), so a caller can vary the
            calibration side only (``finetune --seed``); the evaluation sequences themselves never depend on it.
        mask_draws: masked LMs: score the evaluation sequences under this many draws of masks (draw d masks as
            ``eval_seed + d`` would; draw 0 is the single draw's batches), one after the other in ``eval``, so a
            perplexity pools ``mask_draws`` times as many scored tokens. One draw of 176 sequences of bert/mini
            moves W8A8 minus float by about +-0.5 perplexity; other tasks ignore it.

    Raises a one-line :class:`OutlierfreeError` for bad amounts, too little data, a too long ``seq_len``.
    """
    require(purpose in PURPOSES, f"unknown purpose {purpose!r}", f"use {' or '.join(PURPOSES)}")
    require(calib_batches >= 0 and (eval_batches is None or eval_batches >= 1), "need at least one evaluation batch",
            "pass --eval-batches >= 1 (and --calib-batches >= 0)")
    require(batch_size >= 1, f"batch size {batch_size} is not positive", "pass --batch-size >= 1")
    require(max_sequences is None or max_sequences >= 1, f"--max-sequences must be at least 1, got {max_sequences}",
            "pass --max-sequences 1 or more")
    require(packing in PACKINGS, f"unknown --packing {packing!r}", f"use {'|'.join(PACKINGS)}")
    require(mask_draws >= 1, f"--mask-draws must be at least 1, got {mask_draws}", "pass --mask-draws 1 or more")
    record = read_training_record(model_path)
    task = task_of(model)
    if takes_images(model):
        require(max_sequences is None, "--max-sequences applies to text", "drop it (size images with the batches)")
        return _image_batches(model, record, data, calib_batches, eval_batches, batch_size, seed, purpose, task)
    require(tokenizer is not None, "this model takes text but no tokenizer was found",
            "save the tokenizer beside the model or pass --tokenizer DIR")
    seq_len = int(seq_len or (record.seq_len if record else None) or defaults.SEQ_LEN)
    require(seq_len >= 8, f"--seq-len must be at least 8, got {seq_len}", "pass --seq-len 8 or more")
    check_seq_len(model, seq_len)
    source = text_source(record, data)
    if source.whole:
        mlm_p = record.mlm_probability if record is not None else defaults.MLM_PROBABILITY
        out = _whole_text(tokenizer, source, task, calib_batches, eval_batches, batch_size, seq_len, seed,
                          max_sequences, purpose, mlm_p, eval_seed)
    else:
        require(max_sequences is None, f"--max-sequences applies to a whole text, but this model is evaluated on "
                f"the validation split of {source.data or 'the offline corpus'}",
                "size it with --batches / --eval-batches, or pass the text with --data")
        if purpose == "analyze":
            out = _analysis_split(model, tokenizer, source, task, eval_batches, batch_size, seq_len, seed, packing)
        else:
            out = _quant_split(tokenizer, source, task, calib_batches, eval_batches, batch_size, seq_len, seed, record,
                               eval_seed)
    if mask_draws > 1 and task == "mlm" and purpose == "quantize":
        base = eval_seed if eval_seed is not None else seed
        out.eval = remasked(out.eval, tokenizer, out.info["mlm_probability"], [base + d for d in range(mask_draws)])
        out.info["mask_draws"] = mask_draws
    _check_vocabulary(model, out)
    return out


def remasked(batches: list[dict[str, torch.Tensor]], tokenizer: Any, probability: float,
             eval_seeds: Sequence[int]) -> list[dict[str, torch.Tensor]]:
    """Masked-LM evaluation batches again under other draws of masks: for each seed of ``eval_seeds`` in turn, every
    batch masked as :func:`model_batches` masks it with that ``eval_seed`` (the same sequences, other positions).

    The unmasked tokens are read back from each batch (a masked position's label is its original token; special
    tokens, padding included, are never masked)."""
    out = []
    for s in eval_seeds:
        masker = _mlm_masker(tokenizer, "mlm", s, probability, s)
        for i, b in enumerate(batches):
            ids = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])  # (B, T) the unmasked sequences
            out.append(masker({k: v for k, v in b.items() if k != "labels"} | {"input_ids": ids}, i, True))
    return out


def _check_vocabulary(model: nn.Module, batches: Batches) -> None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    ids = [b["input_ids"] for b in batches.calib + batches.eval if b["input_ids"].numel()]
    top = max(int(t.max()) for t in ids) if ids else 0
    require(vocab is None or top < vocab, f"the tokenizer produces token id {top} but the model's embedding table "
            f"has {vocab} rows", "pass the tokenizer the model was trained with (--tokenizer DIR)")


# ---- which text --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextSource:
    """Which text a model reads: ``data`` (None: the offline corpus), whole or its validation split."""

    data: str | None
    whole: bool
    val_fraction: float = defaults.VAL_FRACTION_TEXT
    text_column: str = defaults.TEXT_COLUMN
    hf_split: str = defaults.HF_SPLIT


def same_data(a: str | None, b: str | None) -> bool:
    """Whether two ``--data`` values name the same source (equal strings, or paths to the same file/folder)."""
    if a is None or b is None or a == b:
        return a == b
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def text_source(record: TrainingRecord | None, data: str | None) -> TextSource:
    """The text for a model with training ``record`` and ``--data`` ``data`` (see the module docstring)."""
    if record is not None and record.trained_here and (data is None or same_data(data, record.data)):
        return TextSource(record.data, False, record.val_fraction(), record.text_column, record.hf_split)
    if data is None:
        return TextSource(None, False)
    return TextSource(data, True)


def read_documents(data: str | None, text_column: str = defaults.TEXT_COLUMN,
                   hf_split: str = defaults.HF_SPLIT) -> list[str]:
    """Documents of a ``--data`` source: a ``.json`` / ``.jsonl`` file's ``text`` (or ``extract``) fields, else
    what :func:`outlierfree.data.load_documents` reads (.txt file, folder, glob, saved or Hugging Face dataset)."""
    from .text import load_documents

    if data is not None and Path(data).suffix in (".json", ".jsonl") and Path(data).is_file():
        return _json_texts(Path(data))
    return load_documents(data, text_column, hf_split)


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


# ---- a whole text ------------------------------------------------------------------------------------------
def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prefix, suffix): the special tokens the tokenizer puts around one sequence (``[CLS]`` / ``[SEP]`` for
    BERT, ``</s>`` before OPT's, ``<s>`` before Llama's, nothing for GPT-2), found by encoding a probe with and
    without them (transformers 5 has no ``build_inputs_with_special_tokens`` on every tokenizer)."""
    with_ = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_) - len(bare) + 1):
        if with_[i:i + len(bare)] == bare:
            return with_[:i], with_[i + len(bare):]
    return [], []


def _pieces(docs: Sequence[str]) -> Iterator[tuple[bool, str]]:
    """(starts a document, text): documents, the long ones cut before a space about every PIECE_CHARS characters
    (before, so the space stays with the next word as byte-level tokenizers expect)."""
    for d in docs:
        start, first = 0, True
        while start < len(d):
            end = start + PIECE_CHARS
            if end < len(d):
                cut = d.rfind(" ", start + 1, end)
                end = cut if cut > start else end
            else:
                end = len(d)
            yield first, d[start:end]
            start, first = end, False


def chunk_text(docs: Sequence[str], tokenizer: Any, seq_len: int, limit: int | None = None) -> list[list[int]]:
    """The documents cut into sequences of at most ``seq_len`` tokens, in order, none dropped.

    The documents' tokens form one stream, joined by the tokenizer's separator (``[SEP]``, else its EOS; none
    when it has neither); the stream is cut into bodies of ``seq_len`` minus the special tokens, and each body
    gets the tokenizer's special tokens around it (:func:`special_frame`). Only the last sequence can be shorter.
    ``limit``: stop after that many sequences (and tokenise no further)."""
    from .text import _encode

    prefix, suffix = special_frame(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    require(body >= 1, f"--seq-len {seq_len} leaves no room for text between the tokenizer's {len(prefix) + len(suffix)} "
            f"special tokens", "pass a larger --seq-len")
    sep = getattr(tokenizer, "sep_token_id", None)
    sep = getattr(tokenizer, "eos_token_id", None) if sep is None else sep
    out: list[list[int]] = []
    stream: list[int] = []
    started = False

    def full() -> bool:
        return limit is not None and len(out) >= limit

    group: list[tuple[bool, str]] = []

    def consume() -> None:
        nonlocal started
        for (first, _), ids in zip(group, _encode(tokenizer, [t for _, t in group])):
            if not ids:
                continue  # control characters only, or whitespace
            if first and started and sep is not None:
                stream.append(int(sep))
            stream.extend(ids)
            started = True
            while len(stream) >= body and not full():
                out.append(prefix + stream[:body] + suffix)
                del stream[:body]
            if full():
                return
        group.clear()

    for piece in _pieces(docs):
        group.append(piece)
        if len(group) >= PIECES_PER_CALL:
            consume()
            if full():
                return out
    consume()
    if stream and not full():
        out.append(prefix + stream + suffix)  # the tail: shorter, padded in its batch, not dropped
    return out


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention mask (B, T) int64), right-padded to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _whole_text(tokenizer: Any, source: TextSource, task: str, calib_batches: int, eval_batches: int | None,
                batch_size: int, seq_len: int, seed: int, max_sequences: int | None, purpose: str,
                mlm_probability: float, eval_seed: int | None = None) -> Batches:
    docs = read_documents(source.data, source.text_column, source.hf_split)
    n_calib = calib_batches * batch_size
    wanted = None if eval_batches is None else n_calib + eval_batches * batch_size
    limit = min((n for n in (wanted, max_sequences) if n is not None), default=None)
    seqs = chunk_text(docs, tokenizer, seq_len, limit)
    require(seqs, "the data yields no tokens with this tokenizer", "pass other text with --data or another --tokenizer")
    calib, rest = seqs[:n_calib], seqs[n_calib:]
    ev = rest if eval_batches is None else rest[:eval_batches * batch_size]
    need_eval = 1 if eval_batches is None or purpose == "analyze" else eval_batches * batch_size
    if len(calib) < n_calib or len(ev) < need_eval:
        capped = max_sequences is not None and len(seqs) == max_sequences
        need = f"{calib_batches} calibration batches of {batch_size} and " if calib_batches else ""
        need += f"{eval_batches} evaluation batches" if eval_batches else "at least one evaluation sequence"
        raise OutlierfreeError(f"{source.data} gives {len(seqs)} sequences of {seq_len} tokens"
                               f"{' (--max-sequences)' if capped else ''}, too few for {need}",
                               "pass more text, raise --max-sequences, or lower --calib-batches, --eval-batches, "
                               "--batch-size or --seq-len")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    masker = _mlm_masker(tokenizer, task, seed, mlm_probability, eval_seed) if purpose == "quantize" else None

    def batches(rows: list[list[int]], evaluation: bool) -> list[dict[str, torch.Tensor]]:
        out = []
        for i, s in enumerate(range(0, len(rows), batch_size)):
            ids, mask = _pad(rows[s:s + batch_size], pad)
            b = {"input_ids": ids, "attention_mask": mask}
            out.append(masker(b, i, evaluation) if masker else b)
        return out

    cal, evs = batches(calib, False), batches(ev, True)
    tokens = sum(len(s) for s in ev)
    capped = max_sequences is not None and len(seqs) >= max_sequences
    where = f"{source.data}: the whole text ({len(docs)} documents)" + \
        (f", its first {len(seqs)} sequences (--max-sequences)" if capped else "")
    if purpose == "analyze":
        sep = getattr(tokenizer, "sep_token", None) or getattr(tokenizer, "eos_token", None)
        info = {"source": where, "sequences": len(ev), "tokens": tokens,
                "tokenization": f"cut into sequences of {seq_len} tokens with the tokenizer's special tokens"
                                f"{f', documents joined by {sep}' if sep else ''}; none dropped"}
    else:
        info = {"data": source.data, "seq_len": seq_len, "whole_text": True, "sequences": len(seqs),
                "max_sequences": max_sequences, "batch_size": batch_size,
                "calib_split": f"text sequences 1-{len(calib)}" if calib else "none",
                "eval_split": f"text sequences {len(calib) + 1}-{len(calib) + len(ev)}",
                "mlm_probability": mlm_probability if task == "mlm" else None, "seed": seed}
    return Batches(cal, evs, task, info)


def _mlm_masker(tokenizer: Any, task: str, seed: int, probability: float, eval_seed: int | None = None) -> Any:
    """For MLM: a function (batch, index, evaluation) -> batch with BERT-masked inputs and labels (-100 where
    not masked or padding), from the generator :func:`defaults.mask_seed` names (evaluation batches from
    ``eval_seed`` when given)."""
    if task != "mlm":
        return None
    from .text import mask_tokens

    special = sorted({int(i) for i in tokenizer.all_special_ids})

    def mask(b: dict[str, torch.Tensor], index: int, evaluation: bool) -> dict[str, torch.Tensor]:
        base = eval_seed if evaluation and eval_seed is not None else seed
        g = torch.Generator().manual_seed(defaults.mask_seed(base, index, evaluation))
        inputs, labels = mask_tokens(b["input_ids"], special, tokenizer.mask_token_id, len(tokenizer), g, probability)
        if "attention_mask" in b and not bool(b["attention_mask"].all()):
            labels = labels.masked_fill(b["attention_mask"] == 0, -100)  # padding is never scored
        return {**b, "input_ids": inputs, "labels": labels}

    return mask


# ---- a model's own validation split ------------------------------------------------------------------------
def _quant_split(tokenizer: Any, source: TextSource, task: str, calib_batches: int, eval_batches: int | None,
                 batch_size: int, seq_len: int, seed: int, record: TrainingRecord | None,
                 eval_seed: int | None = None) -> Batches:
    """quantize: calibration from a seeded sample of the training split, evaluation from the validation split in
    order, packed as in training (tokenising only as many documents as needed)."""
    from .text import load_documents, pack_clm, pack_mlm, split_documents

    eval_batches = defaults.QUANT_EVAL_BATCHES if eval_batches is None else eval_batches
    g = torch.Generator().manual_seed(seed)
    docs = load_documents(source.data, source.text_column, source.hf_split)
    train_docs, val_docs = split_documents(docs, source.val_fraction)
    pack = pack_clm if task == "clm" else pack_mlm
    perm = torch.randperm(len(train_docs), generator=g).tolist()
    train_docs = [train_docs[i] for i in perm]  # a seeded sample of the training documents

    def rows(split_docs: list[str], n: int) -> torch.Tensor:
        # tokenise only as many documents as needed (the corpus is large for a CPU); the chunks are part of the
        # rule (each drops its own tail), so changing them would change which sequences a model is scored on
        out, i, chunk, have = [], 0, defaults.FIRST_DOCUMENT_CHUNK, 0
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
    mlm_p = record.mlm_probability if record is not None else defaults.MLM_PROBABILITY
    masker = _mlm_masker(tokenizer, task, seed, mlm_p, eval_seed)

    def batch(ids: torch.Tensor, index: int, evaluation: bool) -> dict[str, torch.Tensor]:
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return masker(b, index, evaluation) if masker else b

    calib = [batch(train[i * batch_size:(i + 1) * batch_size], i, False) for i in range(calib_batches)]
    ev = [batch(val[i * batch_size:(i + 1) * batch_size], i, True) for i in range(eval_batches)]
    info = {"data": source.data or "wiki (offline corpus)", "seq_len": seq_len, "val_fraction": source.val_fraction,
            "batch_size": batch_size, "calib_split": "train", "eval_split": "validation",
            "mlm_probability": mlm_p if task == "mlm" else None, "seed": seed}
    return Batches(calib, ev, task, info)


def _need(n_batches: int, batch_size: int, available: int, what: str, flag: str) -> None:
    need = n_batches * batch_size
    require(available >= need, f"the {what} split has {available} sequences/images but {n_batches} batches of "
            f"{batch_size} need {need}", f"lower {flag} or --batch-size, or pass more data with --data")


def _analysis_split(model: nn.Module, tokenizer: Any, source: TextSource, task: str, eval_batches: int | None,
                    batch_size: int, seq_len: int, seed: int, packing: str) -> Batches:
    """analyze: a seeded sample of the validation split's sequences (unmasked), packed as in training for our
    models and one document per sequence for other checkpoints (``packing`` to choose)."""
    from .text import load_documents, split_documents

    n = (defaults.ANALYZE_BATCHES if eval_batches is None else eval_batches) * batch_size
    docs = load_documents(source.data, source.text_column, source.hf_split)
    _, val = split_documents(docs, source.val_fraction)
    require(val, f"the validation split of {source.data or 'the offline corpus'} is empty",
            "pass more text with --data")
    where = f"{'offline Wikipedia corpus' if source.data is None else source.data}: validation split ({len(val)} of " \
            f"{len(docs)} documents, hash rule of outlierfree.data.split_documents, fraction {source.val_fraction})"
    ids, mask, how = split_sequences(model, tokenizer, val, seq_len, n, seed, packing)
    out = []
    for s in range(0, len(ids), batch_size):
        m = mask[s:s + batch_size]
        T = int(m.any(0).nonzero().max()) + 1  # drop columns that are padding in every row
        out.append({"input_ids": ids[s:s + batch_size, :T], "attention_mask": m[:, :T].long()})
    info = {"source": where, "tokenization": how, "sequences": len(ids), "tokens": int(mask.sum())}
    return Batches([], out, task, info)


def split_sequences(model: Any, tokenizer: Any, docs: list[str], seq_len: int, n: int, seed: int,
                    packing: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(ids (N, T), mask (N, T) bool, how) for up to ``n`` sequences of at most ``seq_len`` tokens from the
    documents of a validation split, drawn with ``seed``.

    ``packing``: ``packed`` (training's packing), ``documents`` (one document per sequence, cut to ``seq_len``,
    padded) or ``auto`` (packed for our models, documents for any other checkpoint)."""
    from .text import pack_clm, pack_mlm

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
    pad = getattr(tokenizer, "pad_token_id", None)
    ids, mask = _pad(chosen, 0 if pad is None else int(pad))
    return ids, mask.bool(), f"one document per sequence with the tokenizer's special tokens, at most {seq_len} tokens"


# ---- images ------------------------------------------------------------------------------------------------
def _image_batches(model: nn.Module, record: TrainingRecord | None, data: str | None, calib_batches: int,
                   eval_batches: int | None, batch_size: int, seed: int, purpose: str, task: str) -> Batches:
    """Images of the record's data (or ``data``), normalised with the record's statistics when it has them."""
    from .images import load_images, normalise

    c = model.config
    size, channels = int(c.image_size), int(getattr(c, "num_channels", 1))
    if data is None and record is not None:
        data = record.data
    images = load_images(data, size, record.val_fraction(True) if record else defaults.VAL_FRACTION_IMAGES, channels)
    mean, std = (record.mean, record.std) if record is not None and record.mean is not None else \
        (images.mean, images.std)
    g = torch.Generator().manual_seed(seed)
    if purpose == "analyze":
        return _analysis_images(model, images, mean, std, eval_batches, batch_size, g, task)
    eval_batches = defaults.QUANT_EVAL_BATCHES if eval_batches is None else eval_batches
    require(images.channels == channels and images.image_size == size,
            f"the images are {images.channels}x{images.image_size}px but the model takes "
            f"{channels}x{size}px", "pass --data with images that match the model")
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


def _analysis_images(model: nn.Module, images: Any, mean: tuple[float, ...], std: tuple[float, ...],
                     eval_batches: int | None, batch_size: int, g: torch.Generator, task: str) -> Batches:
    """analyze: a seeded sample of the validation (else training) images, resized and converted to the model's
    size and channels where they differ (analysis measures any image model; quantize insists on a match)."""
    from .images import normalise

    cfg = model.config
    size, channels, P = int(cfg.image_size), int(getattr(cfg, "num_channels", 1)), int(cfg.patch_size)
    n = (defaults.ANALYZE_BATCHES if eval_batches is None else eval_batches) * batch_size
    x = images.val_x if len(images.val_x) else images.train_x
    require(len(x) > 0, f"no images in {images.source}", "pass a folder with images")
    test = bool(len(images.val_x))
    x = x[torch.randperm(len(x), generator=g)[:n]]  # (N, C, H, W) uint8
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] != channels:  # grey -> RGB (or the other way) by repeating / averaging the channels
        x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).to(torch.uint8)
        mean, std = (mean[0],) * channels, (std[0],) * channels
    raw = [x[s:s + batch_size] for s in range(0, len(x), batch_size)]
    ev = [{"pixel_values": normalise(r, mean, std)} for r in raw]
    info = {"source": f"{images.source}: {'test' if test else 'train'} images", "sequences": len(x),
            "tokens": len(x) * (1 + (size // P) ** 2), "tokenization": f"{size}x{size} px, patches of {P}",
            "normalisation": {"mean": list(mean), "std": list(std)}}
    return Batches([], ev, task, info, raw)
