"""The model a training run builds: the named size, sized to its data (vocabulary or classes), with the user's
overrides, the attention variant and the optional OSP recipe."""

from __future__ import annotations

import warnings
from typing import Any

import torch.nn as nn

from ..errors import OutlierfreeError, require
from .config import TrainConfig


def image_size(cfg: TrainConfig) -> int | None:
    """The image side of an image run's model (its size's, unless ``--set image_size=...``); None for text."""
    if cfg.task != "image":
        return None
    from ..models.sizes import SIZES

    return int({**SIZES[cfg.family][cfg.size], **cfg.hf_config}["image_size"])


def build_for_run(cfg: TrainConfig, data: Any) -> nn.Module:
    """The model for the run: the named size, the data's vocabulary / classes, and the user's overrides.

    Bad overrides are a one-line error; so is a ``--seq-len`` longer than the model's positions."""
    from ..attention.config import AttentionConfig
    from ..models.build import DeadAttentionWarning, build_model, model_config, warn_if_dead
    from ..hf_compat import max_length
    from ..models.recipe import apply_recipe

    over = cfg.model_overrides()
    if cfg.task == "image":
        over.setdefault("num_labels", len(data.classes))
        over.setdefault("num_channels", data.channels)
        over.setdefault("image_size", data.image_size)
        over.setdefault("id2label", {i: c for i, c in enumerate(data.classes)})
        over.setdefault("label2id", {c: i for i, c in enumerate(data.classes)})
    else:
        tok = data.tokenizer
        over.setdefault("vocab_size", len(tok))
        over.setdefault("pad_token_id", tok.pad_token_id)
        if cfg.task == "clm":
            over.setdefault("bos_token_id", tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
            over.setdefault("eos_token_id", tok.eos_token_id)
        n_pos = max_length(model_config(cfg.family, cfg.size, **over))
        require(n_pos is None or cfg.seq_len <= n_pos, f"--seq-len {cfg.seq_len} exceeds the {n_pos} positions of "
                f"{cfg.family}/{cfg.size}", f"lower --seq-len or pass --set max_position_embeddings={cfg.seq_len}")
    try:
        with warnings.catch_warnings():  # judged below at the training length, not the model's maximum
            warnings.simplefilter("ignore", DeadAttentionWarning)
            model = build_model(cfg.family, cfg.size, cfg.attention, seed=cfg.seed, **over)
        if not cfg.gamma_ramp_steps:  # the ramp starts from gamma = 0, which never clips a row away
            warn_if_dead(AttentionConfig.from_dict(cfg.attention),
                         max_length(model.config) if cfg.task == "image" else cfg.seq_len)
        return apply_recipe(model, {"norm": cfg.norm, "embed_proj": cfg.embed_proj})
    except OutlierfreeError:
        raise
    except (TypeError, ValueError) as e:
        raise OutlierfreeError(f"cannot build {cfg.family}/{cfg.size} with the config overrides {over}: "
                               f"{str(e).splitlines()[0][:200]}", "check the --set keys and values") from e


def describe(cfg: TrainConfig) -> str:
    """The attention variant of ``cfg`` in words, for the start line."""
    from ..attention.config import AttentionConfig

    return AttentionConfig.from_dict(cfg.attention).describe() + " attention"
