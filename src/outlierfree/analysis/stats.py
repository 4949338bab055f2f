"""Streaming statistics per site: nothing of an activation outlives the batch that produced it.

Per hidden-state site we keep a running max of |x| per hidden dimension (d floats), one inf-norm and one kurtosis
per sequence (scalars), a histogram of log10 |x| (fixed bins), and counts of the token that holds each sequence's
largest activation. Per attention site we keep the mass each head puts on each no-op key set (H floats per set)
and the first sequence's probabilities (for the attention-map plot, at most ``EXAMPLE_TOKENS`` square).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Any

import torch

from ..sites import Site
from . import metrics
from .inputs import EvalBatch

HIST_LO, HIST_HI, HIST_BINS = -6.0, 7.0, 104  # log10 |x| from 1e-6 to 1e7 in 8 bins per decade
EXAMPLE_TOKENS = 48
TOP_ACTIVATIONS = 20


def as_tokens(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """View a site tensor as (B, T, d) matching ``mask`` (B, T), or as (B, n, d) with no mask when it cannot be.

    Handles OPT's flattened FFN (B*T, d), attention internals (B, H, T, D) -> (B, T, H*D) and per-head norms
    (B, T, H, D) -> (B, T, H*D)."""
    B, T = mask.shape
    if x.dim() >= 3 and tuple(x.shape[:2]) == (B, T):
        return x.reshape(B, T, -1), mask
    if x.dim() == 2 and x.shape[0] == B * T:
        return x.view(B, T, -1), mask
    if x.dim() == 4 and x.shape[0] == B and x.shape[2] == T:
        return x.transpose(1, 2).reshape(B, T, -1), mask
    if x.dim() == 2 and x.shape[0] == B:
        return x.view(B, 1, -1), None
    return x.reshape(x.shape[0], -1, x.shape[-1]), None


class HiddenStats:
    """Streaming outlier statistics of one hidden-state site."""

    def __init__(self, site: Site):
        self.site = site
        self.dim_max: torch.Tensor | None = None  # (d,) running max |x| per hidden dimension
        self.inf_norms: list[float] = []  # one per sequence
        self.kurtoses: list[float] = []  # one per sequence
        self.hist = torch.zeros(HIST_BINS + 2, dtype=torch.float64)  # [zeros or below, bins..., above]
        self.argmax_tokens: Counter[str] = Counter()  # token label holding each sequence's max
        self.argmax_dims: Counter[int] = Counter()  # hidden dimension holding each sequence's max
        self.values = 0

    def update(self, x: torch.Tensor, batch: EvalBatch) -> list[tuple[float, int, int]]:
        """Add one batch; returns (value, sequence-in-batch, position) of each sequence's largest activation
        (position -1 when the site's tokens cannot be matched to the batch's)."""
        x, mask = as_tokens(x.detach(), batch.mask.to(x.device))
        matched = mask is not None  # the site's tokens are the batch's tokens (labels apply)
        if matched and bool(mask.all()):
            mask = None  # packed batches and images have no padding: the cheaper unmasked path
        a = metrics.masked_abs(x, mask)  # (B, T, d) magnitudes, padding 0
        tok = metrics.token_max(a, mask)  # (B, T) per-token inf-norm, padding -inf
        dm = a.amax(dim=(0, 1)).cpu()  # (d,) as metrics.dim_abs_max
        if self.dim_max is None:
            self.dim_max = dm
        elif self.dim_max.shape == dm.shape:  # (a site whose width changes keeps its first width's maxima)
            self.dim_max = torch.maximum(self.dim_max, dm)
        best_val, best_pos = tok.max(dim=1)  # (B,): the sequence's inf-norm and where it is
        self.inf_norms += [v if math.isfinite(v) else math.nan for v in best_val.tolist()]
        self.kurtoses += metrics.sequence_kurtosis(x, mask).cpu().tolist()
        n_real = a.numel() if mask is None else int(mask.sum()) * a.shape[-1]
        self.values += n_real
        logs = torch.log10(a)  # zeros (and padding) -> -inf, which histc ignores like anything outside [lo, hi]
        h = torch.histc(logs, bins=HIST_BINS, min=HIST_LO, max=HIST_HI).to(torch.float64).cpu()
        above = float((logs > HIST_HI).sum())
        self.hist[1:-1] += h
        self.hist[-1] += above
        self.hist[0] += n_real - float(h.sum()) - above  # exact zeros and magnitudes below 10^lo
        found = []
        for b, (v, t) in enumerate(zip(best_val.tolist(), best_pos.tolist())):
            if not math.isfinite(v) or v == 0:
                continue  # no real token, or an all-zero tensor: nothing holds a maximum
            if matched and batch.labels:
                self.argmax_tokens[batch.labels[b][t]] += 1
            self.argmax_dims[int(a[b, t].argmax())] += 1
            found.append((v, b, t if matched else -1))
        return found

    def summary(self, abs_threshold: float, rel_threshold: float) -> dict[str, Any]:
        """Every number of this site (see docs/metrics.md)."""
        inf = [v for v in self.inf_norms if not math.isnan(v)]
        kur = [v for v in self.kurtoses if not math.isnan(v)]
        dm = self.dim_max if self.dim_max is not None else torch.zeros(0)
        dims = metrics.outlier_dims(dm, abs_threshold, rel_threshold)
        top = torch.argsort(dm, descending=True)[:10].tolist()
        s = self.site
        return {
            "name": s.name, "kind": s.kind, "layer": s.layer, "module": s.module, "point": s.point,
            "dim": int(dm.numel()), "sequences": len(inf), "values": int(self.values),
            "inf_norm_mean": _mean(inf), "inf_norm_max": max(inf) if inf else None,
            "kurtosis_mean": _mean(kur), "kurtosis_max": max(kur) if kur else None,
            "outlier_dims_abs": dims["absolute"], "outlier_dims_rel": dims["relative"],
            "top_dims": [[int(j), float(dm[j])] for j in top],
            "argmax_tokens": self.argmax_tokens.most_common(10),
            "argmax_dims": [[int(k), int(v)] for k, v in self.argmax_dims.most_common(5)],
            "dim_max": [round(float(v), 6) for v in dm.tolist()],
            "log10_hist": {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS, "zeros": int(self.hist[0]),
                           "counts": [int(c) for c in self.hist[1:-1].tolist()], "above": int(self.hist[-1])},
        }


class AttentionStats:
    """Streaming no-op statistics of one attention-probability site: mass per head on each key set."""

    def __init__(self, site: Site):
        self.site = site
        self.mass: dict[str, torch.Tensor] = {}  # set name -> (H,) summed over real query rows
        self.noop_share = 0.0  # summed over sequences: fraction of the sequence's tokens that are no-op keys
        self.rows = 0.0
        self.sequences = 0
        self.example: torch.Tensor | None = None  # (H, t, t) first sequence, t <= EXAMPLE_TOKENS
        self.example_labels: list[str] = []

    def update(self, p: torch.Tensor, batch: EvalBatch) -> None:
        """Add one batch of probabilities (B, H, Tq, Tk)."""
        if p.dim() != 4 or not batch.keys or p.shape[-1] != batch.mask.shape[1]:
            return  # keys we cannot name (e.g. a cache longer than the batch): nothing to attribute
        qmask = batch.mask if p.shape[-2] == batch.mask.shape[1] else None
        sets = dict(batch.keys)
        sets["noop"] = torch.stack(list(batch.keys.values())).any(0)  # union: first | delimiter | background
        names = list(sets)
        keys = torch.stack([sets[n] for n in names], dim=-1)  # (B, Tk, S)
        m, rows = metrics.key_mass(p, keys, qmask)  # (H, S)
        for i, name in enumerate(names):
            self.mass[name] = self.mass.get(name, 0) + m[:, i].cpu()
        n_real = batch.mask.sum(1).clamp_min(1).double()  # (B,)
        self.noop_share += float((sets["noop"].double().sum(1) / n_real).sum())
        self.rows += float(rows)
        self.sequences += p.shape[0]
        if self.example is None:
            t = min(EXAMPLE_TOKENS, int(batch.mask[0].sum()))
            self.example = p[0, :, :t, :t].detach().float().cpu().clone()  # (H, t, t)
            self.example_labels = batch.labels[0][:t] if batch.labels else [str(i) for i in range(t)]

    def heads(self, noop_threshold: float) -> list[dict[str, Any]]:
        """One row per head: average mass on each set, the set's average share of tokens, and the no-op flag."""
        if not self.rows:
            return []
        out = []
        H = int(next(iter(self.mass.values())).numel())
        for h in range(H):
            row: dict[str, Any] = {"site": self.site.name, "layer": self.site.layer, "head": h}
            for name, m in self.mass.items():
                row[name] = float(m[h]) / self.rows
            row["noop_share"] = self.noop_share / self.sequences
            # flagged: most of the head's attention goes to no-op keys, far more than their share of the tokens
            row["noop_head"] = row["noop"] >= noop_threshold and row["noop"] >= 2 * row["noop_share"]
            out.append(row)
        return out


class TopActivations:
    """The largest single-token activations over all sites, one per (site, token): each sequence offers its
    maximum, and the same token at the same site in many sequences is kept once, at its largest value."""

    def __init__(self, k: int = TOP_ACTIVATIONS):
        self.k = k
        self.best: dict[tuple[str, Any], tuple[float, dict[str, Any]]] = {}  # at most sites x sequences entries

    def add(self, value: float, info: dict[str, Any]) -> None:
        """Offer one activation (``info`` names its site, sequence, position and token)."""
        key = (info["site"], info["token"] if info["token"] is not None else info["sequence"])
        if key not in self.best or value > self.best[key][0]:
            self.best[key] = (value, info)

    def rows(self) -> list[dict[str, Any]]:
        """The ``k`` largest, largest first."""
        top = heapq.nlargest(self.k, self.best.values(), key=lambda r: r[0])
        return [{"value": v, **info} for v, info in top]


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None
