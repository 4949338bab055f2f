"""Learned quantization ranges (LSQ+-style) for quantization-aware training, and how they travel with a checkpoint.

**The quantizer.** A static range ``[lo, hi]`` gives the grid of :func:`.quantizer.qparams`; here both ends are
trainable. The forward is exactly the simulator's fake quantization on that grid (same scale, zero point and
clipping), so a range learned here and frozen later quantizes the same way in the simulator and in the exported
ONNX model. The backward is LSQ's (Esser et al. 2020, "Learned Step Size Quantization") extended to an offset as in
LSQ+ (Bhalgat et al. 2020): rounding passes its gradient straight through, both for ``x / scale`` and for the zero
point ``-lo / scale``, and the clamp to the integer grid cuts the gradient of clipped values. With
``q = (clamp(round(x/s) + z) - z) * s`` this gives, per element,

    dq/dx = 1 inside the grid, 0 where clipped (the clipped straight-through estimator);
    dq/ds = round(x/s) - x/s inside, (qmin or qmax) - z where clipped (LSQ's step-size gradient);
    dq/dz = 0 inside, -s where clipped (LSQ+'s offset gradient)

and ``s``, ``z`` are differentiable functions of ``lo`` and ``hi``. The range is parameterised **relative to its
calibrated start**, ``lo = lo0 * a``, ``hi = hi0 * b`` with ``a = b = 1`` at first, so one learning rate suits a
softmax probability (range ~1) and a residual sum (range ~100s): Adam's steps are relative changes of the range.
Symmetric grids (weights) learn one factor for ``max(|lo|, hi)``. Per-channel weight ranges learn one factor per
output channel.

**On disk.** ``save_ranges(dir, ...)`` writes ``quant_ranges.safetensors`` (``act/<site>/lo``, ``act/<site>/hi``,
``weight/<parameter>/lo``, ``weight/<parameter>/hi``) and ``quant_ranges.json`` (the specs and site set they were
learned with). :func:`outlierfree.quant.run.load_for_quant` attaches them to the loaded model, and the simulator
(:class:`~.simulator.QuantizedModel`) uses a learned range instead of calibrating that site or weight whenever the
quantization spec matches the one it was learned with (bits, symmetric, granularity; static activations), so
``quantize``, ``export`` and ``doctor`` use them without a flag.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import OutlierfreeError
from .config import QuantSpec
from .grid import EPS, int_range
from .quantizer import Quantizer

RANGES_FILE = "quant_ranges.safetensors"
RANGES_JSON = "quant_ranges.json"
LEARNED_ATTR = "_outlierfree_learned_ranges"  # a loaded model's learned ranges (plain attribute, not a buffer)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def learned_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, signed: bool,
                    round_fn: Any = ste_round) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Differentiable :func:`.quantizer.qparams`: ``(scale, zero_point, qmin, qmax)`` with gradients to ``lo``/``hi``.

    Forward values equal ``qparams``'s; ``signed`` fixes the symmetric grid's sign (decided once at calibration, so
    the grid does not flip while the range learns). ``round_fn`` rounds the zero point (the STE by default; the
    identity gives the smooth surrogate that gradcheck can differentiate numerically)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=EPS)
    if symmetric:
        qmin, qmax = int_range(bits, True, signed)
        scale = torch.clamp(torch.maximum(-lo, hi) / qmax, min=EPS)
        return scale, torch.zeros_like(scale), qmin, qmax
    qmin, qmax = int_range(bits, False)
    scale = torch.clamp((hi - lo) / qmax, min=EPS)
    zero_point = torch.clamp(round_fn(-lo / scale), qmin, qmax)
    return scale, zero_point, qmin, qmax


def lsq_fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                   signed: bool = True, round_fn: Any = ste_round) -> torch.Tensor:
    """Fake-quantize ``x`` on the grid of ``[lo, hi]`` with gradients to ``x``, ``lo`` and ``hi`` (see the module
    docstring); ``lo``/``hi`` are scalars or broadcast against ``x`` (per-channel: shape (C, 1, ...))."""
    scale, zp, qmin, qmax = learned_qparams(lo, hi, bits, symmetric, signed, round_fn)
    y = round_fn(x / scale)
    y = torch.clamp(y + zp, qmin, qmax)  # clamp's own gradient zeroes the clipped entries (for x)
    return (y - zp) * scale


class LearnedRange(nn.Module):
    """A trainable range ``lo = lo0 * a``, ``hi = hi0 * b`` (``a``, ``b`` start at 1; one factor when symmetric).

    ``lo0``/``hi0`` are buffers (the calibrated start), so the module's state dict holds everything a resumed run
    needs."""

    def __init__(self, lo0: torch.Tensor, hi0: torch.Tensor, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.register_buffer("lo0", lo0.detach().float().clone())
        self.register_buffer("hi0", hi0.detach().float().clone())
        self.signed = bool((self.lo0 < 0).any())  # the symmetric grid's sign, fixed at calibration
        self.b = nn.Parameter(torch.ones_like(self.hi0))
        self.a = None if spec.symmetric else nn.Parameter(torch.ones_like(self.lo0))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(lo, hi)`` (differentiable)."""
        if self.spec.symmetric:  # one factor scales max(|lo|, hi); lo keeps its sign (0 for an unsigned grid)
            m = torch.maximum(-self.lo0, self.hi0) * self.b
            return (-m if self.signed else torch.zeros_like(m)), m
        return self.lo0 * self.a, self.hi0 * self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized on the current range (per-channel ranges broadcast along dim 0)."""
        lo, hi = self.range()
        if lo.dim() == 1 and x.dim() > 1:
            shape = (-1,) + (1,) * (x.dim() - 1)
            lo, hi = lo.view(shape), hi.view(shape)
        dtype = x.dtype
        xw = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return lsq_fake_quant(xw, lo.to(xw.dtype), hi.to(xw.dtype), self.spec.bits, self.spec.symmetric,
                              self.signed).to(dtype)

    def frozen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current range, detached, in float32."""
        lo, hi = self.range()
        return lo.detach().float().clone(), hi.detach().float().clone()


