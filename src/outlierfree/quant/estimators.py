"""Range estimators: from the tensors seen during calibration to a quantization range ``[lo, hi]``.

=================  ============================================================================================
``current_minmax``  min / max of the last tensor seen (reference code's CurrentMinMaxEstimator; weights)
``minmax``          min / max over every tensor seen (torch.ao ``MinMaxObserver``)
``running_minmax``  exponential moving average of each tensor's min / max, initialised with the first
                    (reference code's RunningMinMaxEstimator, momentum 0.9; torch.ao
                    ``MovingAverageMinMaxObserver`` with ``averaging_constant = 1 - momentum``)
``percentile``      the ``p`` and ``100 - p`` percentiles of each tensor, averaged over tensors
``mse``             per tensor, the range ``[c lo, c hi]`` (``c`` in (0, 1], min-max shrunk towards zero) that
                    minimises the squared quantization error: a grid search over ``c`` refined by golden-section
                    search; averaged over tensors
``histogram``       a histogram of every value seen (re-binned as the range grows); the range minimising the
                    expected squared error (rounding noise ``scale^2 / 12`` inside, clipping error outside) over all
                    pairs of bin edges, computed exactly with prefix sums
=================  ============================================================================================

Granularity: ``per_tensor`` gives scalar ranges; ``per_channel`` one range per index of dim 0 (weights' output
channels); ``per_token`` is dynamic and never calibrated (see :class:`~.quantizer.Quantizer`).
"""

from __future__ import annotations

import math

import torch

from .config import QuantSpec
from .grid import fake_quant_range


class RangeEstimator:
    """Base class: ``update(x)`` with every calibration tensor, then ``range(final=True)``."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.per_channel = spec.granularity == "per_channel"
        self.seen = 0
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        # per-channel: (C, N) with one row per channel; per-tensor: (1, N)
        x = x.detach()
        return x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)

    def _minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(self._flat(x), dim=1)  # (C,) or (1,)
        return self._out(lo), self._out(hi)

    def _out(self, v: torch.Tensor) -> torch.Tensor:
        return v if self.per_channel else v.reshape(())

    def update(self, x: torch.Tensor) -> None:
        """Take one calibration tensor into account."""
        self.seen += 1
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def range(self, final: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The current range ``(lo, hi)``; ``final`` runs searches that are too slow for every batch."""
        if self.lo is None:
            raise RuntimeError("range estimator has seen no data")
        return self.lo, self.hi

    def reset(self) -> None:
        """Forget everything seen."""
        self.seen = 0
        self.lo = self.hi = None


class CurrentMinMax(RangeEstimator):
    """Min-max of the last tensor."""

    def _update(self, x: torch.Tensor) -> None:
        self.lo, self.hi = self._minmax(x)


class MinMax(RangeEstimator):
    """Min-max over all tensors seen."""

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._minmax(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)


class RunningMinMax(RangeEstimator):
    """Exponential moving average of min and max, initialised with the first tensor."""

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._minmax(x)
        m = self.spec.momentum
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi


