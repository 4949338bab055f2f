"""The full-activation quantization simulator: ``quantize(model, config)`` on any Hugging Face model.

    qm = quantize(model, paper_w8a8())          # hooks in place; the model's parameters are never modified
    qm.calibrate(train_batches)                 # static activation ranges (running min-max over the batches)
    out = model(**batch)                        # fake-quantized forward (weights and every activation site)
    with qm.float_mode(): ref = model(**batch)  # the same model in float, without removing anything
    qm.remove()                                 # back to the untouched float model

Activation sites are those of :mod:`outlierfree.sites` (module inputs/outputs and attention internals, through
``observe``) plus the residual and embedding sums found by :mod:`.trace`. A tensor is quantized at most once, at the
first site where it appears: the query projection's output is also the attention ``query`` site, a LayerNorm's
output is also the next linear's input, a residual sum is also the next LayerNorm's input. Later sites that receive
the same storage (a view or the tensor itself) are recorded as aliases of the first and left alone, so that no
tensor is rounded twice onto two slightly different grids.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from ..errors import OutlierfreeError
from ..models import hf_compat
from ..sites.core import Site, discover, observe, select
from .config import QuantConfig
from .quantizer import Quantizer
from .trace import RESIDUAL_KIND, intercept

ForwardFn = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dict batches (labels dropped: losses are computed by the evaluator)."""
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


