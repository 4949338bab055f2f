// Row softmax kernels for outlierfree.attention.two_pass, float32 and float64, vectorised (the lane loops below are
// written for the compiler's auto-vectoriser: -O3 -march=native, OpenMP simd) and threaded with OpenMP.
//
//   two_pass   "The Two-Pass Softmax Algorithm" (Dukhan & Ablavatski, 2020), Algorithm 3:
//              pass 1 (one read):  for each x: (m, n) = ExtExp(x), exp(x) = m * 2^n, m in [0.7, 1.42], n integer;
//                                  the sum is kept as a pair (M, E): E' = max(E, n),
//                                  M = M * 2^(E - E') + m * 2^(n - E')   (no max pass, no exp of a difference)
//              pass 2 (read+write): y = m * (1 / M) * 2^(n - E)          (ExtExp recomputed)
//   three_pass max; y = exp(x - max) stored and summed; y *= 1 / sum   ("reloading" form: 3 reads, 2 writes)
//   online     running max and rescaled sum in one pass (Milakov & Gimelshein, 2018); y = exp(x - max) / sum
//
// Every exp here is the same Cody-Waite range reduction + polynomial, so the algorithms differ only in their passes.
// The two-pass kernel also tracks each row's max in its first pass (one vmax per vector) as a range guard: the
// reduction x * log2(e) -> (n, t) is exact-enough for |x| <= RANGE; a row whose max lies outside [-RANGE, RANGE]
// (or is -inf: a fully masked row) is done by the three-pass kernel instead, so every finite input is exact.
//
// Plain C ABI (loaded with ctypes); no torch headers, so it builds in about a second.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <omp.h>