class _Averaged(RangeEstimator):
    """Per-tensor estimate, averaged over the tensors seen (running mean)."""

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = self._estimate(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            n = self.seen
            self.lo = self.lo + (lo - self.lo) / n
            self.hi = self.hi + (hi - self.hi) / n

    def _estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class Percentile(_Averaged):
    """The ``p`` / ``100 - p`` percentiles (linear interpolation between order statistics, as ``torch.quantile``)."""

    def _estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._flat(x).double()
        q = self.spec.percentile / 100.0
        # sort once; torch.quantile refuses inputs over 16M elements
        s, _ = torch.sort(f, dim=1)
        n = s.shape[1]

        def at(p: float) -> torch.Tensor:
            pos = p * (n - 1)
            i0 = int(math.floor(pos))
            i1 = min(i0 + 1, n - 1)
            w = pos - i0
            return s[:, i0] * (1 - w) + s[:, i1] * w

        lo, hi = at(1.0 - q), at(q)
        return self._out(lo.to(x.dtype)), self._out(hi.to(x.dtype))


def _mse_of_shrink(f: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, c: float, bits: int,
                   symmetric: bool) -> torch.Tensor:
    """Per-row squared error of quantizing rows of ``f`` (C, N) on the range ``[c lo, c hi]``."""
    q = fake_quant_range(f, (c * lo)[:, None], (c * hi)[:, None], bits, symmetric)
    return ((f - q) ** 2).sum(dim=1)  # (C,)


class MSE(_Averaged):
    """Shrink factor of the min-max range minimising the squared error: grid, then golden-section refinement."""

    def _estimate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self._flat(x).float()
        lo, hi = torch.aminmax(f, dim=1)  # (C,)
        bits, sym = self.spec.bits, self.spec.symmetric
        k = self.spec.candidates
        grid = [(i + 1) / k for i in range(k)]
        losses = torch.stack([_mse_of_shrink(f, lo, hi, c, bits, sym) for c in grid])  # (k, C)
        best = losses.argmin(dim=0)  # (C,)
        cs = torch.empty(f.shape[0], dtype=torch.float64)
        invphi = (math.sqrt(5) - 1) / 2
        for ch in range(f.shape[0]):
            # golden-section search on the bracket around the best grid point
            a = max(grid[int(best[ch])] - 1.0 / k, 1e-4)
            b = min(grid[int(best[ch])] + 1.0 / k, 1.0)
            row, l_, h_ = f[ch:ch + 1], lo[ch:ch + 1], hi[ch:ch + 1]

            def loss(c: float) -> float:
                return float(_mse_of_shrink(row, l_, h_, c, bits, sym)[0])

            c1, c2 = b - invphi * (b - a), a + invphi * (b - a)
            f1, f2 = loss(c1), loss(c2)
            for _ in range(20):
                if f1 <= f2:
                    b, c2, f2 = c2, c1, f1
                    c1 = b - invphi * (b - a)
                    f1 = loss(c1)
                else:
                    a, c1, f1 = c1, c2, f2
                    c2 = a + invphi * (b - a)
                    f2 = loss(c2)
            c_gs = (a + b) / 2
            c_grid = grid[int(best[ch])]
            cs[ch] = c_gs if loss(c_gs) <= float(losses[int(best[ch]), ch]) else c_grid
        cs = cs.to(x.dtype)
        return self._out(cs * lo.to(x.dtype)), self._out(cs * hi.to(x.dtype))


class Histogram(RangeEstimator):
    """Histogram of all values seen; the range minimising the expected squared error over pairs of bin edges."""

    def __init__(self, spec: QuantSpec):
        super().__init__(spec)
        self.hist: torch.Tensor | None = None  # (C, bins) float64 counts
        self.edges_lo: torch.Tensor | None = None  # (C,)
        self.edges_hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        f = self._flat(x).double()
        lo, hi = torch.aminmax(f, dim=1)
        bins = self.spec.bins
        if self.hist is None:
            new_lo, new_hi = lo, torch.maximum(hi, lo + 1e-12)
            self.hist = torch.zeros(f.shape[0], bins, dtype=torch.float64)
        else:
            new_lo, new_hi = torch.minimum(self.edges_lo, lo), torch.maximum(self.edges_hi, hi)
            self.hist = self._rebin(self.hist, self.edges_lo, self.edges_hi, new_lo, new_hi)
        for ch in range(f.shape[0]):
            self.hist[ch] += torch.histc(f[ch], bins=bins, min=float(new_lo[ch]), max=float(new_hi[ch]))
        self.edges_lo, self.edges_hi = new_lo, new_hi
        self.lo, self.hi = self._out(new_lo.to(x.dtype)), self._out(new_hi.to(x.dtype))
        self._dtype = x.dtype

    @staticmethod
    def _rebin(hist: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, new_lo: torch.Tensor,
               new_hi: torch.Tensor) -> torch.Tensor:
        """Move counts onto a wider range by linear interpolation of the cumulative distribution."""
        c, bins = hist.shape
        out = torch.empty_like(hist)
        for ch in range(c):
            old_edges = torch.linspace(float(lo[ch]), float(hi[ch]), bins + 1, dtype=torch.float64)
            cdf = torch.cat([torch.zeros(1, dtype=torch.float64), hist[ch].cumsum(0)])
            new_edges = torch.linspace(float(new_lo[ch]), float(new_hi[ch]), bins + 1, dtype=torch.float64)
            out[ch] = torch.diff(_interp(new_edges, old_edges, cdf))
        return out

    def range(self, final: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max of the histogram while calibrating; the error-minimising range when ``final``."""
        if self.hist is None:
            raise RuntimeError("range estimator has seen no data")
        if not final:
            return self.lo, self.hi
        los, his = [], []
        for ch in range(self.hist.shape[0]):
            a, b = _best_histogram_range(self.hist[ch], float(self.edges_lo[ch]), float(self.edges_hi[ch]),
                                         self.spec.bits, self.spec.symmetric)
            los.append(a)
            his.append(b)
        lo = torch.tensor(los, dtype=self._dtype)
        hi = torch.tensor(his, dtype=self._dtype)
        return self._out(lo), self._out(hi)

    def reset(self) -> None:
        super().reset()
        self.hist = self.edges_lo = self.edges_hi = None


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` for increasing ``xp`` (constant extrapolation)."""
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-300)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def _best_histogram_range(hist: torch.Tensor, lo: float, hi: float, bits: int, symmetric: bool,
                          max_edges: int = 1025) -> tuple[float, float]:
    """Range minimising the expected squared error of a histogram (values at bin centres).

    For a candidate ``[a, b]`` with step ``s``: ``err = n_in s^2 / 12 + sum_{x < a} n (x - a)^2 +
    sum_{x > b} n (x - b)^2``, evaluated for all edge pairs at once with prefix sums of ``n``, ``n x``, ``n x^2``.
    """
    bins = hist.numel()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2  # (bins,)
    n = hist.double()
    # prefix sums over bins: P[k] = sum of the first k bins
    zero = torch.zeros(1, dtype=torch.float64)
    p0 = torch.cat([zero, n.cumsum(0)])
    p1 = torch.cat([zero, (n * centres).cumsum(0)])
    p2 = torch.cat([zero, (n * centres ** 2).cumsum(0)])
    step = max(1, math.ceil((bins + 1) / max_edges))
    ks = torch.arange(0, bins + 1, step)  # candidate edge indices
    if ks[-1] != bins:
        ks = torch.cat([ks, torch.tensor([bins])])
    edges = lo + (hi - lo) * ks.double() / bins  # (E,)
    levels = 2 ** bits - 1
    if symmetric:
        # one-parameter family [-m, m] (or [0, m] when nothing is negative): m over the candidate |edges|
        m = torch.unique(torch.cat([edges.abs(), torch.tensor([max(abs(lo), abs(hi))], dtype=torch.float64)]))
        m = m[m > 0]
        signed = lo < 0
        a = -m if signed else torch.zeros_like(m)
        s = m / (2 ** (bits - 1) - 1) if signed else m / levels
        return _eval_pairs(centres, n, p0, p1, p2, a, m, s, lo, hi, bins)
    ai, bi = torch.meshgrid(torch.arange(len(ks)), torch.arange(len(ks)), indexing="ij")
    keep = ai < bi
    a, b = edges[ai[keep]], edges[bi[keep]]
    s = (torch.clamp(b, min=0) - torch.clamp(a, max=0)) / levels
    return _eval_pairs(centres, n, p0, p1, p2, a, b, s, lo, hi, bins)


def _eval_pairs(centres: torch.Tensor, n: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, lo: float, hi: float,
                bins: int) -> tuple[float, float]:
    width = (hi - lo) / bins
    # number of bin centres below a / at most b
    ia = torch.clamp(torch.ceil((a - lo) / width - 0.5), 0, bins).long()
    ib = torch.clamp(torch.floor((b - lo) / width - 0.5) + 1, 0, bins).long()
    ib = torch.maximum(ib, ia)
    left = p2[ia] - 2 * a * p1[ia] + a * a * p0[ia]
    right = (p2[-1] - p2[ib]) - 2 * b * (p1[-1] - p1[ib]) + b * b * (p0[-1] - p0[ib])
    inside = (p0[ib] - p0[ia]) * s * s / 12
    err = left + right + inside
    k = int(torch.argmin(err))
    return float(a[k]), float(b[k])


ESTIMATOR_CLASSES = {"current_minmax": CurrentMinMax, "minmax": MinMax, "running_minmax": RunningMinMax,
                     "percentile": Percentile, "mse": MSE, "histogram": Histogram}


def make_estimator(spec: QuantSpec) -> RangeEstimator:
    """The range estimator a spec names."""
    return ESTIMATOR_CLASSES[spec.estimator](spec)
