"""The full-activation quantization simulator: ``quantize(model, config)`` on any Hugging Face model.

    qm = quantize(model, paper_w8a8())          # hooks in place; the model's parameters are never modified
    qm.calibrate(train_batches)                 # static activation ranges (running min-max over the batches)
    out = model(**batch)                        # fake-quantized forward (weights and every selected site)
    with qm.float_mode(): ref = model(**batch)  # the same model in float, without removing anything
    qm.remove()                                 # back to the untouched float model

Activation sites and weights come from the one site mechanism of :mod:`outlierfree.sites` (``observe``: module
hooks, attention internals, residual sums and weight interception); which of them are quantized is the config's
site set (:mod:`.sitesets`: ``paper``, ``full``, ``linear`` or kinds).

**A tensor is rounded at most once, by construction.** Every quantized tensor carries the name of its site, and the
op mode of :mod:`outlierfree.sites.opmode` carries that name through every operation that keeps values on the grid
(views, copies, ``transpose().contiguous()``, casts, splits, concatenation, scaling by a number). A site whose tensor
already lies on a grid is recorded as an alias of the site that quantized it and left alone.

**Calibration happens only inside** :meth:`QuantizedModel.calibrate`. With static activation ranges, a forward pass
before it is an error (run it inside :meth:`~QuantizedModel.float_mode` for a float reference), and a site first
met after calibration is an error that names it. Quantization parameters are computed in float32 (or float64) for
every input dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..errors import OutlierfreeError
from .. import hf_compat
from ..attention.interface import outlierfree_attention
from ..sites import Site, discover, grid_of, mark, observe
from .config import QuantConfig, QuantSpec
from .quantizer import Quantizer
from .sitesets import SiteSet

# the tensors the attention multiplies (Q K^T, P V); probabilities are >= 0, so their grid has zero point 0 anyway
ATTENTION_OPERANDS = frozenset({"query", "key", "value"})

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dict batches (labels dropped: losses are computed by the evaluator); an
    encoder-decoder (T5, BART) gets the input tokens as its decoder's tokens too, as ``analyze`` does."""
    if not isinstance(batch, dict):
        return model(batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "input_ids" in inputs:
        inputs.setdefault("decoder_input_ids", inputs["input_ids"])
    return model(**inputs)


def check_finite_weights(model: nn.Module) -> None:
    """One-line error if any parameter holds NaN or inf (quantization ranges would be meaningless)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise OutlierfreeError(f"parameter {name} of the model holds NaN or inf values",
                                   "use a checkpoint whose training did not diverge")


class QuantizedModel:
    """Handle of a model under simulated quantization (see the module docstring).

    Attributes:
        model: the wrapped model (unchanged parameters).
        config: the :class:`QuantConfig`.
        siteset: the :class:`~.sitesets.SiteSet` deciding which activations and weights are quantized.
        act: activation quantizers by site name (created on first sight, during calibration).
        aliases: site name -> name of the site that already quantized the same tensor.
        float_weights: parameter name -> why it stays float (every parameter the forward used and did not quantize).
        mode: ``idle`` (static ranges, not calibrated yet), ``calibrate``, ``quantize`` or ``float``.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, task: str | None = None):
        from ..data.evaluation import task_of

        check_finite_weights(model)
        self.model = model
        self.config = config
        self.task = task or task_of(model)
        self.siteset = SiteSet(model, config.sites, config.fp32_head, self.task, config.int8_head)
        self.act: dict[str, Quantizer] = {}
        self.site_of: dict[str, Site] = {}
        self.aliases: dict[str, str] = {}
        self.weights: dict[int, tuple[int, torch.Tensor, Quantizer]] = {}
        self.float_weights: dict[str, str] = {}
        self.static = config.activation is not None and not config.activation.dynamic
        self.mode = "idle" if self.static else "quantize"
        self.only: set[str] | None = None  # ablation: quantize only these activation sites
        self.weights_on = config.weight is not None
        self.calibrated = False
        self.export = False  # inside exporting(): quantizers emit traceable torch.fake_quantize_* ops
        self._late: list[str] = []  # sites first met after calibration, in the running forward
        # ranges learned by quantization-aware training (quant/learned.py), used where the spec matches
        from .learned import ranges_of

        learned = ranges_of(model)
        self.learned_act = learned.act if learned is not None and learned.act_matches(config.activation) else {}
        self.learned_weight = learned.weight if learned is not None and learned.weight_matches(config.weight) else {}
        self.learned_used: set[str] = set()  # sites and weights quantized on a learned range
        self.weight_override: dict[str, Any] = {}  # parameter name -> its LearnedQuantizer (QAT's trainable ones)
        self._stack = contextlib.ExitStack()
        self._attach()

    # ---- wiring ---------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        try:
            sites = [s for s in discover(self.model) if self.siteset.wants(s)] \
                if self.config.activation is not None else []
            self.observed = self._stack.enter_context(observe(
                self.model, self._site_fn, sites,
                residual=self.config.activation is not None and self.siteset.wants_residual(),
                weight_fn=self._weight_fn if self.config.weight is not None else None, grids=True))
            h = self.model.register_forward_hook(self._after_forward, always_call=True)
            self._stack.callback(h.remove)
        except BaseException:
            self._stack.close()
            raise

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._late:
            late, self._late = sorted(set(self._late)), []
            raise OutlierfreeError(
                f"{len(late)} quantization site(s) were first met after calibration: {', '.join(late[:4])}"
                + (" ..." if len(late) > 4 else ""),
                "calibrate on batches that take the same code paths as evaluation (same inputs and options)")

    @property
    def uninstrumented(self) -> list[str]:
        """Modules that computed a softmax outside transformers' attention interface: their attention internals
        (scores, probabilities, context) were not quantized."""
        mode = self.observed.mode
        return sorted(mode.uninstrumented) if mode is not None else []

    def remove(self) -> None:
        """Remove every hook and mode: the model is the float model again."""
        self._stack.close()

    def __enter__(self) -> "QuantizedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ---- activation sites -----------------------------------------------------------------------------------
    def _site_fn(self, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "float" or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        if self.mode == "idle":
            raise OutlierfreeError("the model ran a quantized forward pass before calibrate()",
                                   "call qm.calibrate(batches) first, or run float passes inside qm.float_mode()")
        g = grid_of(x)
        if g is not None:  # already rounded at an earlier site: never twice
            if g != site.name:
                self.aliases.setdefault(site.name, g)
                if self.config.symmetric_attention and site.kind in ATTENTION_OPERANDS and g in self.act:
                    self.act[g].spec = self._spec_for(site)  # e.g. the query projection's output grid
            return None
        if not self.siteset.wants(site):  # residual sums are offered whatever the set
            return None
        if self.only is not None and site.name not in self.only:
            return None
        q = self.act.get(site.name)
        if q is None:
            if self.mode != "calibrate" and self.static:
                self._late.append(site.name)
                return None
            q = self.act[site.name] = Quantizer(self._spec_for(site), site.name)
            if site.name in self.learned_act:  # learned by QAT: calibration leaves it as it is
                q.lo, q.hi = (t.clone() for t in self.learned_act[site.name])
                q.fixed = True
                self.learned_used.add(site.name)
            self.site_of[site.name] = site
            self.aliases.pop(site.name, None)
        return q(x, calibrate=self.mode == "calibrate")

    def _spec_for(self, site: Site) -> QuantSpec:
        """The activation spec of a site: the config's, made symmetric for the attention's matmul operands when
        ``config.symmetric_attention`` (so that OpenVINO's int8 attention kernel takes them)."""
        spec = self.config.activation
        if self.config.symmetric_attention and site.kind in ATTENTION_OPERANDS and not spec.symmetric:
            return replace(spec, symmetric=True)
        return spec

    # ---- weights --------------------------------------------------------------------------------------------
    def _weight_fn(self, path: str, func: str, pname: str, w: torch.Tensor) -> torch.Tensor | None:
        if not self.weights_on or self.mode == "float" or not w.is_floating_point():
            return None
        reason = self.siteset.weight_reason(path, func, pname, w)
        if reason is not None:
            self.float_weights.setdefault(pname, reason)
            return None
        own = self.weight_override.get(pname)
        if own is not None:  # a trainable (QAT) quantizer: fake quantization with gradients to w and its range
            if self.export:
                own.sync()  # its current learned range, frozen
                return mark(own.export_quant(w, own.lo, own.hi), pname)
            wq = own(w.t() if func == "addmm" else w)
            return mark(wq.t() if func == "addmm" else wq, pname)
        key = (id(w), func == "addmm")
        cached = self.weights.get(key)
        if cached is not None and cached[0] == w._version:
            if self.export:  # the parameter itself through a traceable QDQ: the exporter keeps it as an initializer
                # (per-channel ranges were taken on the (out, in) view: Conv1D's (in, out) weight has them on dim 1)
                return mark(cached[2].export_quant(w, cached[2].lo, cached[2].hi, 1 if func == "addmm" else 0), pname)
            return cached[1]
        spec: QuantSpec = self.config.weight
        if w.dim() == 1 and spec.granularity != "per_tensor":
            spec = replace(spec, granularity="per_tensor")  # a norm gain is one "channel"
        qz = Quantizer(spec, pname)
        if pname in self.learned_weight:  # learned by QAT: used instead of the weight's min-max
            qz.lo, qz.hi = (t.clone() for t in self.learned_weight[pname])
            qz.fixed = True
            self.learned_used.add(pname)
        src = w.detach().t() if func == "addmm" else w.detach()  # Conv1D: (in, out), channels on dim 1
        qz.observe(src)
        qz.freeze()
        with torch.no_grad():
            wq = qz(src)
            wq = mark(wq.t() if func == "addmm" else wq, pname)  # its lookups are on its grid already
        if w.requires_grad and torch.is_grad_enabled() and not self.export:
            return mark(w + (wq - w).detach(), pname)  # straight-through to the float weight
        self.weights[key] = (w._version, wq, qz)
        if self.export:
            return mark(qz.export_quant(w, qz.lo, qz.hi, 1 if func == "addmm" else 0), pname)
        return wq

    def set_bits(self, names: Iterable[str], bits: int) -> dict[str, QuantSpec]:
        """Quantize the given (calibrated) activation sites with ``bits`` on their frozen ranges from now on, e.g.
        16-bit exceptions; returns their previous specs (pass them to :meth:`restore_specs` to undo)."""
        saved = {n: self.act[n].spec for n in names if n in self.act}
        for n, spec in saved.items():
            self.act[n].spec = replace(spec, bits=bits)
        return saved

    def restore_specs(self, saved: dict[str, QuantSpec]) -> None:
        """Undo :meth:`set_bits`."""
        for n, spec in saved.items():
            self.act[n].spec = spec

    # ---- modes ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def float_mode(self) -> Iterator[None]:
        """Run the model in float (nothing quantized) inside the block."""
        prev = self.mode
        self.mode = "float"
        try:
            yield
        finally:
            self.mode = prev

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """Inside the block, every activation and weight quantizer computes its fake quantization with
        ``torch.fake_quantize_per_tensor_affine`` (same scale, zero point and grid), which ONNX exporters turn into
        QuantizeLinear/DequantizeLinear pairs. Needs a calibrated model whose weights were met in a quantized
        forward (their quantizers are reused). Outside the block the numerics are untouched."""
        if self.static and not self.calibrated:
            raise OutlierfreeError("export needs a calibrated model", "call qm.calibrate(batches) first")
        prev = self.export
        self.export = True
        for q in self.act.values():
            q.export = True
        try:
            yield
        finally:
            self.export = prev
            for q in self.act.values():
                q.export = prev

    @contextlib.contextmanager
    def only_sites(self, names: Iterable[str], weights: bool = False) -> Iterator[None]:
        """Quantize only the given activation sites (and the weights if ``weights``): the ablation."""
        prev = (self.only, self.weights_on)
        self.only = set(names)
        self.weights_on = weights and self.config.weight is not None
        try:
            yield
        finally:
            self.only, self.weights_on = prev

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Accumulate each site's quantization error (for its SQNR) inside the block."""
        for q in self.act.values():
            q.record = True
        try:
            yield
        finally:
            for q in self.act.values():
                q.record = False

    def calibrate(self, batches: Iterable[Any], forward: ForwardFn = default_forward, progress: bool = True,
                  total: int | None = None) -> int:
        """Estimate static activation ranges on ``batches``, then freeze them. Returns the number of batches.

        As in the reference code, each site quantizes with its current estimate while calibrating, so later
        sites see the quantized tensors of earlier ones.
        """
        from ..records import track

        self.mode = "calibrate"
        n = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in track(batches, "calibrating", total=total, enabled=progress):
                    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
                    if isinstance(mask, torch.Tensor) and not bool(mask.any()):
                        raise OutlierfreeError(f"calibration batch {n} holds padding only (its attention_mask is "
                                               f"all zeros)", "calibrate on batches with real tokens")
                    forward(self.model, batch)
                    n += 1
        finally:
            self.model.train(was_training)
        if n == 0:
            self.mode = "idle"
            raise OutlierfreeError("calibration got no batches", "pass one or more calibration batches")
        if self.static and not self.act:
            self.mode = "idle"
            raise OutlierfreeError(f"the site set {self.siteset.name!r} matched no activation of "
                                   f"{type(self.model).__name__}", "pass another --sites (paper, full, linear)")
        for q in self.act.values():
            q.freeze()
        self.mode = "quantize"
        self.calibrated = True
        return n

    # ---- reporting ------------------------------------------------------------------------------------------
    def sites_table(self) -> list[dict[str, Any]]:
        """One row per quantized activation site: name, kind, layer, range, SQNR (if recorded), aliases."""
        back: dict[str, list[str]] = {}
        for a, b in self.aliases.items():
            back.setdefault(b, []).append(a)
        rows = []
        for name, q in self.act.items():
            s = self.site_of[name]
            rows.append({"site": name, "kind": s.kind, "layer": s.layer, **q.range_summary(),
                         "absmax": q.absmax or None, "sqnr_db": q.sqnr_db(), "aliases": sorted(back.get(name, []))})
        return rows

    def weight_table(self) -> list[dict[str, Any]]:
        """One row per weight the forward used: quantized ones with their range, float ones with the reason."""
        rows = [{"weight": qz.name, "quantized": True, **qz.range_summary()} for _, (_, _, qz) in self.weights.items()]
        rows += [{"weight": n, "quantized": False, "why": why} for n, why in sorted(self.float_weights.items())]
        return rows


def quantize(model: nn.Module, config: QuantConfig, task: str | None = None) -> QuantizedModel:
    """Put ``model`` under simulated quantization (hooks only; see :class:`QuantizedModel`).

    Works on any Hugging Face model whose attention goes through transformers' attention interface (BERT, OPT,
    ViT, Llama, Gemma, ...): the attention is switched to the ``outlierfree`` implementation, which materialises
    the probabilities when they are quantized.
    """
    if not isinstance(model, nn.Module):
        raise OutlierfreeError(f"quantize() needs a torch module, got {type(model).__name__}",
                               "pass a loaded Hugging Face model")
    hf_compat.register(outlierfree_attention)
    return QuantizedModel(model, config, task)