namespace {

template <typename T> struct K;
template <> struct K<float> {
    using I = int32_t;
    static constexpr int MBITS = 23, BIAS = 127, EMIN = -126;
    static constexpr float MAGIC = 12582912.0f;  // 1.5 * 2^23: (z + MAGIC) - MAGIC rounds z to an integer
    static constexpr float LN2_HI = 0.693147182464599609375f, LN2_LO = -1.904654299957768e-09f;
};
template <> struct K<double> {
    using I = int64_t;
    static constexpr int MBITS = 52, BIAS = 1023, EMIN = -1022;
    static constexpr double MAGIC = 6755399441055744.0;  // 1.5 * 2^52
    static constexpr double LN2_HI = 0.6931471805599453094, LN2_LO = 2.3190468138462996e-17;
};
constexpr double LOG2E = 1.44269504088896340736;
constexpr double ZLIM = 4194304.0;   // |x * log2(e)| is clamped to 2^22: -inf and huge negatives get a finite exponent
constexpr double RANGE = 2097152.0;  // two-pass fast path for rows with max in [-2^21, 2^21] (2^21 log2 e < 2^22)

// exp(t) on |t| <= ln2 / 2 (clamped to 0.5): Taylor series, degree 7 (float, error 5e-9) or 13 (double, 4e-18)
inline float poly(float t) {
    float p = 1.0f / 5040;
    p = p * t + 1.0f / 720; p = p * t + 1.0f / 120; p = p * t + 1.0f / 24; p = p * t + 1.0f / 6;
    p = p * t + 0.5f; p = p * t + 1.0f; return p * t + 1.0f;
}
inline double poly(double t) {
    double p = 1.0 / 6227020800.0;
    p = p * t + 1.0 / 479001600.0; p = p * t + 1.0 / 39916800.0; p = p * t + 1.0 / 3628800.0;
    p = p * t + 1.0 / 362880.0; p = p * t + 1.0 / 40320.0; p = p * t + 1.0 / 5040.0; p = p * t + 1.0 / 720.0;
    p = p * t + 1.0 / 120.0; p = p * t + 1.0 / 24.0; p = p * t + 1.0 / 6.0; p = p * t + 0.5;
    p = p * t + 1.0; return p * t + 1.0;
}

// ExtExp: exp(x) = m * 2^n with n = round(x log2 e) (a float holding an integer) and m = exp(x - n ln2)
template <typename T> inline void ext_exp(T x, T& m, T& n) {
    T z = x * T(LOG2E);
    z = z < T(-ZLIM) ? T(-ZLIM) : z;
    z = z > T(ZLIM) ? T(ZLIM) : z;
    n = (z + K<T>::MAGIC) - K<T>::MAGIC;
    T t = std::fma(n, -K<T>::LN2_HI, x);
    t = std::fma(n, -K<T>::LN2_LO, t);
    t = t < T(-0.5) ? T(-0.5) : t;  // only a clamped z (or x = -inf) leaves [-ln2/2, ln2/2]; its 2^n is 0 then
    t = t > T(0.5) ? T(0.5) : t;
    m = poly(t);
}

// 2^d for an integer-valued d <= 0, built from its bits; d below the smallest normal exponent gives 0
template <typename T> inline T pow2(T d) {
    d = d < T(K<T>::EMIN - 1) ? T(K<T>::EMIN - 1) : d;
    using I = typename K<T>::I;
    I bits = (I(d) + K<T>::BIAS) << K<T>::MBITS;  // d = EMIN - 1 -> exponent field 0 -> +0
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

// m * 2^d for d <= 0, with subnormal results rounded like exp's (two steps: 2^max(d, EMIN), then the rest)
template <typename T> inline T scale(T m, T d) {
    T d1 = d < T(K<T>::EMIN) ? T(K<T>::EMIN) : d;
    return m * pow2(d1) * pow2(d - d1);
}

// exp(u) for u <= 0 (or -inf), the same reduction and polynomial as ExtExp
template <typename T> inline T exp_neg(T u) {
    T m, n;
    ext_exp(u, m, n);
    return scale(m, n);
}

template <typename T> constexpr int lanes() { return 4 * 64 / int(sizeof(T)); }  // 4 AVX-512 registers of lanes

// max that keeps a NaN (a row with a NaN gives a row of NaN, as torch.softmax): the reductions below carry the row's
// max through this, and a NaN max sends the row to its NaN fill
template <typename T> inline T nanmax(T a, T b) {
    return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// ---- two-pass ----------------------------------------------------------------------------------------------------
template <typename T> struct MExp { T m, e, mx; };  // sum = m * 2^e; mx = max(x) (the range guard)

template <typename T> inline MExp<T> mexp_merge(MExp<T> a, MExp<T> b) {
    T e = std::max(a.e, b.e);
    return {a.m * pow2(a.e - e) + b.m * pow2(b.e - e), e, nanmax(a.mx, b.mx)};
}

template <typename T> MExp<T> mexp_reduce(const T* x, int64_t n) {
    constexpr int W = lanes<T>();
    alignas(64) T am[W], ae[W], amx[W];
    for (int l = 0; l < W; ++l) { am[l] = 0; ae[l] = T(-2 * ZLIM); amx[l] = -std::numeric_limits<T>::infinity(); }
    int64_t i = 0;
    for (; i + W <= n; i += W) {
#pragma omp simd aligned(am, ae, amx : 64)
        for (int l = 0; l < W; ++l) {
            T v = x[i + l], m, k;
            ext_exp(v, m, k);
            amx[l] = (v > amx[l] || v != v) ? v : amx[l];  // a NaN stays (nothing is greater than it)
            T e = k > ae[l] ? k : ae[l];
            am[l] = am[l] * pow2(ae[l] - e) + m * pow2(k - e);
            ae[l] = e;
        }
    }
    MExp<T> r{0, T(-2 * ZLIM), -std::numeric_limits<T>::infinity()};
    for (; i < n; ++i) {
        T m, k;
        ext_exp(x[i], m, k);
        r = mexp_merge(r, MExp<T>{m, k, x[i]});
    }
    for (int l = 0; l < W; ++l) r = mexp_merge(r, MExp<T>{am[l], ae[l], amx[l]});
    return r;
}

template <typename T> void mexp_write(const T* x, T* y, int64_t n, T inv_m, T e) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        T m, k;
        ext_exp(x[i], m, k);
        y[i] = scale(m * inv_m, k - e);
    }
}

template <typename T> inline bool in_range(T mx) { return mx >= T(-RANGE) && mx <= T(RANGE); }

// ---- three-pass and online ----------------------------------------------------------------------------------------
template <typename T> T max_reduce(const T* x, int64_t n) {
    T mx = -std::numeric_limits<T>::infinity();
    int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
    for (int64_t i = 0; i < n; ++i) {
        mx = x[i] > mx ? x[i] : mx;
        nan |= x[i] != x[i];
    }
    return nan ? std::numeric_limits<T>::quiet_NaN() : mx;
}

// the sum runs in lanes<T>() accumulators (as the AVX-512 form's four registers), then pairwise: with only the
// vector width of partial sums (8 floats with AVX2) a row of 4,099 would chain 512 rounded adds (3e-6 relative)
template <typename T> T exp_store_sum(const T* x, T* y, int64_t n, T mx) {
    constexpr int W = lanes<T>();
    alignas(64) T as[W];
    for (int l = 0; l < W; ++l) as[l] = 0;
    int64_t i = 0;
    for (; i + W <= n; i += W) {
#pragma omp simd aligned(as : 64)
        for (int l = 0; l < W; ++l) {
            T v = exp_neg(x[i + l] - mx);
            y[i + l] = v;
            as[l] += v;
        }
    }
    T s = 0;
    for (; i < n; ++i) {
        T v = exp_neg(x[i] - mx);
        y[i] = v;
        s += v;
    }
    for (int w = W / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) as[l] += as[l + w];
    return s + as[0];
}

template <typename T> void scale_span(T* y, int64_t n, T a) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

template <typename T> void exp_write(const T* x, T* y, int64_t n, T mx, T a) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = exp_neg(x[i] - mx) * a;
}

