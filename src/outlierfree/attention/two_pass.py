"""Softmax in two passes over memory: "The Two-Pass Softmax Algorithm" (Dukhan & Ablavatski, 2020), and the
three-pass and online forms it is measured against, all with one interface.

Each exp(x) is kept as a pair of floats, a mantissa and an exponent (range reduction of x * log2(e)):

    n = round(x log2 e),   t = x - n ln2 (|t| <= ln2 / 2),   m = exp(t),   exp(x) = m * 2^n

    pass 1 (reads x):            E = max_i n_i,   M = sum_i m_i 2^(n_i - E)   (folded element by element: the exponents
                                 combine by max, the mantissas are rescaled by powers of two; no max pass, no overflow)
    pass 2 (reads x, writes y):  y_i = m_i * (1 / M) * 2^(n_i - E) = exp(x_i - log-sum-exp)

so softmax costs two reads and one write of the row, against three reads and two writes for the three-pass form
(max; y = exp(x - max) and its sum; y /= sum). The online form (Milakov & Gimelshein, 2018) also makes two passes
but needs two exps per element in its first (the running max rescales the sum).

The forms run as compiled C++ (attention/csrc/row_softmax.cpp, vectorised with the compiler's auto-vectoriser and
threaded with OpenMP over ``torch.get_num_threads()`` threads; see attention/native.py) or, without a compiler or
off the CPU, as the same maths in torch operations (``backend="torch"``). Exactness: every finite input, against
``torch.softmax`` within 1e-6 relative (float32) / 1e-12 (float64); rows whose max lies outside [-2^21, 2^21] (where
the reduction x log2 e -> (n, t) loses bits) and rows of only -inf take the three-pass form, so no input is
approximated. A row whose every entry is -inf (fully masked) gives zeros, not NaN.

    from outlierfree.attention.softmax import two_pass_softmax
    y = two_pass_softmax(scores, dim=-1)
"""

from __future__ import annotations

import ctypes
import math

import torch

from ..errors import OutlierfreeError, require
from . import native

ALGORITHMS = ("two_pass", "three_pass", "online")
BACKENDS = ("auto", "compiled", "torch")
RANGE = 2.0 ** 21  # the two-pass fast path takes rows whose max lies in [-RANGE, RANGE] (as row_softmax.cpp)
ZLIM = 2.0 ** 22  # |x log2 e| is clamped to this: -inf gets a finite exponent whose 2^(n - E) is 0
LOG2E = 1.0 / math.log(2.0)
# ln 2 = LN2_HI + LN2_LO with LN2_HI holding 30 significant bits: n * LN2_HI is exact for |n| <= 2^23, so
# t = (x - n LN2_HI) - n LN2_LO loses nothing to cancellation (float64 arithmetic, the torch form)
LN2_HI = math.ldexp(math.floor(math.ldexp(math.log(2.0), 30)), -30)
LN2_LO = math.log(2.0) - LN2_HI
_ALGO_ID = {"two_pass": 0, "three_pass": 1, "online": 2}
_EMIN = {torch.float32: -126, torch.float64: -1022}  # smallest normal exponents
ONLINE_BLOCK = 4096  # torch form of the online algorithm: elements per step of the running max


