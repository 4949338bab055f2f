"""Post-hoc transforms applied before calibration, exact in float: SmoothQuant and rotation of the residual stream.

**SmoothQuant** (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023) migrates the per-channel scale of a linear's input activation into its weight:

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T,      s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

and folds ``diag(s)^-1`` into the operation that produced X, so nothing is added to the graph:

- a **norm** whose output feeds only linears (pre-norm blocks: OPT's ``self_attn_layer_norm`` -> q/k/v and
  ``final_layer_norm`` -> fc1, Llama's ``input_layernorm`` -> q/k/v and ``post_attention_layernorm`` -> gate/up,
  ViT's ``layernorm_before`` / ``layernorm_after``): gain and bias divided by s (Gemma's ``x * (1 + w)``: ``1 + w``
  divided by s);
- the **value projection** in front of the attention's output projection (attention mixes tokens, never channels,
  so V's output channels can be rescaled and undone in the output projection's input columns).

Candidates are found from the model's own dataflow on a calibration batch (which linears read a norm's output
tensor), and each fold is kept only if the model's output is unchanged (relative error under ``1e-5`` on that
batch); a fold that would change it (a post-norm block such as BERT's, whose norm output also feeds the residual
sum) is undone and reported as not applicable, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..errors import require
from ..sites.observe import _is_norm
from .simulator import default_forward as _default_forward

ForwardFn = Callable[[nn.Module, Any], Any]
EXACT_TOL = 1e-5
_V_NAMES = ("v_proj", "value", "v_lin", "v")
_O_NAMES = ("o_proj", "out_proj", "out_lin", "o", "output.dense", "dense")


@dataclass
class Fold:
    """One migration: the producer (a norm or a value projection), the linears that read it, and what happened."""

    producer: str
    consumers: list[str]
    applied: bool = False
    why: str = ""
    max_scale: float | None = None
    min_scale: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report."""
        return {"producer": self.producer, "consumers": self.consumers, "applied": self.applied, "why": self.why,
                "scale_range": [self.min_scale, self.max_scale]}


@dataclass
class SmoothQuantResult:
    """What :func:`smoothquant` did to a model."""

    alpha: float
    folds: list[Fold] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report."""
        return {"transform": "smoothquant", "alpha": self.alpha, "applied": sum(f.applied for f in self.folds),
                "folds": [f.to_dict() for f in self.folds]}


def _output(y: Any) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(y, name, None) is not None:
            return getattr(y, name)
    return y[0] if isinstance(y, (tuple, list)) else y


def _dataflow(model: nn.Module, batches: list[Any], forward: ForwardFn
              ) -> tuple[dict[str, list[str]], dict[str, torch.Tensor]]:
    """(norm path -> linears that read its output tensor, linear path -> per-channel max |input|)."""
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # held for the forward, so no id is reused
    readers: dict[str, set[str]] = {}
    absmax: dict[str, torch.Tensor] = {}
    handles = []

    def norm_hook(path: str) -> Callable:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (path, out)

        return hook

    def linear_hook(path: str) -> Callable:
        def hook(m: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            src = produced.get(id(x))
            if src is not None and src[1] is x:
                readers.setdefault(src[0], set()).add(path)
            amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()  # (in_features,)
            absmax[path] = amax if path not in absmax else torch.maximum(absmax[path], amax)

        return hook

    for path, m in modules.items():
        if _is_norm(m):
            handles.append(m.register_forward_hook(norm_hook(path)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(linear_hook(path)))
    try:
        with torch.no_grad():
            for b in batches:
                produced.clear()
                forward(model, b)
        produced.clear()
    finally:
        for h in handles:
            h.remove()
    return {k: sorted(v) for k, v in readers.items()}, absmax


def _scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).float()  # (in_features,)
    s = act_absmax.clamp_min(1e-5) ** alpha / w_absmax.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp_min(1e-5)


def _snapshot(params: Iterable[torch.Tensor | None]) -> Callable[[], None]:
    """Copies of ``params`` (None skipped), and the function that puts them back."""
    saved = [(p, p.detach().clone()) for p in params if p is not None]

    def undo() -> None:
        with torch.no_grad():
            for p, v in saved:
                p.copy_(v)

    return undo


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> Callable[[], None]:
    """Divide the norm's output by s and multiply the linears' input columns by s; returns the undo."""
    undo = _snapshot([norm.weight, getattr(norm, "bias", None), *[lin.weight for lin in linears]])
    if "Gemma" in type(norm).__name__:  # x * (1 + w): scale 1 + w
        norm.weight.copy_((1.0 + norm.weight.float()) / s - 1.0)
    else:
        norm.weight.div_(s.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias.dtype))
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight.dtype))  # (out, in) * (in,)
    return undo


@torch.no_grad()
def _fold_value(v: nn.Linear, o: nn.Linear, s: torch.Tensor) -> Callable[[], None]:
    undo = _snapshot([v.weight, v.bias, o.weight])
    v.weight.div_(s[:, None].to(v.weight.dtype))  # (out=channels, in)
    if v.bias is not None:
        v.bias.div_(s.to(v.bias.dtype))
    o.weight.mul_(s.to(o.weight.dtype))
    return undo


def _value_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(value projection, output projection) paths of each attention block whose sizes match (no GQA)."""
    from .. import hf_compat

    modules = dict(model.named_modules())
    pairs = []
    for path, m in hf_compat.attention_modules(model):
        v = next((f"{path}.{n}" for n in _V_NAMES if isinstance(modules.get(f"{path}.{n}"), nn.Linear)), None)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        o = next((c for base in (path, parent) for n in _O_NAMES
                  if isinstance(modules.get(c := f"{base}.{n}" if base else n), nn.Linear)), None)
        if v and o and modules[v].out_features == modules[o].in_features:
            pairs.append((v, o))
    return pairs