class LearnedQuantizer(Quantizer):
    """A simulator quantizer whose static range is a :class:`LearnedRange`: trainable while gradients are on, the
    plain (frozen-range) fake quantization otherwise, so evaluation and export see exactly the learned grid."""

    def __init__(self, base: Quantizer, learned: LearnedRange):
        super().__init__(base.spec, base.name)
        self.learned = learned
        self.frozen = True
        self.fixed = True
        self.sync()

    def sync(self) -> None:
        """Copy the learned range into ``lo``/``hi`` (what evaluation, export and reports read)."""
        self.lo, self.hi = self.learned.frozen()

    def __call__(self, x: torch.Tensor, calibrate: bool = False) -> torch.Tensor:
        """Trainable fake quantization under autograd, else the frozen-range one of :class:`Quantizer`."""
        if torch.is_grad_enabled() and not self.export:
            self.calls += 1
            self.values += x.numel()
            q = self.learned(x)
            if self.tap is not None:
                self.tap(q)
            return q
        self.sync()
        return super().__call__(x, calibrate=False)


# ---- what is saved with a checkpoint -------------------------------------------------------------------------
@dataclass
class LearnedRanges:
    """Ranges learned for activation sites (by site name) and weights (by parameter name), with the specs and the
    site set they were learned with."""

    act: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    weight: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    act_spec: QuantSpec | None = None
    weight_spec: QuantSpec | None = None
    sites: str = "paper"
    info: dict[str, Any] = field(default_factory=dict)

    def act_matches(self, spec: QuantSpec | None) -> bool:
        """Whether the learned activation ranges apply to activations quantized with ``spec``."""
        return spec is not None and self.act_spec is not None and not spec.dynamic and _same_grid(spec, self.act_spec)

    def weight_matches(self, spec: QuantSpec | None) -> bool:
        """Whether the learned weight ranges apply to weights quantized with ``spec``."""
        return spec is not None and self.weight_spec is not None and _same_grid(spec, self.weight_spec)


def _same_grid(a: QuantSpec, b: QuantSpec) -> bool:
    return a.bits == b.bits and a.symmetric == b.symmetric and a.granularity == b.granularity


def save_ranges(directory: str | Path, ranges: LearnedRanges) -> None:
    """Write ``quant_ranges.safetensors`` and ``quant_ranges.json`` into ``directory`` (a model directory being
    written: call it inside :func:`outlierfree.models.io.save_model`'s temporary directory or before the rename)."""
    from safetensors.torch import save_file

    from ..records import dumps

    d = Path(directory)
    tensors = {}
    for kind, table in (("act", ranges.act), ("weight", ranges.weight)):
        for name, (lo, hi) in table.items():
            tensors[f"{kind}/{name}/lo"] = lo.detach().float().contiguous().reshape(lo.shape)
            tensors[f"{kind}/{name}/hi"] = hi.detach().float().contiguous().reshape(hi.shape)
    save_file(tensors, str(d / RANGES_FILE))
    meta = {"act_spec": asdict(ranges.act_spec) if ranges.act_spec else None,
            "weight_spec": asdict(ranges.weight_spec) if ranges.weight_spec else None,
            "sites": ranges.sites, "activation_ranges": len(ranges.act), "weight_ranges": len(ranges.weight),
            "how": "LSQ+-style learned ranges (outlierfree finetune); see outlierfree/quant/learned.py",
            **ranges.info}
    (d / RANGES_JSON).write_text(dumps(meta) + "\n")


