"""Run a model over evaluation batches, observe its sites, and turn the streaming statistics into a report dict.

    report = analyze_model(model, batches)                 # batches: EvalBatch objects or plain input dicts
    report["headline"]["max_inf_norm"], report["headline"]["max_inf_norm_site"]

Every metric is defined in docs/metrics.md. The headline figures are taken over the residual sums that enter each
block's LayerNorms (kind ``ln_input``), as the paper's outliers live there and every quantized LayerNorm input
must represent them.
"""

from __future__ import annotations

import dataclasses
import inspect
import resource
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import require
from ..sites import Site, discover, observe, select
from . import metrics
from .inputs import EvalBatch, from_inputs
from .stats import AttentionStats, HiddenStats, TopActivations

DEFAULT_KINDS = ("ln_input", "ln_output", "attn_output", "ffn_output", "attn_probs")
HEADLINE_KIND = "ln_input"
DEFAULT_NOOP_THRESHOLD = 0.5
RECURRING_FRACTION = 0.25  # LLM.int8(): a feature is systematic when it is an outlier in >= 25% of the layers


def analysis_sites(model: nn.Module, kinds: Iterable[str] = DEFAULT_KINDS, attention: bool = True) -> list[Site]:
    """The sites analysis observes: ``kinds`` of :func:`outlierfree.sites.discover`; attention internals only
    if ``attention``."""
    return select(discover(model, attention=attention), tuple(kinds))


