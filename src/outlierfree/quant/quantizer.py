"""The per-tensor quantizer state: a range estimator and a fake quantizer on its grid (:mod:`.grid`), in
calibration or quantization mode, with the SQNR bookkeeping of the diagnostics."""

from __future__ import annotations

import torch

from .config import QuantSpec
from .estimators import RangeEstimator, make_estimator
from .grid import fake_quant_range, qparams


def _reduce_range(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Current min-max of ``x`` at a granularity, shaped to broadcast against ``x``."""
    if granularity == "per_token":
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # (..., 1)
    elif granularity == "per_channel":
        lo, hi = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)  # (C,)
        shape = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = lo.view(shape), hi.view(shape)
    else:
        lo, hi = torch.aminmax(x)
    return lo, hi


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or as is when it is float32 / float64 already."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class Quantizer:
    """Fake quantizer of one tensor site (an activation) or one weight.

    Modes: ``calibrate`` (static specs: update the range estimator with the tensor, then quantize with the current
    estimate, as the reference code does while estimating ranges), ``quantize`` (frozen range, or the tensor's own
    range when dynamic). Accumulates ``sum x^2`` and ``sum (x - q(x))^2`` for the site's SQNR when ``record``.
    """

    def __init__(self, spec: QuantSpec, name: str = ""):
        self.spec = spec
        self.name = name
        self.estimator: RangeEstimator = make_estimator(spec)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.frozen = False
        self.fixed = False  # a range given from outside (learned by QAT, see learned.py): calibration keeps it
        self.calls = 0
        self.values = 0  # elements quantized so far (the integer share of a mixed-precision model)
        self.record = False
        self.signal = 0.0  # sum of x^2 while recording
        self.noise = 0.0  # sum of (x - q(x))^2 while recording
        self.absmax = 0.0
        self.export = False  # True while exporting: quantize with the traceable torch op (see export_quant)
        self.tap = None  # optional callable(q): sees every quantized output (per-site parity checks)

    # ---- range ----------------------------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Update the range estimate with a calibration tensor (in float32 or float64, whatever its dtype); a
        ``fixed`` range is left as it is."""
        if self.fixed:
            return
        x = _wide(x.detach())
        self.estimator.update(x)
        self.lo, self.hi = self._shape(*self.estimator.range(final=False), x)

    def freeze(self) -> None:
        """Fix the range after calibration (runs the final search of the MSE / histogram estimators)."""
        if self.estimator.seen and not self.fixed:
            lo, hi = self.estimator.range(final=True)
            self.lo, self.hi = lo, hi
        self.frozen = True

    def _shape(self, lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.spec.granularity == "per_channel" and lo.dim() == 1:
            shape = (-1,) + (1,) * (x.dim() - 1)
            return lo.view(shape), hi.view(shape)
        return lo, hi

    def range_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range used to quantize ``x`` now: frozen (static) or ``x``'s own (dynamic)."""
        if self.spec.dynamic:
            if self.spec.estimator in ("current_minmax", "minmax", "running_minmax") or \
                    self.spec.granularity == "per_token":
                return _reduce_range(x.detach(), self.spec.granularity)
            est = make_estimator(self.spec)  # dynamic with a search estimator: search on this very tensor
            est.update(x.detach())
            return self._shape(*est.range(final=True), x)
        if self.lo is None:
            self.observe(x)  # a weight, or a site first met after calibration: its own range
        lo, hi = self.lo, self.hi
        if self.spec.granularity == "per_channel" and lo.dim() != x.dim():
            lo, hi = self._shape(lo.reshape(-1), hi.reshape(-1), x)
        return lo, hi

    # ---- quantization ---------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, calibrate: bool = False) -> torch.Tensor:
        """Fake-quantized ``x`` (and a range update first when ``calibrate`` and the spec is static)."""
        self.calls += 1
        self.values += x.numel()
        dtype, x = x.dtype, _wide(x)  # scale and zero point in float32 even for fp16 / bf16 tensors
        if calibrate and not self.spec.dynamic:
            self.observe(x)
        lo, hi = self.range_for(x)
        lo, hi = lo.to(x.dtype), hi.to(x.dtype)
        if self.export:
            q = self.export_quant(x, lo, hi).to(dtype)
        else:
            q = fake_quant_range(x, lo, hi, self.spec.bits, self.spec.symmetric).to(dtype)
        if self.record:
            with torch.no_grad():  # float32 sums (torch reduces pairwise), accumulated in Python floats
                xd = x.detach()
                self.signal += float(torch.sum(xd * xd, dtype=torch.float64) if xd.dtype == torch.float64
                                     else (xd * xd).sum())
                self.noise += float(((xd - q.detach().to(xd.dtype)) ** 2).sum())
                self.absmax = max(self.absmax, float(xd.abs().max()))
        if self.tap is not None:
            self.tap(q)
        return q

    def export_quant(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """Fake quantization as the single traceable op ``torch.fake_quantize_per_tensor_affine`` (per-channel
        weights: ``torch.fake_quantize_per_channel_affine`` along ``axis`` of ``x``, the channel dim of the tensor
        the ranges were taken from), which ONNX exporters turn into a QuantizeLinear/DequantizeLinear pair with this
        quantizer's scale(s) and zero point(s).

        Only what an 8-bit integer runtime represents: per-tensor or per-channel, static (frozen) ranges, 8 bits."""
        from ..errors import OutlierfreeError

        per_channel = self.spec.granularity == "per_channel" and lo.numel() > 1
        if self.spec.bits != 8 or self.spec.dynamic or (lo.numel() != 1 and not per_channel):
            raise OutlierfreeError(
                f"quantizer {self.name!r} ({self.spec.describe()}) has no 8-bit per-tensor static integer form",
                "export with --bits w8a8 and per-tensor, static ranges (the defaults)")
        scale, zp, qmin, qmax = qparams(lo, hi, self.spec.bits, self.spec.symmetric)
        if per_channel:  # one (scale, zero point) per channel: 1-D tensors, as the per-channel op wants them
            return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1).float(), zp.reshape(-1).to(torch.int32),
                                                          axis, qmin, qmax)
        # Python numbers: the exporter stores them as the QDQ pair's constant scale and zero point
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)

    def sqnr_db(self) -> float | None:
        """``10 log10(sum x^2 / sum (x - q(x))^2)`` over the recorded tensors (``inf`` when lossless)."""
        if self.signal == 0.0:
            return None
        if self.noise == 0.0:
            return float("inf")
        return 10.0 * float(torch.log10(torch.tensor(self.signal / self.noise, dtype=torch.float64)))

    def range_summary(self) -> dict:
        """JSON-friendly range (scalars for per-tensor ranges, min/max of per-channel ranges)."""
        if self.lo is None:
            return {"lo": None, "hi": None}
        return {"lo": float(self.lo.min()), "hi": float(self.hi.max())}