template <typename T> struct MaxSum { T mx, s; };  // online: running max and sum of exp(x - mx)

// d = a - b where a <= b, and 0 when both are -inf (their difference would be NaN)
template <typename T> inline T diff(T a, T b) { return a == b ? T(0) : a - b; }

template <typename T> inline MaxSum<T> ms_merge(MaxSum<T> a, MaxSum<T> b) {
    T mx = nanmax(a.mx, b.mx);
    return {mx, a.s * exp_neg(diff(a.mx, mx)) + b.s * exp_neg(diff(b.mx, mx))};
}

template <typename T> MaxSum<T> online_reduce(const T* x, int64_t n) {
    constexpr int W = lanes<T>();
    const T ninf = -std::numeric_limits<T>::infinity();
    alignas(64) T amx[W], as[W];
    for (int l = 0; l < W; ++l) { amx[l] = ninf; as[l] = 0; }
    int64_t i = 0;
    for (; i + W <= n; i += W) {
#pragma omp simd aligned(amx, as : 64)
        for (int l = 0; l < W; ++l) {
            T v = x[i + l];
            T mx = (v > amx[l] || v != v) ? v : amx[l];  // a NaN stays
            // a lane still at -inf accumulates exp(0) = 1 here; the first finite value multiplies it by 0
            as[l] = as[l] * exp_neg(diff(amx[l], mx)) + exp_neg(diff(v, mx));
            amx[l] = mx;
        }
    }
    MaxSum<T> r{ninf, 0};
    for (; i < n; ++i) r = ms_merge(r, MaxSum<T>{x[i], T(1)});
    for (int l = 0; l < W; ++l) r = ms_merge(r, MaxSum<T>{amx[l], as[l]});
    return r;
}

// ---- the blocked clipped-softmax kernel's pass 2 -------------------------------------------------------------------
// c = clip(kappa * p + gamma, 0, 1) with p = m * (1 / M) * 2^(n - E): the paper's pass 2 with the clip as epilogue,
// in place on a tile of scores (one read, one write, instead of torch's five element-wise passes)
template <typename T> void clip_row(T* x, int64_t n, T inv_m, T e, T kappa, T g) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        T m, k;
        ext_exp(x[i], m, k);
        T c = kappa * scale(m * inv_m, k - e) + g;
        x[i] = c < T(0) ? T(0) : (c > T(1) ? T(1) : c);
    }
}