# ---- the (mantissa, exponent) representation, torch form ---------------------------------------------------------
def ext_exp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, n) with exp(x) = m * 2^n, n an integer (as x's dtype), m = exp(x - n ln2) in [0.70, 1.42].

    -inf gives n = -2^22 (finite) and m = exp(-1/2): its share 2^(n - E) of any row with a finite max is 0.
    The reduction runs in float64, so float32 inputs are reduced exactly; m is rounded to x's dtype once.
    """
    xd = x.double()
    n = torch.round((xd * LOG2E).clamp(-ZLIM, ZLIM))
    t = ((xd - n * LN2_HI) - n * LN2_LO).clamp(-0.5, 0.5)  # only a clamped n (or x = -inf) reaches the clamp
    return torch.exp(t).to(x.dtype), n.to(x.dtype)


def pow2_scale(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """m * 2^d for integer d <= 0, in two steps so that subnormal results round as exp's do (2^d alone would
    underflow to 0 below the smallest normal exponent before the multiplication)."""
    d1 = d.clamp_min(_EMIN.get(m.dtype, -126))
    return m * torch.exp2(d1) * torch.exp2(d - d1)


def mexp_reduce(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 in torch: (M, E) with sum(exp(x), dim) = M * 2^E (keepdim). The exponents combine by max and the
    mantissas are rescaled by powers of two, as a tree reduction rather than element by element (same value)."""
    m, n = ext_exp(x)
    e = n.amax(dim, keepdim=True)
    return (m * torch.exp2(n - e)).sum(dim, keepdim=True), e