def load_ranges(directory: str | Path) -> LearnedRanges | None:
    """The learned ranges saved beside a model, or None when there are none. A half-present or unreadable pair is a
    one-line error."""
    import json

    from safetensors.torch import load_file

    d = Path(directory)
    if d.is_file():
        d = d.parent
    st, js = d / RANGES_FILE, d / RANGES_JSON
    if not st.is_file() and not js.is_file():
        return None
    if not (st.is_file() and js.is_file()):
        raise OutlierfreeError(f"{str(d)!r} holds only one of {RANGES_FILE} and {RANGES_JSON}",
                               "copy both files (or delete both to calibrate ranges again)")
    try:
        meta = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as e:  # corrupt JSON or safetensors header
        raise OutlierfreeError(f"the learned quantization ranges in {str(d)!r} are unreadable ({type(e).__name__})",
                               f"delete {RANGES_FILE} and {RANGES_JSON} to calibrate ranges again") from e
    out = LearnedRanges(act_spec=QuantSpec(**meta["act_spec"]) if meta.get("act_spec") else None,
                        weight_spec=QuantSpec(**meta["weight_spec"]) if meta.get("weight_spec") else None,
                        sites=meta.get("sites", "paper"))
    for key, t in tensors.items():
        kind, _, rest = key.partition("/")
        name, _, end = rest.rpartition("/")
        table = out.act if kind == "act" else out.weight
        lo, hi = table.get(name, (None, None))
        table[name] = (t, hi) if end == "lo" else (lo, t)
    return out


def attach_ranges(model: nn.Module, ranges: LearnedRanges | None) -> None:
    """Let every simulator later put on ``model`` use ``ranges`` (None removes them)."""
    if ranges is None:
        model.__dict__.pop(LEARNED_ATTR, None)
    else:
        model.__dict__[LEARNED_ATTR] = ranges


def ranges_of(model: nn.Module) -> LearnedRanges | None:
    """The learned ranges attached to ``model``, if any."""
    return model.__dict__.get(LEARNED_ATTR)


# ---- quantization-aware training -----------------------------------------------------------------------------
def make_trainable(qm: Any) -> tuple[nn.ModuleDict, dict[str, tuple[str, str]]]:
    """Replace the static quantizers of a calibrated :class:`~.simulator.QuantizedModel` by trainable ones, starting
    from their calibrated ranges: every static activation site, and every weight a forward has quantized.

    Returns ``(ranges, names)``: the :class:`LearnedRange` modules (keys ``a<i>`` for sites, ``w<i>`` for weights,
    in sorted name order, so two runs build the same module and a checkpoint loads into either) and
    ``key -> ("act"|"weight", site or parameter name)``. Put ``ranges`` beside the model in what the optimizer and
    the checkpoint see."""
    ranges, names = nn.ModuleDict(), {}
    for i, name in enumerate(sorted(qm.act)):
        q = qm.act[name]
        if q.spec.dynamic or q.lo is None:
            continue
        lr = LearnedRange(q.lo.reshape(()), q.hi.reshape(()), q.spec)
        ranges[f"a{i}"], names[f"a{i}"] = lr, ("act", name)
        qm.act[name] = LearnedQuantizer(q, lr)
    weights = sorted({qz.name: qz for _, _, qz in qm.weights.values()}.items())
    for j, (pname, qz) in enumerate(weights):
        per_channel = qz.spec.granularity == "per_channel"
        lo, hi = (qz.lo.reshape(-1), qz.hi.reshape(-1)) if per_channel else (qz.lo.reshape(()), qz.hi.reshape(()))
        lr = LearnedRange(lo, hi, qz.spec)
        ranges[f"w{j}"], names[f"w{j}"] = lr, ("weight", pname)
        qm.weight_override[pname] = LearnedQuantizer(qz, lr)
    return ranges, names


def collect(ranges: nn.ModuleDict, names: dict[str, tuple[str, str]], config: Any,
            info: dict[str, Any] | None = None) -> LearnedRanges:
    """The current learned ranges as a :class:`LearnedRanges` (what :func:`save_ranges` writes); ``config`` is the
    :class:`~.config.QuantConfig` they were learned under."""
    sites = config.sites if isinstance(config.sites, str) else "+".join(config.sites)
    grids = {"symmetric_attention": config.symmetric_attention,
             "int8_head": config.int8_head}  # recorded (quant_ranges.json) for the reader
    out = LearnedRanges(act_spec=config.activation, weight_spec=config.weight, sites=sites,
                        info={**grids, **dict(info or {})})
    for key, (kind, name) in names.items():
        (out.act if kind == "act" else out.weight)[name] = ranges[key].frozen()
    return out