// ---- float32 with AVX-512: the same maths as above, written with intrinsics --------------------------------------
// vscalefps computes m * 2^n in one instruction (subnormal results rounded once, 2^-inf = 0), as the paper's AVX512
// implementation does; the polynomial is a degree-6 minimax fit of exp on [-ln2/2, ln2/2] (relative error 1e-7 with
// float32 rounding; the paper's degree 5 has 1.7e-7, too close to the 1e-6 the tests ask for). Four vectors per step
// give each accumulator chain room. Inputs are clamped to XMIN = -2^22 ln2 first, so -inf never meets an fma and
// n stays an exact integer; a clamped element's 2^(n - E) is 0 in any row whose max is in range.
#if defined(__AVX512F__)
#include <immintrin.h>

namespace v16 {
const float XMIN = -2907270.0f;  // -2^22 ln 2
inline __m512 c(float v) { return _mm512_set1_ps(v); }
inline __m512 c16(float v) { return _mm512_set1_ps(v); }

inline void ext_exp(__m512 x, __m512& m, __m512& n) {
    x = _mm512_max_ps(x, c(XMIN));  // NaN -> XMIN as well (vmaxps returns its second operand)
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, c(float(LOG2E))), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 t = _mm512_fmadd_ps(n, c(-K<float>::LN2_HI), x);
    t = _mm512_fmadd_ps(n, c(-K<float>::LN2_LO), t);
    __m512 p = c(0x1.6ae72cp-10f);
    p = _mm512_fmadd_ps(p, t, c(0x1.126782p-7f));
    p = _mm512_fmadd_ps(p, t, c(0x1.555822p-5f));
    p = _mm512_fmadd_ps(p, t, c(0x1.55541ap-3f));
    p = _mm512_fmadd_ps(p, t, c(0x1.fffffcp-2f));
    p = _mm512_fmadd_ps(p, t, c(1.0f));
    m = _mm512_fmadd_ps(p, t, c(1.0f));
}
inline __m512 exp_neg(__m512 u) { __m512 m, n; ext_exp(u, m, n); return _mm512_scalef_ps(m, n); }
inline __mmask16 tail(int64_t r) { return __mmask16((1u << r) - 1); }
inline __m512 load_or_ninf(const float* p, __mmask16 k) {
    return _mm512_mask_loadu_ps(c(-INFINITY), k, p);
}

// pass 1 of one lane vector: fold x into (am, ae), track the max
inline void fold(__m512 x, __m512& am, __m512& ae, __m512& amx) {
    __m512 m, n;
    ext_exp(x, m, n);
    amx = _mm512_mask_mov_ps(_mm512_max_ps(amx, x), _mm512_cmp_ps_mask(amx, amx, _CMP_UNORD_Q), amx);  // NaN stays
    __m512 e = _mm512_max_ps(ae, n);
    am = _mm512_add_ps(_mm512_scalef_ps(am, _mm512_sub_ps(ae, e)), _mm512_scalef_ps(m, _mm512_sub_ps(n, e)));
    ae = e;
}
}  // namespace v16

template <> MExp<float> mexp_reduce<float>(const float* x, int64_t n) {
    using namespace v16;
    __m512 am[4], ae[4], amx[4];
    for (int j = 0; j < 4; ++j) { am[j] = c(0); ae[j] = c(float(-2 * ZLIM)); amx[j] = c(-INFINITY); }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int j = 0; j < 4; ++j) fold(_mm512_loadu_ps(x + i + 16 * j), am[j], ae[j], amx[j]);
    for (; i < n; i += 16)  // tail: missing lanes read -inf (their share is 0 whenever the row is in range)
        fold(load_or_ninf(x + i, n - i >= 16 ? __mmask16(0xffff) : tail(n - i)), am[0], ae[0], amx[0]);
    alignas(64) float bm[64], be[64], bx[64];
    for (int j = 0; j < 4; ++j) { _mm512_store_ps(bm + 16 * j, am[j]); _mm512_store_ps(be + 16 * j, ae[j]);
                                  _mm512_store_ps(bx + 16 * j, amx[j]); }
    MExp<float> r{0, float(-2 * ZLIM), -INFINITY};
    for (int l = 0; l < 64; ++l) r = mexp_merge(r, MExp<float>{bm[l], be[l], bx[l]});
    return r;
}