def smoothquant(model: nn.Module, batches: Iterable[Any], alpha: float = 0.5,
                forward: ForwardFn = _default_forward) -> SmoothQuantResult:
    """Apply SmoothQuant to ``model`` in place (see the module docstring); exact in float by construction and
    checked fold by fold on the first batch.

    Args:
        batches: calibration batches (the training split): the per-channel input maxima come from them.
        alpha: migration strength in [0, 1] (0: nothing moves to the weights; 1: all of the activation's range).
    """
    require(isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0, f"SmoothQuant alpha {alpha} is outside [0, 1]",
            "pass e.g. smoothquant:0.5")
    batches = list(batches)
    require(len(batches) > 0, "SmoothQuant needs calibration batches", "pass --calib-batches >= 1")
    was = model.training
    model.eval()
    try:
        modules = dict(model.named_modules())
        readers, absmax = _dataflow(model, batches, forward)
        with torch.no_grad():
            ref = _output(forward(model, batches[0])).float()

        def exact() -> bool:
            with torch.no_grad():
                y = _output(forward(model, batches[0])).float()
            return float((y - ref).norm() / ref.norm().clamp_min(1e-30)) < EXACT_TOL

        res = SmoothQuantResult(float(alpha))
        for norm_path, lins in readers.items():
            fold = Fold(norm_path, lins)
            res.folds.append(fold)
            widths = {modules[p].in_features for p in lins}
            if len(widths) != 1 or any(p not in absmax for p in lins):
                fold.why = "readers of different widths"
                continue
            s = _scales(absmax[lins[0]], [modules[p].weight for p in lins], alpha)
            fold.min_scale, fold.max_scale = float(s.min()), float(s.max())
            undo = _fold_norm(modules[norm_path], [modules[p] for p in lins], s)
            if exact():
                fold.applied, fold.why = True, "folded into the norm's gain and bias"
            else:
                undo()
                fold.why = ("not exact here: the norm's output is used elsewhere too (a post-norm block's residual "
                            "sum), or a reader's weight is tied to another use")
        for v, o in _value_pairs(model):
            fold = Fold(v, [o])
            res.folds.append(fold)
            if o not in absmax:
                fold.why = "the output projection did not run"
                continue
            s = _scales(absmax[o], [modules[o].weight], alpha)
            fold.min_scale, fold.max_scale = float(s.min()), float(s.max())
            undo = _fold_value(modules[v], modules[o], s)
            if exact():
                fold.applied, fold.why = True, "folded into the value projection"
            else:
                undo()
                fold.why = "not exact here (a gate or a nonlinearity between V and the output projection)"
        return res
    finally:
        model.train(was)