def model_info(model: nn.Module) -> dict[str, Any]:
    """What the report says about the model: class, type, variant, sizes (``path`` is filled in by the loader)."""
    from ..models.build import attention_config_of, count_parameters

    cfg = getattr(model, "config", None)
    variant = attention_config_of(model)
    return {
        "path": None, "class": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
        "variant": variant.describe() if variant is not None else "stock (not patched)",
        "parameters": count_parameters(model),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def analyze_model(model: nn.Module, batches: Iterable[EvalBatch | dict[str, torch.Tensor]], *,
                  kinds: Iterable[str] = DEFAULT_KINDS, attention: bool = True, tokenizer: Any = None,
                  abs_threshold: float = metrics.DEFAULT_ABS_THRESHOLD,
                  rel_threshold: float = metrics.DEFAULT_REL_THRESHOLD,
                  noop_threshold: float = DEFAULT_NOOP_THRESHOLD, progress: bool = False,
                  name: str | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Observe ``model`` over ``batches`` and return the report dict (every number; see docs/metrics.md).

    Args:
        batches: :class:`EvalBatch` objects, or plain input dicts (``input_ids``/``attention_mask`` or
            ``pixel_values``), whose tokens are then named with ``tokenizer``.
        kinds: site kinds to measure (see :data:`outlierfree.sites.SITE_KINDS`).
        attention: observe attention internals (``attn_probs``); off for huge models or to keep sdpa.
        progress: show a rich progress bar.
        name: the model's name in plots and tables; meta: extra fields merged into the report (data, seed...).
    Statistics stream: each activation is reduced to per-dimension maxima, per-sequence scalars and histogram
    counts inside the forward pass and then dropped. The model is put in eval mode and restored afterwards.
    """
    batches, kinds = list(batches), tuple(kinds)
    require(len(batches) > 0, "no evaluation batches to analyse", "pass --batches 1 or more, and data with tokens")
    batches = [b if isinstance(b, EvalBatch) else from_inputs(b, tokenizer) for b in batches]
    sites = analysis_sites(model, kinds, attention)
    residual = "residual" in kinds  # residual sums are found while the forward runs (outlierfree.sites.opmode)
    require(len(sites) > 0 or residual, f"found no sites of kinds {', '.join(kinds)} in {type(model).__name__}",
            "pass other --sites kinds (see docs/metrics.md), e.g. --sites all")
    stats: dict[str, HiddenStats | AttentionStats] = {
        s.name: AttentionStats(s) if s.kind == "attn_probs" else HiddenStats(s) for s in sites}
    top = TopActivations()
    current: dict[str, Any] = {"batch": None, "offset": 0}

    def on_site(site: Site, t: torch.Tensor) -> None:
        st = stats.get(site.name)
        if st is None:  # a residual sum, or a module's second call in one forward (ALBERT's shared layers)
            st = stats[site.name] = AttentionStats(site) if site.kind == "attn_probs" else HiddenStats(site)
        batch = current["batch"]
        if isinstance(st, AttentionStats):
            st.update(t, batch)
            return None
        for value, b, pos in st.update(t, batch):
            label = batch.labels[b][pos] if pos >= 0 and batch.labels else None
            top.add(value, {"site": site.name, "layer": site.layer, "sequence": current["offset"] + b,
                            "position": pos, "token": label})
        return None

    device = next(model.parameters()).device
    extra = _forward_extras(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), observe(model, on_site, sites, residual=residual), _progress(progress, len(batches), name) as advance:
            for batch in batches:
                current["batch"] = batch
                inputs = {k: v.to(device) for k, v in batch.inputs.items()}
                if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "input_ids" in inputs:
                    # encoder-decoder (T5, BART): the decoder reads the same tokens, so its sites align with them
                    inputs.setdefault("decoder_input_ids", inputs["input_ids"])
                model(**inputs, **extra)
                current["offset"] += batch.size
                advance()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0

    hidden = [st.summary(abs_threshold, rel_threshold) for st in stats.values() if isinstance(st, HiddenStats)]
    attn = [st for st in stats.values() if isinstance(st, AttentionStats)]
    heads = [row for st in attn for row in st.heads(noop_threshold)]
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    report: dict[str, Any] = {
        "name": name,
        "model": model_info(model),
        "sequences": current["offset"], "batches": len(batches),
        "settings": {"kinds": list(kinds), "attention": attention, "abs_threshold": abs_threshold,
                     "rel_threshold": rel_threshold, "noop_threshold": noop_threshold},
        "headline": headline(hidden, width),
        "reference_style": reference_style(hidden),
        "outlier_dims": recurring_dims(report_kind(hidden, width)),
        "top_activations": top.rows(),
        "heads": heads,
        "noop": noop_summary(heads, attn),
        "sites": hidden,
        "timing": {"seconds": round(seconds, 3), "seconds_per_batch": round(seconds / len(batches), 4),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "how": "wall time of the forward passes with observation; peak RSS of the whole process "
                          "(model loading included), from getrusage"},
    }
    report.update(meta or {})
    return report


def _forward_extras(model: nn.Module) -> dict[str, Any]:
    """Forward kwargs that save memory: causal LMs compute the logits of the last position only (Gemma's
    262k-word vocabulary would otherwise allocate B x T x 262k floats that analysis never reads)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _progress(show: bool, total: int, name: str | None) -> Any:
    """Context manager yielding ``advance()``: the package's progress bar (records.progress) when ``show``."""
    from ..records import progress

    return progress(f"analysing {name or 'model'}", total, show)


# ---- aggregates ------------------------------------------------------------------------------------------
def report_kind(sites: list[dict[str, Any]], width: int | None = None) -> list[dict[str, Any]]:
    """The sites the headline is taken over: the block LayerNorm inputs as wide as the residual stream (``width``,
    the model's hidden size; else the commonest width), which leaves out Gemma's per-head q_norm / k_norm inputs;
    without any block LayerNorm input, every LayerNorm input; without those, every measured hidden site."""
    for rule in (lambda s: s["kind"] == HEADLINE_KIND and s["layer"] is not None,
                 lambda s: s["kind"] == HEADLINE_KIND, lambda s: True):
        chosen = [s for s in sites if rule(s) and s["inf_norm_mean"] is not None]
        if chosen:
            dims = [s["dim"] for s in chosen]
            w = width if width in dims else max(set(dims), key=dims.count)
            return [s for s in chosen if s["dim"] == w]
    return []


@dataclass(frozen=True)
class Headline:
    """The outlier numbers of one analysis report, typed: what ``reproduce`` and ``doctor`` read, so that no other
    package indexes the report dict by string keys (definitions in docs/metrics.md)."""

    max_inf_norm: float | None
    max_inf_norm_site: str | None
    avg_kurtosis: float | None
    max_kurtosis: float | None
    noop_heads: int | None  # attention heads flagged as no-op (None: attention was not analysed)

    @classmethod
    def of(cls, report: dict[str, Any]) -> "Headline":
        """The record of an :func:`analyze_model` report (or one read back from analysis.json)."""
        h = report.get("headline") or {}
        return cls(h.get("max_inf_norm"), h.get("max_inf_norm_site"), h.get("avg_kurtosis"), h.get("max_kurtosis"),
                   (report.get("noop") or {}).get("flagged"))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dataclasses.asdict(self)


def headline(sites: list[dict[str, Any]], width: int | None = None) -> dict[str, Any]:
    """Max inf-norm and average / max kurtosis over the headline sites (:func:`report_kind`), each with its site
    named, and the single largest activation over every measured site."""
    chosen = report_kind(sites, width)
    if not chosen:
        return {}
    worst_inf = max(chosen, key=lambda s: s["inf_norm_mean"])
    kur = [s for s in chosen if s["kurtosis_mean"] is not None]
    worst_kur = max(kur, key=lambda s: s["kurtosis_mean"]) if kur else None
    everywhere = [s for s in sites if s["inf_norm_max"] is not None]
    largest = max(everywhere, key=lambda s: s["inf_norm_max"])
    return {
        "sites": chosen[0]["kind"] if len({s["kind"] for s in chosen}) == 1 else "all measured",
        "n_sites": len(chosen), "site_names": [s["name"] for s in chosen],
        "max_inf_norm": worst_inf["inf_norm_mean"], "max_inf_norm_site": worst_inf["name"],
        "avg_kurtosis": sum(s["kurtosis_mean"] for s in kur) / len(kur) if kur else None,
        "max_kurtosis": worst_kur["kurtosis_mean"] if worst_kur else None,
        "max_kurtosis_site": worst_kur["name"] if worst_kur else None,
        "largest_activation": largest["inf_norm_max"], "largest_activation_site": largest["name"],
        "how": "per site: inf-norm and kurtosis of each sequence (over its real tokens and all hidden dimensions), "
               "averaged over sequences; max_inf_norm / max_kurtosis: the largest such average over the sites, "
               "avg_kurtosis: the mean over the sites; largest_activation: max |x| over every measured site and "
               "sequence",
    }


def reference_style(sites: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference code's three max inf-norms and its kurtosis averages, computed on the same statistics
    (block sites only): FFN output, LayerNorm output, LayerNorm input; kurtosis over FFN outputs and LayerNorm
    outputs (our per-sequence kurtosis; see docs/metrics.md for the small difference)."""
    block = [s for s in sites if s["layer"] is not None and s["inf_norm_mean"] is not None]

    def mx(kind: str) -> float | None:
        v = [s["inf_norm_mean"] for s in block if s["kind"] == kind]
        return max(v) if v else None

    kur = [s["kurtosis_mean"] for s in block if s["kind"] in ("ffn_output", "ln_output")
           and s["kurtosis_mean"] is not None]
    return {"max_ffn_out_inf_norm": mx("ffn_output"), "max_LN_out_inf_norm": mx("ln_output"),
            "max_LN_inp_inf_norm": mx("ln_input"), "avg_kurtosis": sum(kur) / len(kur) if kur else None,
            "max_kurtosis": max(kur) if kur else None}


def recurring_dims(over: list[dict[str, Any]]) -> dict[str, Any]:
    """Hidden dimensions that are outliers (absolute rule) at many of the headline sites: the systematic outlier
    features of LLM.int8() (>= 25% of the sites), largest magnitude first, with the sites' layers."""
    counts: dict[int, list[dict[str, Any]]] = {}
    for s in over:
        for j in s["outlier_dims_abs"]:
            counts.setdefault(j, []).append(s)
    need = max(1, int(round(RECURRING_FRACTION * len(over))))
    rows = [{"dim": j, "sites": len(ss), "layers": sorted({s["layer"] for s in ss if s["layer"] is not None}),
             "max": max(s["dim_max"][j] for s in ss)} for j, ss in counts.items() if len(ss) >= need]
    rows.sort(key=lambda r: -r["max"])
    rel: dict[int, int] = {}
    for s in over:
        for j in s["outlier_dims_rel"]:
            rel[j] = rel.get(j, 0) + 1
    return {"over_sites": len(over), "min_sites": need, "recurring": rows[:50],
            "relative_recurring": sorted(([j, n] for j, n in rel.items() if n >= need), key=lambda r: -r[1])[:50]}


def noop_summary(heads: list[dict[str, Any]], attn: list[AttentionStats]) -> dict[str, Any]:
    """Count of flagged no-op heads and the strongest one (largest mass on no-op keys), with its attention map
    on the first evaluation sequence for the plot."""
    if not heads:
        return {"heads": 0, "flagged": 0}
    best = max(heads, key=lambda r: r["noop"])
    st = next(s for s in attn if s.site.name == best["site"])
    ex = st.example[best["head"]] if st.example is not None else None
    out = {"heads": len(heads), "flagged": sum(r["noop_head"] for r in heads),
           "strongest": {k: best[k] for k in best},
           "example": {"tokens": st.example_labels, "probs": _rounded(ex) if ex is not None else []}}
    # Every head's map of the same sequence, so that a comparison can show another model's strongest no-op head
    # next to the *same* layer and head here (the reproduce report does). Kept for models of up to MAPS_MAX_HEADS
    # heads: at 48 tokens that is at most a few MB of JSON.
    if len(heads) <= MAPS_MAX_HEADS:
        out["maps"] = {s.site.name: [_rounded(h) for h in s.example] for s in attn if s.example is not None}
    return out


MAPS_MAX_HEADS = 256


def _rounded(probs: Any) -> list[list[float]]:
    """A (t, t) map as nested lists, rounded to 4 decimals (plots need no more; JSON stays small)."""
    return [[round(float(v), 4) for v in row] for row in probs.tolist()]