template <> void mexp_write<float>(const float* x, float* y, int64_t n, float inv_m, float e) {
    using namespace v16;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
        __m512 m, kk;
        ext_exp(_mm512_maskz_loadu_ps(k, x + i), m, kk);
        _mm512_mask_storeu_ps(y + i, k, _mm512_scalef_ps(_mm512_mul_ps(m, c(inv_m)), _mm512_sub_ps(kk, c(e))));
    }
}

template <> float max_reduce<float>(const float* x, int64_t n) {
    using namespace v16;
    __m512 a[4] = {c(-INFINITY), c(-INFINITY), c(-INFINITY), c(-INFINITY)};
    int64_t i = 0;
    __mmask16 nan = 0;
    for (; i + 64 <= n; i += 64)
        for (int j = 0; j < 4; ++j) {
            __m512 v = _mm512_loadu_ps(x + i + 16 * j);
            a[j] = _mm512_max_ps(a[j], v);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
    for (; i < n; i += 16) {
        __m512 v = load_or_ninf(x + i, n - i >= 16 ? 0xffff : tail(n - i));
        a[0] = _mm512_max_ps(a[0], v);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    if (nan) return NAN;
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a[0], a[1]), _mm512_max_ps(a[2], a[3])));
}

template <> float exp_store_sum<float>(const float* x, float* y, int64_t n, float mx) {
    using namespace v16;
    __m512 s[4] = {c(0), c(0), c(0), c(0)};
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int j = 0; j < 4; ++j) {
            __m512 v = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16 * j), c(mx)));
            _mm512_storeu_ps(y + i + 16 * j, v);
            s[j] = _mm512_add_ps(s[j], v);
        }
    for (; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
        __m512 v = _mm512_maskz_mov_ps(k, exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), c(mx))));
        _mm512_mask_storeu_ps(y + i, k, v);
        s[0] = _mm512_add_ps(s[0], v);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
}

template <> void scale_span<float>(float* y, int64_t n, float a) {
    using namespace v16;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, y + i), c(a)));
    }
}

template <> void exp_write<float>(const float* x, float* y, int64_t n, float mx, float a) {
    using namespace v16;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
        __m512 m, kk;
        ext_exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), c(mx)), m, kk);
        _mm512_mask_storeu_ps(y + i, k, _mm512_scalef_ps(_mm512_mul_ps(m, c(a)), kk));
    }
}

template <> MaxSum<float> online_reduce<float>(const float* x, int64_t n) {
    using namespace v16;
    __m512 am[4], as[4];
    for (int j = 0; j < 4; ++j) { am[j] = c(-INFINITY); as[j] = c(0); }
    // (-inf) - (-inf) = NaN is clamped to XMIN by ext_exp: exp gives 0 there, which is the right share
    auto step = [](__m512 v, __m512& mx, __m512& s) {
        __m512 nm = _mm512_mask_mov_ps(_mm512_max_ps(mx, v), _mm512_cmp_ps_mask(mx, mx, _CMP_UNORD_Q), mx);
        s = _mm512_fmadd_ps(s, exp_neg(_mm512_sub_ps(mx, nm)), exp_neg(_mm512_sub_ps(v, nm)));
        mx = nm;
    };
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int j = 0; j < 4; ++j) step(_mm512_loadu_ps(x + i + 16 * j), am[j], as[j]);
    for (; i < n; i += 16) step(load_or_ninf(x + i, n - i >= 16 ? 0xffff : tail(n - i)), am[0], as[0]);
    alignas(64) float bm[64], bs[64];
    for (int j = 0; j < 4; ++j) { _mm512_store_ps(bm + 16 * j, am[j]); _mm512_store_ps(bs + 16 * j, as[j]); }
    MaxSum<float> r{-INFINITY, 0};
    for (int l = 0; l < 64; ++l) r = ms_merge(r, MaxSum<float>{bm[l], bs[l]});
    return r;
}
template <> void clip_row<float>(float* x, int64_t n, float inv_m, float e, float kappa, float g) {
    using namespace v16;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
        __m512 m, kk;
        ext_exp(_mm512_maskz_loadu_ps(k, x + i), m, kk);
        __m512 c = _mm512_fmadd_ps(_mm512_scalef_ps(_mm512_mul_ps(m, c16(inv_m)), _mm512_sub_ps(kk, c16(e))),
                                   c16(kappa), c16(g));
        _mm512_mask_storeu_ps(x + i, k, _mm512_min_ps(_mm512_max_ps(c, c16(0.0f)), c16(1.0f)));
    }
}
#endif