def parse_transforms(text: str | None) -> list[tuple[str, float | None]]:
    """``"rotate,smoothquant:0.5"`` -> ``[("rotate", 0.0), ("smoothquant", 0.5)]`` (applied in that order; rotate's
    argument is the seed of its random signs); a one-line error for anything unknown or out of range."""
    out: list[tuple[str, float | None]] = []
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        name, _, arg = item.partition(":")
        require(name in ("smoothquant", "rotate"), f"unknown transform {name!r}",
                "use smoothquant[:ALPHA] and/or rotate[:SEED], e.g. rotate,smoothquant:0.5")
        if name == "rotate":
            require(arg == "" or arg.isdigit(), f"rotate's seed {arg!r} is not a non-negative integer",
                    "pass e.g. rotate:0")
            out.append((name, float(arg or 0)))
            continue
        try:
            alpha = float(arg) if arg else 0.5
        except ValueError:
            alpha = float("nan")
        require(0.0 <= alpha <= 1.0, f"SmoothQuant alpha {arg!r} is not a number in [0, 1]", "pass e.g. smoothquant:0.5")
        out.append((name, alpha))
    return out


# ---- rotations -----------------------------------------------------------------------------------------------------
@dataclass
class RotationResult:
    """What :func:`rotate` did: the residual stream (pre-norm RMSNorm decoders) and/or the per-head rotations."""

    kind: str  # "hadamard" (d a power of two: random signs times a Sylvester Hadamard) or "orthogonal" (random QR)
    dim: int  # residual width rotated (0: the residual stream was not rotated)
    layers: int  # layers whose residual stream was rotated
    seed: int
    heads_qk: int = 0  # attention modules whose queries and keys were rotated per head
    heads_vo: int = 0  # attention modules whose values (and the output projection's input) were rotated per head
    residual_why_not: str = ""  # why the residual stream was not rotated, when it was not

    def describe(self) -> str:
        """One line for the CLI and the reports."""
        parts = []
        if self.layers:
            parts.append(f"the residual stream of {self.layers} layers rotated by a random {self.kind} "
                         f"({self.dim} wide)")
        else:
            parts.append(f"residual stream not rotated ({self.residual_why_not})")
        parts.append(f"per-head rotations of queries/keys in {self.heads_qk} and of values/output-projection "
                     f"inputs in {self.heads_vo} attention modules")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report."""
        return {"transform": "rotate", "rotation": self.kind, "dim": self.dim, "layers": self.layers,
                "seed": self.seed, "heads_qk": self.heads_qk, "heads_vo": self.heads_vo,
                "residual_why_not": self.residual_why_not, "applied": self.layers + self.heads_qk + self.heads_vo,
                "description": self.describe()}


def random_rotation(d: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An orthogonal (d, d) float64 matrix: ``H diag(signs) / sqrt(d)`` (QuaRot's randomised Hadamard) when ``d`` is a
    power of two, else a random orthogonal matrix from the QR decomposition of a Gaussian matrix."""
    g = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:  # Sylvester: [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1  # (d,)
        return h * signs / d ** 0.5, "hadamard"
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "orthogonal"  # sign fix: a uniformly random rotation


def _relative_error(model: nn.Module, batch: Any, forward: ForwardFn, ref: torch.Tensor) -> float:
    with torch.no_grad():
        y = _output(forward(model, batch)).double()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def rotate(model: nn.Module, batch: Any, seed: int = 0, forward: ForwardFn = _default_forward) -> RotationResult:
    """Every rotation that is exact in float for this architecture, fused into its weights (checked on ``batch``):

    - the **residual stream** of a pre-norm decoder with RMSNorm (:func:`rotate_residual`; Llama, Qwen2, Mistral);
    - **per head**, in any attention (:func:`rotate_heads`): queries and keys by the same rotation (their dot
      product is unchanged; not with RoPE, which is checked), values by a rotation undone in the output
      projection's input columns (attention mixes tokens, never channels within a head; not with an elementwise
      output gate, which is checked).

    Post-norm encoders (BERT), LayerNorm models (OPT, ViT) and sandwich norms (Gemma-2/3) get the per-head
    rotations only: their residual stream cannot rotate exactly (the reason is in ``residual_why_not``). A model
    where nothing rotates exactly is a one-line error.
    """
    from ..errors import OutlierfreeError

    try:
        res = rotate_residual(model, batch, seed, forward)
    except OutlierfreeError as e:
        res = RotationResult("none", 0, 0, seed, residual_why_not=e.problem.split(": ", 1)[-1])
    res.heads_qk, res.heads_vo = rotate_heads(model, batch, seed, forward)
    if res.layers == 0 and res.heads_qk == 0 and res.heads_vo == 0:
        raise OutlierfreeError(f"no rotation is exact for {type(model).__name__} ({res.residual_why_not}; no "
                               f"attention module with rotatable heads)",
                               "use --transform smoothquant for this architecture")
    return res