def mexp_merge(m1: torch.Tensor, e1: torch.Tensor, m2: torch.Tensor,
               e2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, E) of the sum of two sums given as (mantissa, exponent) pairs."""
    e = torch.maximum(e1, e2)
    return m1 * torch.exp2(e1 - e) + m2 * torch.exp2(e2 - e), e


# ---- the three algorithms, torch form (last dim, any float dtype) ------------------------------------------------
def _three_pass_torch(x: torch.Tensor) -> torch.Tensor:
    mx = x.amax(-1, keepdim=True)
    e = torch.exp(x - torch.where(mx == -math.inf, 0.0, mx))  # a row of -inf: exp(-inf) = 0, no NaN
    s = e.sum(-1, keepdim=True)
    return e * torch.where(s > 0, 1.0 / s, 0.0)


def _two_pass_torch(x: torch.Tensor) -> torch.Tensor:
    m, n = ext_exp(x)
    e = n.amax(-1, keepdim=True)
    msum = (m * torch.exp2(n - e)).sum(-1, keepdim=True)  # pass 1
    y = pow2_scale(m * (1.0 / msum), n - e)  # pass 2
    mx = x.amax(-1, keepdim=True)  # the range guard (the compiled pass 1 tracks it alongside)
    bad = ~((mx >= -RANGE) & (mx <= RANGE))
    if bool(bad.any()):
        y = torch.where(bad, _three_pass_torch(x), y)
    return y


def _online_torch(x: torch.Tensor) -> torch.Tensor:
    mx = torch.full(x.shape[:-1] + (1,), -math.inf, dtype=x.dtype, device=x.device)  # running max
    s = torch.zeros_like(mx)  # running sum of exp(x - mx)
    for j in range(0, x.shape[-1], ONLINE_BLOCK):
        blk = x[..., j:j + ONLINE_BLOCK]
        new = torch.maximum(mx, blk.amax(-1, keepdim=True))
        safe = torch.where(new == -math.inf, 0.0, new)
        s = s * torch.exp(mx - safe) + torch.exp(blk - safe).sum(-1, keepdim=True)
        mx = new
    safe = torch.where(mx == -math.inf, 0.0, mx)
    return torch.exp(x - safe) * torch.where(s > 0, 1.0 / s, 0.0)


_TORCH = {"two_pass": _two_pass_torch, "three_pass": _three_pass_torch, "online": _online_torch}


def compiled_available() -> bool:
    """Whether the compiled kernels built and loaded on this machine (see attention/native.py)."""
    return native.library() is not None


def _use_compiled(x: torch.Tensor, backend: str) -> bool:
    if backend == "torch":
        return False
    ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and compiled_available()
    if backend == "compiled":
        require(ok, f"the compiled softmax kernels cannot run here (device {x.device}, dtype {x.dtype}, compiler "
                    f"{'found' if native._compiler() else 'missing'})",
                "use backend='torch' or 'auto', or install g++ (CXX names another compiler)")
    return ok


def _rows(x: torch.Tensor, algorithm: str, backend: str) -> torch.Tensor:
    """Softmax over the last dim of a contiguous float32/float64 tensor."""
    if not _use_compiled(x, backend):
        return _TORCH[algorithm](x)
    x = x.contiguous()
    y = torch.empty_like(x)  # (..., n)
    return softmax_into(x, y, algorithm) if x.numel() else y


def softmax_into(x: torch.Tensor, out: torch.Tensor, algorithm: str = "two_pass") -> torch.Tensor:
    """softmax over the last dim of a contiguous float32/float64 CPU tensor ``x``, written into ``out`` (same shape,
    contiguous) by the compiled kernel, without autograd or an allocation: what benchmarks/softmax.py times."""
    require(compiled_available(), "the compiled softmax kernels are not available", "install g++ (or set CXX)")
    require(x.is_contiguous() and out.is_contiguous() and out.shape == x.shape and out.dtype == x.dtype
            and x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu",
            "softmax_into needs contiguous float32/float64 CPU tensors of one shape", "call .contiguous() first")
    n = x.shape[-1]
    fn = native.library().of_softmax_f32 if x.dtype == torch.float32 else native.library().of_softmax_f64
    fn(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(out.data_ptr()), x.numel() // max(n, 1), n,
       _ALGO_ID[algorithm], torch.get_num_threads())
    return out


class _RowSoftmax(torch.autograd.Function):
    """softmax along ``dim`` by one of the forms; backward dx = y * (dy - sum(dy * y)) (rows of zeros stay zero)."""

    @staticmethod
    def forward(ctx, x, dim, algorithm, backend):
        xt = x.movedim(dim, -1)
        y = _rows(xt, algorithm, backend).movedim(-1, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensors
        return y * (dy - (dy * y).sum(ctx.dim, keepdim=True)), None, None, None


def softmax_by(x: torch.Tensor, dim: int = -1, algorithm: str = "two_pass", backend: str = "auto") -> torch.Tensor:
    """softmax(x) along ``dim`` by ``algorithm`` (``"two_pass"``, ``"three_pass"``, ``"online"``).

    ``backend``: ``"auto"`` (compiled on the CPU when it built, else torch), ``"compiled"`` (error if it cannot
    run) or ``"torch"``. Float16/bfloat16 inputs are computed in float32. Differentiable.
    """
    require(algorithm in ALGORITHMS, f"unknown softmax algorithm {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
    require(backend in BACKENDS, f"unknown softmax backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
    if not x.is_floating_point():
        raise OutlierfreeError(f"softmax needs a floating-point tensor, got {x.dtype}", "convert it with .float()")
    nd = max(x.dim(), 1)
    require(-nd <= dim < nd, f"dim {dim} is out of range for a {x.dim()}-d tensor", f"pass a dim in [{-nd}, {nd - 1}]")
    dim = dim % nd
    if x.dim() == 0:
        x1 = x.reshape(1)
        return softmax_by(x1, 0, algorithm, backend).reshape(())
    low = x.dtype in (torch.float16, torch.bfloat16)
    y = _RowSoftmax.apply(x.float() if low else x, dim, algorithm, backend)
    return y.to(x.dtype) if low else y


def two_pass_softmax(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """softmax(x) along ``dim`` by the Two-Pass algorithm (Dukhan & Ablavatski, 2020): one streaming pass that sums
    exp(x) as (mantissa, exponent) pairs, one that writes exp(x - log-sum-exp). Equals ``torch.softmax`` within
    float rounding on every finite input; a row of only -inf gives zeros. See the module docstring."""
    return softmax_by(x, dim, "two_pass", backend)


def three_pass_softmax(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """softmax(x) along ``dim`` by the three-pass form: max; exp(x - max) stored and summed; scaled by 1 / sum."""
    return softmax_by(x, dim, "three_pass", backend)


def online_softmax(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """softmax(x) along ``dim`` by the online form: running max and rescaled sum in one pass, then the outputs."""
    return softmax_by(x, dim, "online", backend)


# ---- the blocked clipped-softmax kernel's first pass -------------------------------------------------------------
def mexp_state(shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An empty running (M, E, max) state for rows of ``shape`` (e.g. (nb, nh, rows, 1)): the sum 0 * 2^(-2 ZLIM)
    and max -inf."""
    kw = dict(dtype=like.dtype, device=like.device)
    return torch.zeros(shape, **kw), torch.full(shape, -2 * ZLIM, **kw), torch.full(shape, -math.inf, **kw)