def head_paths(model: nn.Module) -> set[str]:
    """Module paths of the task head (the LM head / classifier whose input is the ``head_input`` site)."""
    return {s.module for s in discover(model, attention=False) if s.kind == "head_input"}


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
        act: activation quantizers by site name (created on first sight, during calibration).
        aliases: site name -> name of the site that already quantized the same tensor.
        mode: ``calibrate``, ``quantize`` or ``float``.
    """

    def __init__(self, model: nn.Module, config: QuantConfig):
        check_finite_weights(model)
        self.model = model
        self.config = config
        self.heads = head_paths(model)
        self.act: dict[str, Quantizer] = {}
        self.site_of: dict[str, Site] = {}
        self.aliases: dict[str, str] = {}
        self.weights: dict[int, tuple[int, torch.Tensor, Quantizer]] = {}
        self.weight_names: dict[int, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.weight_names.setdefault(id(p), n)  # a tied weight keeps its first (owning) name
        self.mode = "quantize" if (config.activation is None or config.activation.dynamic) else "calibrate"
        self.only: set[str] | None = None  # ablation: quantize only these activation sites
        self.weights_on = config.weight is not None
        self.calibrated = False
        self._recent: deque = deque(maxlen=64)  # (tensor, version) of the latest quantized outputs
        self._recent_keys: dict[tuple, tuple[torch.Tensor, int, str]] = {}
        self._stack = contextlib.ExitStack()
        self._attach()

    # ---- which sites ----------------------------------------------------------------------------------------
    def _site_kinds(self) -> set[str] | None:
        s = self.config.sites
        if s == "full":
            return None
        if s == "linear":
            return {"linear_input", "head_input"}
        return set(s)

    def _static_sites(self) -> list[Site]:
        kinds = self._site_kinds()
        sites = discover(self.model)
        if kinds is not None:
            sites = select(sites, tuple(kinds))
        if self.config.fp32_head:
            sites = [s for s in sites if s.kind != "head_input"]
        # a linear's input in `linear` mode also counts for the attention output / ffn output projections:
        # discover names only their *outputs* specially, their inputs are linear_input already
        return sites

    def _want_residual(self) -> bool:
        kinds = self._site_kinds()
        return self.config.activation is not None and (kinds is None or RESIDUAL_KIND in kinds)

    def _attach(self) -> None:
        try:
            if self.config.activation is not None:
                sites = self._static_sites()
                self._stack.enter_context(observe(self.model, self._site_fn, sites))
            add_fn = self._site_fn if self._want_residual() else None
            weight_fn = self._weight_fn if self.config.weight is not None else None
            self.interceptor = self._stack.enter_context(intercept(self.model, weight_fn, add_fn))
            self._stack.enter_context(self._clear_recent_per_forward())
        except BaseException:
            self._stack.close()
            raise

    @contextlib.contextmanager
    def _clear_recent_per_forward(self) -> Iterator[None]:
        def clear(*_: Any) -> None:
            self._recent.clear()
            self._recent_keys.clear()

        h1 = self.model.register_forward_pre_hook(clear)
        h2 = self.model.register_forward_hook(clear, always_call=True)
        try:
            yield
        finally:
            h1.remove()
            h2.remove()

    def remove(self) -> None:
        """Remove every hook and mode: the model is the float model again."""
        self._stack.close()

    def __enter__(self) -> "QuantizedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ---- activation sites -----------------------------------------------------------------------------------
    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), t.device.type)

    def _site_fn(self, site: Site, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "float" or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        self.interceptor.busy = True
        try:
            key = self._key(x)
            hit = self._recent_keys.get(key)
            if hit is not None and hit[0]._version == hit[1]:
                if hit[2] != site.name:
                    self.aliases.setdefault(site.name, hit[2])
                return None
            if self.only is not None and site.name not in self.only:
                return None
            q = self.act.get(site.name)
            if q is None:
                if self.mode != "calibrate" and not self.config.activation.dynamic:
                    return None  # never a first site during calibration (an alias there): leave it
                q = self.act[site.name] = Quantizer(self.config.activation, site.name)
                self.site_of[site.name] = site
                self.aliases.pop(site.name, None)
            out = q(x, calibrate=self.mode == "calibrate")
            self._remember(out, site.name)
            return out
        finally:
            self.interceptor.busy = False

    def _remember(self, t: torch.Tensor, name: str) -> None:
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            self._recent_keys.pop(self._key(old), None)
        self._recent.append(t)
        self._recent_keys[self._key(t)] = (t, t._version, name)

    # ---- weights --------------------------------------------------------------------------------------------
    def _weight_fn(self, path: str, func: str, w: torch.Tensor) -> torch.Tensor | None:
        if not self.weights_on or self.mode == "float":
            return None
        if self.config.fp32_head and path in self.heads:
            return None
        if self.config.sites == "linear" and func != "linear":
            return None  # the common libraries quantize Linear weights only
        self.interceptor.busy = True
        try:
            cached = self.weights.get(id(w))
            if cached is not None and cached[0] == w._version:
                return cached[1]
            name = self.weight_names.get(id(w), path + ".weight")
            qz = Quantizer(self.config.weight, name)
            qz.observe(w)
            qz.freeze()
            with torch.no_grad():
                wq = qz(w.detach())
            if w.requires_grad and torch.is_grad_enabled():
                wq = w + (wq - w).detach()  # straight-through to the float weight
            else:
                self.weights[id(w)] = (w._version, wq, qz)
            return wq
        finally:
            self.interceptor.busy = False

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
        from .progress import track

        self.mode = "calibrate"
        n = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in track(batches, "calibrating", total=total, enabled=progress):
                    forward(self.model, batch)
                    n += 1
        finally:
            self.model.train(was_training)
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
        """One row per quantized weight: name, range, SQNR of the weight itself."""
        rows = []
        for _, (_, wq, qz) in self.weights.items():
            rows.append({"weight": qz.name, **qz.range_summary()})
        return rows


def quantize(model: nn.Module, config: QuantConfig) -> QuantizedModel:
    """Put ``model`` under simulated quantization (hooks only; see :class:`QuantizedModel`).

    Works on any Hugging Face model whose attention goes through transformers' attention interface (BERT, OPT,
    ViT, Llama, Gemma, ...): the attention is switched to the ``outlierfree`` implementation, which materialises
    the probabilities when they are quantized.
    """
    if not isinstance(model, nn.Module):
        raise OutlierfreeError(f"quantize() needs a torch module, got {type(model).__name__}",
                               "pass a loaded Hugging Face model")
    hf_compat.register()
    return QuantizedModel(model, config)