_Q_NAMES = ("q_proj", "query", "q_lin", "q")
_K_NAMES = ("k_proj", "key", "k_lin", "k")


def rotate_heads(model: nn.Module, batch: Any, seed: int = 0, forward: ForwardFn = _default_forward
                 ) -> tuple[int, int]:
    """Rotate each attention head's queries and keys (``q_h R``, ``k_h R``: scores unchanged) and its values
    (``v_h R``, undone by ``W_o[:, h] R`` in the output projection), with one random rotation of the head size per
    head, fused into the projections' weights and biases. Each kind is kept only if the float output is unchanged
    on ``batch`` (RoPE breaks the first, an elementwise output gate the second) and undone otherwise. Returns the
    numbers of attention modules rotated: ``(queries/keys, values)``."""
    from .. import hf_compat

    modules = dict(model.named_modules())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _output(forward(model, batch)).double()
        qk, vo = [], []
        for path, attn in hf_compat.attention_modules(model):
            dims = hf_compat.attention_dims(attn)
            q = next((modules[f"{path}.{n}"] for n in _Q_NAMES if isinstance(modules.get(f"{path}.{n}"), nn.Linear)),
                     None)
            k = next((modules[f"{path}.{n}"] for n in _K_NAMES if isinstance(modules.get(f"{path}.{n}"), nn.Linear)),
                     None)
            width = dims.n_heads * dims.head_dim
            if q is not None and k is not None and q.out_features == k.out_features == width:  # no GQA
                qk.append((q, k, dims))
        vo = [(modules[v], modules[o], hf_compat.attention_dims(modules[v.rsplit(".", 1)[0]]))
              for v, o in _value_pairs(model)
              if hf_compat.is_attention_module(modules[v.rsplit(".", 1)[0]])]

        def block_rotation(dims: Any, i: int) -> torch.Tensor:
            # one rotation per head on the diagonal: (H * hd, H * hd)
            return torch.block_diag(*[random_rotation(dims.head_dim, seed * 7919 + i * 131 + h)[0]
                                      for h in range(dims.n_heads)])

        def rotate_out(lin: nn.Linear, r: torch.Tensor) -> None:  # output (x W^T + b) R  =>  W' = R^T W, b' = b R
            lin.weight.copy_((r.T @ lin.weight.double()).to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.copy_((lin.bias.double() @ r).to(lin.bias.dtype))

        done = []
        for kind, groups in (("qk", qk), ("vo", vo)):
            if not groups:
                done.append(0)
                continue
            undo = _snapshot([p for a, b, _ in groups for p in (a.weight, a.bias, b.weight, b.bias)])
            with torch.no_grad():
                for i, (a, b, dims) in enumerate(groups):
                    r = block_rotation(dims, i if kind == "qk" else i + 10_000)
                    rotate_out(a, r)
                    if kind == "qk":
                        rotate_out(b, r)  # the same rotation: q R (k R)^T = q k^T
                    else:  # the output projection reads the rotated context: W_o' = W_o R
                        b.weight.copy_((b.weight.double() @ r).to(b.weight.dtype))
            if _relative_error(model, batch, forward, ref) > 1e-4:
                undo()
                done.append(0)
            else:
                done.append(len(groups))
        return done[0], done[1]
    finally:
        model.train(was)


_BLOCK = {"attn": ("q_proj", "k_proj", "v_proj"), "out": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
          "mlp_out": ("down_proj",)}


def rotate_residual(model: nn.Module, batch: Any, seed: int = 0, forward: ForwardFn = _default_forward
                    ) -> RotationResult:
    """Rotate the residual stream of a pre-norm decoder with RMSNorm (Llama, Qwen2, Mistral) by a random orthogonal
    Q, fused into the weights as QuaRot (Ashkboos et al. 2024) and SpinQuant do: each norm's gain is folded into the
    linears that read it (the norm becomes scale-only, and ``RMSNorm(x Q) = RMSNorm(x) Q``), the embeddings and
    every linear that writes to the residual stream are multiplied by Q on their output side, every linear that
    reads it by Q on its input side. The float output is unchanged (checked on ``batch``; refused otherwise).

    Refused with a one-line error where the norm placement breaks the invariance: post-norm encoders (BERT),
    LayerNorm with mean subtraction and bias (OPT, ViT: they need SliceGPT's centring first), and sandwich norms
    applied to a block's output before the residual add (Gemma-2/3).
    """
    from ..errors import OutlierfreeError

    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "embed_tokens") or not hasattr(base, "norm"):
        raise OutlierfreeError(f"rotation does not apply to {type(model).__name__}: it needs a pre-norm decoder "
                               f"with RMSNorm (model.layers, embed_tokens, norm)",
                               "use --transform smoothquant for this architecture")
    for i, layer in enumerate(layers):
        names = set(dict(layer.named_children()))
        extra = names - {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
        extra_norms = [n for n in extra if _is_norm(getattr(layer, n))]
        if extra_norms:
            raise OutlierfreeError(f"rotation does not apply to {type(model).__name__}: layer {i} has norms on the "
                                   f"block outputs ({', '.join(sorted(extra_norms))}), which break its invariance",
                                   "use --transform smoothquant for this architecture")
        for n in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, n, None)
            if norm is None or getattr(norm, "bias", None) is not None or "Gemma" in type(norm).__name__ or \
                    isinstance(norm, nn.LayerNorm):
                raise OutlierfreeError(f"rotation does not apply to {type(model).__name__}: its {n} is not a "
                                       f"scale-only RMSNorm", "use --transform smoothquant for this architecture")
    head = getattr(model, "lm_head", None)
    emb = base.embed_tokens
    d = emb.weight.shape[1]
    q64, kind = random_rotation(d, seed)
    was = model.training
    model.eval()
    with torch.no_grad():
        ref = _output(forward(model, batch)).double()
    undo = _snapshot(list(model.parameters()))
    tied = head is not None and head.weight is emb.weight
    tie_flag = getattr(model.config, "tie_word_embeddings", None)
    try:
        with torch.no_grad():
            if tied:  # untie: the head takes the final norm's gain
                head.weight = nn.Parameter(head.weight.detach().clone())
                model.config.tie_word_embeddings = False

            def fold_gain(norm: nn.Module, readers: list[nn.Linear]) -> None:
                g = norm.weight.detach().double()
                for lin in readers:
                    lin.weight.copy_((lin.weight.double() * g).to(lin.weight.dtype))  # (out, in) * (in,)
                norm.weight.fill_(1.0)

            def read(lin: nn.Linear) -> None:  # y = (x Q) W'^T = x W^T  =>  W' = W Q
                lin.weight.copy_((lin.weight.double() @ q64).to(lin.weight.dtype))

            def write(lin: nn.Linear) -> None:  # out Q = x (Q^T W)^T  =>  W' = Q^T W, b' = b Q
                lin.weight.copy_((q64.T @ lin.weight.double()).to(lin.weight.dtype))
                if lin.bias is not None:
                    lin.bias.copy_((lin.bias.double() @ q64).to(lin.bias.dtype))

            for layer in layers:
                attn, mlp = layer.self_attn, layer.mlp
                fold_gain(layer.input_layernorm, [getattr(attn, n) for n in _BLOCK["attn"]])
                fold_gain(layer.post_attention_layernorm, [getattr(mlp, n) for n in _BLOCK["mlp_in"]])
                for n in _BLOCK["attn"]:
                    read(getattr(attn, n))
                for n in _BLOCK["mlp_in"]:
                    read(getattr(mlp, n))
                write(attn.o_proj)
                write(mlp.down_proj)
            if head is not None:
                fold_gain(base.norm, [head])
                read(head)
            emb.weight.copy_((emb.weight.double() @ q64).to(emb.weight.dtype))  # (V, d) rows are written vectors
            y = _output(forward(model, batch)).double()
        err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
        if err > 1e-4:
            raise OutlierfreeError(f"the rotation changed {type(model).__name__}'s float output (relative error "
                                   f"{err:.2g}), so it does not apply to this architecture",
                                   "use --transform smoothquant for this architecture")
    except BaseException:
        undo()  # every weight back, and the head tied again as it was
        if tied:
            head.weight = emb.weight
            model.config.tie_word_embeddings = tie_flag
        raise
    finally:
        model.train(was)
    return RotationResult(kind, d, len(layers), seed)