// ---- rows ---------------------------------------------------------------------------------------------------------
enum Algo { TWO_PASS = 0, THREE_PASS = 1, ONLINE = 2 };

template <typename T> void zero_row(T* y, int64_t n) { std::fill(y, y + n, T(0)); }

template <typename T> void nan_row(T* y, int64_t n) { std::fill(y, y + n, std::numeric_limits<T>::quiet_NaN()); }

template <typename T> void three_pass_row(const T* x, T* y, int64_t n) {
    T mx = max_reduce(x, n);
    if (mx != mx) return nan_row(y, n);
    if (mx == -std::numeric_limits<T>::infinity()) return zero_row(y, n);  // every entry masked: zeros
    T s = exp_store_sum(x, y, n, mx);
    scale_span(y, n, T(1) / s);
}

template <typename T> void row_serial(const T* x, T* y, int64_t n, int algo) {
    if (algo == TWO_PASS) {
        MExp<T> r = mexp_reduce(x, n);
        if (!in_range(r.mx)) return three_pass_row(x, y, n);
        mexp_write(x, y, n, T(1) / r.m, r.e);
    } else if (algo == THREE_PASS) {
        three_pass_row(x, y, n);
    } else {
        MaxSum<T> r = online_reduce(x, n);
        if (r.mx != r.mx) return nan_row(y, n);
        if (r.mx == -std::numeric_limits<T>::infinity()) return zero_row(y, n);
        exp_write(x, y, n, r.mx, T(1) / r.s);
    }
}

// One long row on nt threads: each thread reduces its chunk, the partial results are merged, each writes its chunk.
template <typename T> void row_parallel(const T* x, T* y, int64_t n, int algo, int nt) {
    const T ninf = -std::numeric_limits<T>::infinity();
    MExp<T> pm[256];
    MaxSum<T> ps[256];
    T px[256];
    nt = std::min(nt, 256);
    bool fallback = false;  // two-pass: the row's max is out of the fast path's range
    MExp<T> tot{0, T(-2 * ZLIM), ninf};
    MaxSum<T> tos{ninf, 0};
    T mx = ninf;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), nth = omp_get_num_threads();
        int64_t c = (n + nth - 1) / nth, b = std::min(n, t * c), e = std::min(n, b + c);
        if (algo == TWO_PASS) {
            pm[t] = mexp_reduce(x + b, e - b);
#pragma omp barrier
#pragma omp single
            {
                for (int i = 0; i < nth; ++i) tot = mexp_merge(tot, pm[i]);
                fallback = !in_range(tot.mx);
            }
            if (!fallback) mexp_write(x + b, y + b, e - b, T(1) / tot.m, tot.e);
        } else if (algo == ONLINE) {
            ps[t] = online_reduce(x + b, e - b);
#pragma omp barrier
#pragma omp single
            for (int i = 0; i < nth; ++i) tos = ms_merge(tos, ps[i]);
            if (tos.mx != tos.mx) nan_row(y + b, e - b);
            else if (tos.mx == ninf) zero_row(y + b, e - b);
            else exp_write(x + b, y + b, e - b, tos.mx, T(1) / tos.s);
        }
        if (algo == THREE_PASS || fallback) {
            px[t] = max_reduce(x + b, e - b);
#pragma omp barrier
#pragma omp single
            for (int i = 0; i < nth; ++i) mx = nanmax(mx, px[i]);
            if (mx != mx) {
                nan_row(y + b, e - b);
            } else if (mx == ninf) {
                zero_row(y + b, e - b);
            } else {
                px[t] = exp_store_sum(x + b, y + b, e - b, mx);
#pragma omp barrier
                T s = 0;
                for (int i = 0; i < nth; ++i) s += px[i];
                scale_span(y + b, e - b, T(1) / s);
            }
        }
    }
}

