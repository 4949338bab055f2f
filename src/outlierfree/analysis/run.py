"""Analyse a model on disk: load it, build its evaluation batches from the shared data layer, and measure it.

The library entry point that ``outlierfree analyze``, ``doctor`` and ``reproduce`` all call (the CLI only parses
flags and writes the report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import OutlierfreeError, require
from .analyze import DEFAULT_KINDS, DEFAULT_NOOP_THRESHOLD
from .metrics import DEFAULT_ABS_THRESHOLD, DEFAULT_REL_THRESHOLD


def is_image_model(model: Any) -> bool:
    """Whether ``model`` takes pixel values (ViT and other vision transformers)."""
    from ..data.evaluation import takes_images

    return takes_images(model)


def model_name(path: str) -> str:
    """A short name for tables and plots: the directory (or .gguf file) name, with its parent's when the name
    alone says nothing (``.../all-MiniLM/model`` -> ``all-MiniLM/model``)."""
    generic = ("model", "models", "checkpoint", "final", "best", "last", "snapshot", "train", "runs", "out")
    p = Path(path).resolve()
    parts = [p.name.removesuffix(".gguf")]
    # climb while the names say nothing: runs/bert-vanilla-s0/train/model -> bert-vanilla-s0/train/model
    while parts[0] in generic and p.parent != p and p.parent.name:
        p = p.parent
        parts.insert(0, p.name)
    return "/".join(parts)


def analyze_path(path: str, *, data: str | None = None, batches: int | None = None, batch_size: int = 8,
                 seq_len: int = 128, seed: int = 0, max_sequences: int | None = None, tokenizer: str | None = None, kinds: tuple[str, ...] = DEFAULT_KINDS,
                 attention: bool = True, threshold: float = DEFAULT_ABS_THRESHOLD,
                 rel_threshold: float = DEFAULT_REL_THRESHOLD, noop_threshold: float = DEFAULT_NOOP_THRESHOLD,
                 packing: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Load the model at ``path``, build its evaluation batches and analyse it: the report dict of one model.

    The batches come from the shared evaluation-data layer (:mod:`outlierfree.data.evaluation`): a model trained
    here is analysed on its own validation split, any other text given with ``data`` is used whole.
    ``batches`` None: 8 from a validation split, every sequence of a whole text (at most ``max_sequences``)."""
    from ..data.record import read_training_record
    from ..models.io import load_model, load_tokenizer
    from .analyze import analyze_model
    from .inputs import image_batches, text_batches

    model = load_model(path)
    name = model_name(path)
    record = read_training_record(path) if Path(path).is_dir() else None
    trained_on = record.data if record is not None and record.trained_here else None
    if is_image_model(model):
        evals, desc = image_batches(model, data, batches, batch_size, seed, model_path=path)
        tok = None
        data_name = data or trained_on or "fashion-mnist test"
    else:
        if tokenizer is not None:
            from ..data.text import load_tokenizer_dir

            tok = load_tokenizer_dir(tokenizer)
        else:
            tok = load_tokenizer(path)
        # transformers builds an empty tokenizer (special tokens only) when the files are missing: every word
        # would become [UNK], which is no analysis of the model
        require(len(tok) > len(set(tok.all_special_ids)) + 1, f"the tokenizer of {path!r} has only {len(tok)} "
                f"tokens (its vocabulary files are missing)", "save the tokenizer beside the model or pass --tokenizer DIR")
        evals, desc = text_batches(model, tok, data, batches, batch_size, seq_len, seed, packing,
                                   model_path=path if Path(path).is_dir() else None, max_sequences=max_sequences)
        data_name = data or trained_on or "offline wiki (validation)"
    require(sum(int(b.mask.sum()) for b in evals) > 0, "the data yields no tokens", "pass other data with --data")
    meta = {"data": {"name": data_name, **desc}, "seed": seed, "batch_size": batch_size, "seq_len": seq_len}
    try:
        report = analyze_model(model, evals, kinds=kinds, attention=attention, abs_threshold=threshold,
                               rel_threshold=rel_threshold, noop_threshold=noop_threshold, progress=progress,
                               name=name, meta=meta)
    except OutlierfreeError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # a forward that fails on this checkpoint
        # (inputs it needs, shapes, dtypes): one line, not a traceback
        raise OutlierfreeError(f"the forward pass of {path!r} failed: {str(e).splitlines()[0][:200]}",
                               "check that the model and its tokenizer/data match (or try --no-attention)") from e
    report["model"]["path"] = str(path)
    return report