def mexp_accumulate(s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one tile of scores ``s`` (..., rows, cols) into the running (M, E, max) state (..., rows, 1), in one read
    of the tile. Compiled on the CPU for contiguous float32/float64 tiles (updates the state in place), else torch."""
    m, e, mx = state
    if _use_compiled(s, backend) and s.is_contiguous() and all(t.is_contiguous() for t in state):
        cols = s.shape[-1]
        fn = (native.library().of_mexp_accumulate_f32 if s.dtype == torch.float32
              else native.library().of_mexp_accumulate_f64)
        ptr = [ctypes.c_void_p(t.data_ptr()) for t in (s, m, e, mx)]
        fn(ptr[0], s.numel() // max(cols, 1), cols, cols, ptr[1], ptr[2], ptr[3], torch.get_num_threads())
        return m, e, mx
    mt, et = mexp_reduce(s)
    m, e = mexp_merge(m, e, mt, et)
    return m, e, torch.maximum(mx, s.amax(-1, keepdim=True))


def mexp_lse(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(log-sum-exp of the rows, whether every row was in the fast path's range). Rows that saw only -inf (no visible
    key) get +inf, as the blocked kernel stores them. When the flag is False the caller recomputes without the
    (mantissa, exponent) reduction."""
    m, e, mx = state
    seen = mx != -math.inf  # a NaN max counts as seen and out of range: the online pass then propagates it
    ok = bool((~seen | ((mx >= -RANGE) & (mx <= RANGE))).all())
    return torch.where(seen, torch.log(m) + e * math.log(2.0), math.inf), ok


def mexp_clip_probs(s: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], lse: torch.Tensor,
                    kappa: torch.Tensor | float, gamma: torch.Tensor | float, backend: str = "auto") -> torch.Tensor:
    """Pass 2 of the blocked kernel, in place on a tile of scores ``s`` (..., rows, cols):
    ``clip(kappa * exp(s - lse) + gamma, 0, 1)``, compiled as the paper's pass 2 (exp(s - lse) = m / M * 2^(n - E),
    from the state of :func:`mexp_accumulate`) with the clip fused in one read and one write; in torch from ``lse``.
    ``kappa`` and ``gamma`` are numbers or per-row tensors broadcastable to (..., rows, 1)."""
    m, e, mx = state
    if not (_use_compiled(s, backend) and s.is_contiguous() and all(t.is_contiguous() for t in state)):
        return s.sub_(lse).exp_().mul_(kappa).add_(gamma).clamp_(0.0, 1.0)
    cols = s.shape[-1]
    rows = s.numel() // max(cols, 1)

    def per_row(v):  # (value pointer, stride): one number (stride 0) or a contiguous column of rows
        if isinstance(v, torch.Tensor):
            return v.to(s.dtype).expand(m.shape).contiguous(), 1
        return torch.tensor([float(v)], dtype=s.dtype), 0

    (kt, ks), (gt, gs) = per_row(kappa), per_row(gamma)
    fn = native.library().of_clip_probs_f32 if s.dtype == torch.float32 else native.library().of_clip_probs_f64
    ptr = [ctypes.c_void_p(t.data_ptr()) for t in (s, m, e, mx, kt, gt)]
    fn(ptr[0], rows, cols, ptr[1], ptr[2], ptr[3], ptr[4], ks, ptr[5], gs, torch.get_num_threads())
    return s
