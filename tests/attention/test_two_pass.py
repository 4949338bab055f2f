"""The Two-Pass softmax (attention/two_pass.py) and its three-pass / online references, compiled and pure-torch:
exactness against torch.softmax and a float64 reference on extreme inputs (+-1e4, +-1e30, beyond the fast path's
range, -inf masks, all -inf rows), any dim, gradcheck, compiled == torch form, thread counts, the (mantissa,
exponent) sum itself, the build cache and bad input."""

import math

import pytest
import torch

from outlierfree.attention import native
from outlierfree.attention import two_pass as tp
from outlierfree.attention.softmax import online_softmax, three_pass_softmax, two_pass_softmax
from outlierfree.errors import OutlierfreeError

FUNCS = {"two_pass": two_pass_softmax, "three_pass": three_pass_softmax, "online": online_softmax}
BACKENDS = ["torch"] + (["compiled"] if tp.compiled_available() else [])
# float32 within 1e-6 relative, float64 within 1e-12; below the smallest normal number (where the format itself has
# fewer bits, and torch.softmax rounds twice) the comparison is absolute
TOL = {torch.float32: dict(rtol=1e-6, atol=2.0 ** -126), torch.float64: dict(rtol=1e-12, atol=2.0 ** -1022)}


def extreme_rows(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows of length n that stress every path: (12, n)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda s=1.0: torch.randn(n, generator=g, dtype=torch.float64) * s  # noqa: E731
    rows = [
        r(), r(30), r(3000),  # spreads from flat to one-hot
        r(3) + 1e4, r(3) - 1e4,  # values reaching +-1e4: exp overflows / underflows without a shift
        torch.where(torch.arange(n) % 3 == 0, -math.inf, r(5)),  # masked (-inf) entries
        torch.full((n,), -math.inf),  # every entry masked
        r(2) + 3e6, r(2) - 3e6,  # max beyond the two-pass fast path's range (2^21): the three-pass fallback
        torch.where(torch.arange(n) == n // 2, 1e30, r(1e29)),  # +-1e30 (finite float32)
        torch.where(torch.arange(n) == 0, 0.0, -math.inf),  # one visible entry
        r(20) - 80,  # small outputs near float32's subnormal range
    ]
    return torch.stack(rows).to(dtype)


def reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """torch.softmax with rows of only -inf set to 0 (torch gives NaN there; the two-pass forms give 0)."""
    ref = torch.softmax(x, dim)
    return torch.where(torch.isnan(ref) & (x == -math.inf).all(dim, keepdim=True), 0.0, ref)


def assert_softmax_close(y: torch.Tensor, x: torch.Tensor, dim: int = -1, shifted: bool = True,
                         exact_ref: bool = True) -> None:
    """|y - ref| <= rtol |ref| + atol elementwise, with ref = torch.softmax of x in float64 (``exact_ref``) or in
    x's dtype (then also within that reference's own distance from the float64 one, which depends on the CPU), and
    rtol = TOL + the rounding of x - max(x) where the computation subtracts the max (torch.softmax,
    the three-pass and online forms, ``shifted``): that difference is rounded to x's precision, an error of
    |x - max| * 2^-24 (float32) in the exponent, which the two-pass form (exp(x) = m 2^n, no subtraction) avoids."""
    tol = TOL[x.dtype]
    eps = torch.finfo(x.dtype).eps / 2
    xd = x.double()
    u = (xd - xd.amax(dim, keepdim=True)).nan_to_num(0.0, 0.0, 0.0).abs()  # -inf entries: output 0 exactly
    ref64 = reference(xd, dim).double()
    ref = ref64 if exact_ref else reference(x, dim).double()
    rtol = tol["rtol"] + (eps * u if shifted else 0.0) + (0.0 if exact_ref else eps * u)
    # torch.softmax in x's own dtype is itself off the float64 one by its exp and its sum's rounding, which depend on
    # the CPU's vector width (float32 rows of 4,099: up to 4e-6 relative on an AVX2-only CPU, under 1e-6 with
    # AVX-512): that error, measured here, is allowed on top (|y - ref| <= |y - ref64| + |ref - ref64|)
    own = 0.0 if exact_ref else (ref - ref64).abs()
    err = (y.double() - ref).abs()
    bad = err > rtol * ref.abs() + tol["atol"] + own
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outside; worst relative error "
                           f"{(err / ref.abs().clamp_min(tol['atol']))[bad].max().item():.3g}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 17, 64, 1000, 4099])
def test_exact_against_torch_softmax(backend, algorithm, dtype, n):
    x = extreme_rows(n, dtype)
    y = FUNCS[algorithm](x, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    shifted = algorithm != "two_pass"
    assert_softmax_close(y, x, shifted=shifted)  # torch.softmax in float64: 1e-6 / 1e-12 (two-pass)
    assert_softmax_close(y, x, shifted=shifted, exact_ref=False)  # torch.softmax in the same dtype
    masked = (x == -math.inf).all(-1)  # row 6 (and row 5 when n = 1)
    assert masked[6] and (y[masked] == 0).all()
    assert torch.isfinite(y).all()
    sums = y.double().sum(-1)[~masked]
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=n * (1e-6 if dtype == torch.float32 else 1e-13))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", list(FUNCS))
def test_any_dim(backend, algorithm):
    x = torch.randn(3, 50, 4, dtype=torch.float64) * 10
    x[1, ::2, 3] = -math.inf
    for dim in (0, 1, 2, -1, -2):
        assert_softmax_close(FUNCS[algorithm](x, dim, backend=backend), x, dim, algorithm != "two_pass")
    x32 = x.float().transpose(0, 2)  # non-contiguous input
    assert_softmax_close(FUNCS[algorithm](x32, 1, backend=backend), x32, 1, algorithm != "two_pass")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", list(FUNCS))
def test_gradcheck(backend, algorithm):
    x = torch.randn(4, 9, dtype=torch.float64) * 3
    x[1, 2] = x[2, 5] = -math.inf  # masked entries carry no gradient
    x[3] += 1e4
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FUNCS[algorithm](t, -1, backend=backend), (x,), eps=1e-6, atol=1e-7)
    # and the same gradient as torch.softmax's, along a non-last dim
    d = torch.randn(4, 9, dtype=torch.float64)
    g = torch.autograd.grad(FUNCS[algorithm](x, 0, backend=backend), x, d)[0]
    g_ref = torch.autograd.grad(torch.softmax(x, 0), x, d)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_all_masked_row_has_zero_output_and_gradient():
    x = torch.full((2, 6), -math.inf, dtype=torch.float64)
    x[0] = torch.randn(6, dtype=torch.float64)
    x.requires_grad_()
    for backend in BACKENDS:
        for f in FUNCS.values():
            y = f(x, backend=backend)
            assert (y[1] == 0).all()
            (g,) = torch.autograd.grad(y, x, torch.randn(2, 6, dtype=torch.float64))
            assert (g[1] == 0).all() and torch.isfinite(g).all()


@pytest.mark.skipif(not tp.compiled_available(), reason="no C++ compiler: only the torch form exists here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_equals_torch_form(dtype):
    x = torch.cat([extreme_rows(777, dtype, seed=3), torch.randn(40, 777, dtype=dtype) * 7])
    # both within a few roundings of the exact value (the C++ polynomial against torch.exp)
    tol = dict(rtol=1e-6, atol=2.0 ** -126) if dtype == torch.float32 else dict(rtol=1e-13, atol=2.0 ** -1022)
    for name, f in FUNCS.items():
        torch.testing.assert_close(f(x, backend="compiled"), f(x, backend="torch"), **tol, msg=name)


@pytest.mark.skipif(not tp.compiled_available(), reason="no C++ compiler")
def test_thread_counts_and_long_rows_agree():
    """1 and 2 threads, many rows (rows split over threads) and one long row (the row split over threads, partial
    (M, E) pairs merged) give the same values."""
    old = torch.get_num_threads()
    x = torch.randn(3, 70_001) * 20
    x[1, :1000] = -math.inf
    x[2] += 1e4
    try:
        out = {}
        for nt in (1, 2):
            torch.set_num_threads(nt)
            out[nt] = {name: (f(x, backend="compiled"), f(x[:1], backend="compiled")) for name, f in FUNCS.items()}
    finally:
        torch.set_num_threads(old)
    for name in FUNCS:
        for nt in (1, 2):
            many, one = out[nt][name]
            assert_softmax_close(many, x, shifted=name != "two_pass")
            assert_softmax_close(one, x[:1], shifted=name != "two_pass")
        torch.testing.assert_close(out[1][name][0], out[2][name][0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mantissa_exponent_sum_does_not_overflow(backend):
    """Pass 1's pair (M, E) is sum(exp(x)) = M * 2^E, even where exp(x) overflows float64 (x = 800)."""
    x = torch.randn(5, 300, dtype=torch.float64) * 4
    x[1] += 800.0
    x[2] -= 800.0
    x[3, ::2] = -math.inf
    state = tp.mexp_accumulate(x[:, :120].contiguous(), tp.mexp_state((5, 1), x), backend=backend)
    state = tp.mexp_accumulate(x[:, 120:].contiguous(), state, backend=backend)  # two tiles, folded
    m, e, mx = state
    assert ((m >= 0.5) & (m < 2 * 300) & (e == e.round())).all()  # a mantissa-sized sum and an integer exponent
    lse, ok = tp.mexp_lse(state)
    assert ok
    torch.testing.assert_close(lse, torch.logsumexp(x, -1, keepdim=True), rtol=1e-14, atol=1e-13)
    torch.testing.assert_close(mx, x.amax(-1, keepdim=True), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", list(FUNCS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_gives_a_row_of_nan_as_torch(backend, algorithm, dtype):
    x = torch.randn(3, 100, dtype=dtype)
    x[1, 37] = math.nan
    x[2, 99] = math.nan  # in the tail of the vector loop
    y = FUNCS[algorithm](x, backend=backend)
    assert torch.isnan(y[1:]).all()
    assert_softmax_close(y[:1], x[:1], shifted=algorithm != "two_pass")


def test_half_precision_is_computed_in_float32():
    x = torch.randn(4, 33) * 5
    for dtype in (torch.float16, torch.bfloat16):
        y = two_pass_softmax(x.to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y, torch.softmax(x.to(dtype).float(), -1).to(dtype), rtol=0, atol=0)


def test_bad_input_is_one_line_error(monkeypatch):
    with pytest.raises(OutlierfreeError, match="floating-point"):
        two_pass_softmax(torch.arange(4))
    with pytest.raises(OutlierfreeError, match="out of range"):
        two_pass_softmax(torch.randn(3, 4), dim=2)
    torch.testing.assert_close(two_pass_softmax(torch.tensor(2.5)), torch.tensor(1.0))  # 0-d: softmax of one value
    with pytest.raises(OutlierfreeError, match="unknown softmax algorithm"):
        tp.softmax_by(torch.randn(3), algorithm="four_pass")
    monkeypatch.setattr(native, "library", lambda: None)  # as without a compiler
    assert not tp.compiled_available()
    with pytest.raises(OutlierfreeError, match="compiled softmax kernels cannot run"):
        two_pass_softmax(torch.randn(3), backend="compiled")
    x = torch.randn(2, 7)
    torch.testing.assert_close(two_pass_softmax(x), torch.softmax(x, -1), **TOL[torch.float32])  # auto: torch form


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler")
def test_build_is_cached_by_content(tmp_path):
    p1 = native.build(native._compiler(), tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = native.build(native._compiler(), tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime  # the second call reuses the library
    assert [p.name for p in tmp_path.iterdir()] == [p1.name]  # no temporary left behind