template <typename T> void softmax_rows(const T* x, T* y, int64_t rows, int64_t n, int algo, int nt) {
    if (nt <= 1 || (rows == 1 && n < 65536)) {
        for (int64_t r = 0; r < rows; ++r) row_serial(x + r * n, y + r * n, n, algo);
    } else if (rows >= nt || n < 65536) {
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < rows; ++r) row_serial(x + r * n, y + r * n, n, algo);
    } else {
        for (int64_t r = 0; r < rows; ++r) row_parallel(x + r * n, y + r * n, n, algo, nt);
    }
}

// The blocked kernel's first pass over one tile of scores (rows x cols, row stride ld): folds each row into the
// running (m, e) pair and records the tile row's max (the caller checks it against the range).
template <typename T> void mexp_accumulate(const T* s, int64_t rows, int64_t cols, int64_t ld, T* m, T* e, T* mx,
                                           int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        MExp<T> a = mexp_reduce(s + r * ld, cols);
        MExp<T> b = mexp_merge(MExp<T>{m[r], e[r], mx[r]}, a);
        m[r] = b.m; e[r] = b.e; mx[r] = b.mx;
    }
}


// Pass 2 of the blocked kernel on a tile (rows x cols, contiguous): kappa and gamma per row (stride 1) or one value
// (stride 0); rows that saw no key (max -inf) give clip(gamma) = 0.
template <typename T> void clip_probs(T* s, int64_t rows, int64_t cols, const T* m, const T* e, const T* mx,
                                      const T* kappa, int64_t ks, const T* g, int64_t gs, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && rows > 1)
    for (int64_t r = 0; r < rows; ++r) {
        T* x = s + r * cols;
        if (mx[r] == -std::numeric_limits<T>::infinity()) {
            T c = g[r * gs] < T(0) ? T(0) : (g[r * gs] > T(1) ? T(1) : g[r * gs]);
            std::fill(x, x + cols, c);
        } else {
            clip_row(x, cols, T(1) / m[r], e[r], kappa[r * ks], g[r * gs]);
        }
    }
}

}  // namespace

extern "C" {
void of_softmax_f32(const float* x, float* y, int64_t rows, int64_t n, int algo, int nt) {
    softmax_rows(x, y, rows, n, algo, nt);
}
void of_softmax_f64(const double* x, double* y, int64_t rows, int64_t n, int algo, int nt) {
    softmax_rows(x, y, rows, n, algo, nt);
}
void of_mexp_accumulate_f32(const float* s, int64_t rows, int64_t cols, int64_t ld, float* m, float* e, float* mx,
                            int nt) {
    mexp_accumulate(s, rows, cols, ld, m, e, mx, nt);
}
void of_mexp_accumulate_f64(const double* s, int64_t rows, int64_t cols, int64_t ld, double* m, double* e,
                            double* mx, int nt) {
    mexp_accumulate(s, rows, cols, ld, m, e, mx, nt);
}
void of_clip_probs_f32(float* s, int64_t rows, int64_t cols, const float* m, const float* e, const float* mx,
                       const float* kappa, int64_t ks, const float* g, int64_t gs, int nt) {
    clip_probs(s, rows, cols, m, e, mx, kappa, ks, g, gs, nt);
}
void of_clip_probs_f64(double* s, int64_t rows, int64_t cols, const double* m, const double* e, const double* mx,
                       const double* kappa, int64_t ks, const double* g, int64_t gs, int nt) {
    clip_probs(s, rows, cols, m, e, mx, kappa, ks, g, gs, nt);
}
double of_range() { return RANGE; }
double of_zlim() { return ZLIM; }
}
