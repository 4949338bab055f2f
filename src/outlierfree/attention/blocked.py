"""Memory-efficient clipped-softmax attention: a two-pass blocked kernel that never stores a T x T tensor.

Clipped softmax acts on the *normalised* probability,

    c_ij = clip((zeta - gamma_i) * p_ij + gamma_i, 0, 1),     p_ij = exp(s_ij - lse_i),   s = scale * q k^T,

so the one-pass online-softmax trick of FlashAttention / SDPA cannot be used: the clip of a block cannot be taken
before the row's final normaliser is known. The two-pass form (cf. the Two-Pass Softmax Algorithm) can:

    pass 1: stream over the key blocks of a query block, keep the running max m_i and sum l_i of exp(s_ij - m_i);
            lse_i = m_i + log l_i   (``first_pass="two_pass"``: the sum as (mantissa, exponent) pairs instead, with
            no running max, as the Two-Pass Softmax Algorithm writes it; attention/two_pass.py)
    pass 2: stream over the key blocks again, recompute s, form c = clip((zeta - gamma) exp(s - lse) + gamma, 0, 1)
            and accumulate O_i += c_ij v_j.

When a query block's whole key range fits in one key block (the default on the CPU up to ``MAX_KEY_BLOCK`` keys),
both passes happen on the same block of scores, which is computed once. Either way the largest temporary is one
(batch-heads, query block, key block) tile; forward saves only q, k, v and lse (B, H, Tq) for the backward.

Backward (recomputes the blocks instead of storing them). With kappa_i = zeta - gamma_i, u = kappa p + gamma,
"inside" = 0 < u < 1 (the clip's derivative; at the measure-zero bounds u = 0, u = 1 we follow torch.clamp's
backward, which passes the gradient, so blocked and eager agree exactly), dropout multiplier R (R = 1 without
dropout; O = (c * R) V):

    dV   = (c * R)^T dO
    dc   = (dO V^T) * R
    dp   = kappa * inside * dc            (the clip passes gradient only where it does not clip)
    ds   = p * (dp - sum_k p_k dp_k)       (the softmax Jacobian, row-wise)
         = kappa * p * (w - D),           w = inside * dc,    D_i = sum_j p_ij * inside_ij * dc_ij
    dQ   = scale * ds K,    dK = scale * ds^T Q

FlashAttention gets its row term from D_i = rowsum(dO * O), which holds because there O_i = sum_j p_ij v_j, so
sum_j p_ij (dO_i . v_j) = dO_i . O_i. Here O_i = sum_j c_ij v_j: rowsum(dO * O) = sum_j c_ij dc_ij, which differs
from D_i twice over: c is not p (c = kappa p + gamma inside the clip range), and clipped entries carry p_ij
through the softmax Jacobian but no gradient of their own (inside = 0). With nothing clipped one could still
write D_i = (dO_i . O_i - gamma_i dO_i . sum_j R_ij v_j) / kappa_i, but with clipping the indicator is needed, so D
is its own reduction over the key blocks: one extra streaming pass in the backward when there is more than one key
block (pass A: D; pass B: dQ, dK, dV), none when the key range fits one block.

Masked keys get s = -inf, so p = 0 and c = clip(gamma, 0, 1) = 0 exactly, with no gradient. Rows with no visible
key (every key masked) return 0, with zero gradient, as the eager path does.

Entry points:
    blocked_clipped_attention(q, k, v, gamma, zeta, keep=None, causal=False, ...)  the kernel, any device
    flex_clipped_attention(...)   GPU: FlexAttention's two-call form (compiled to Triton)
    blocked_kernel(...)           the "blocked" kernel of attention/kernels.py's table, called by
                                  ``outlierfree_attention``; it runs the FlexAttention form where it can
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Iterator

import torch

from .config import AttentionConfig
from ..errors import require
from .ramp import ramp_of
from .softmax import visible_keys
from .two_pass import mexp_accumulate, mexp_clip_probs, mexp_lse, mexp_state

# Largest key block streamed in one piece. Up to this many keys a query block's scores are computed once (one
# pass in the forward and one in the backward); beyond it the two-pass streaming form runs.
MAX_KEY_BLOCK = 16384
# Target number of score elements in one tile (all batch-heads of a chunk x query block x key block). Small
# sequences batch many heads into one tile so Python overhead stays low; long ones go one head at a time.
TILE_ELEMS = 1 << 19
# How pass 1 gets the row log-sum-exp (the ``first_pass`` argument, ``cfg.extra["first_pass"]``): the online running
# max (default) or the Two-Pass algorithm's (mantissa, exponent) sum.
FIRST_PASSES = ("online", "two_pass")


# ---- helpers --------------------------------------------------------------------------------------------------
def _sl(t: torch.Tensor, b: slice, h: slice, i: slice, j: slice | None = None) -> torch.Tensor:
    """Slice a 4-d tensor broadcastable to (B, H, Tq, Tk); dimensions of size 1 stay whole (broadcast)."""
    idx = [s if t.shape[d] != 1 else slice(None) for d, s in enumerate((b, h, i, j or slice(None)))]
    return t[tuple(idx)]


def _chunks(B: int, H: int, tile_per_head: int, tile_elems: int) -> Iterator[tuple[slice, slice]]:
    """Rectangular (batch, head) chunks so that a chunk's tile has about ``tile_elems`` elements."""
    n = max(1, tile_elems // max(1, tile_per_head))  # heads per chunk
    if n >= H:
        nb = max(1, n // H)
        for b0 in range(0, B, nb):
            yield slice(b0, min(B, b0 + nb)), slice(0, H)
    else:
        for b in range(B):
            for h0 in range(0, H, n):
                yield slice(b, b + 1), slice(h0, min(H, h0 + n))


class _Plan:
    """Block layout shared by forward and backward (the backward must see the same tiles, e.g. for dropout)."""

    def __init__(self, B: int, H: int, Tq: int, Tk: int, causal: bool, q_block: int, k_block: int | None,
                 tile_elems: int, scale: float):
        self.B, self.H = B, H
        self.Tq, self.Tk, self.causal, self.scale = Tq, Tk, causal, scale
        self.off = Tk - Tq  # causal: query row i sees keys 0 .. off + i (aligned to the last key, as keep_mask)
        self.bq = max(1, min(int(q_block), Tq))
        self.bk = max(1, min(int(k_block or MAX_KEY_BLOCK), Tk))
        self.chunks = list(_chunks(B, H, self.bq * self.bk, tile_elems))

    def buffers(self, n: int, ref: torch.Tensor) -> list[torch.Tensor]:
        """``n`` flat scratch buffers large enough for the largest tile, shared by all chunks."""
        size = max((b.stop - b.start) * (h.stop - h.start) for b, h in self.chunks) * self.bq * self.bk
        return [torch.empty(size, dtype=ref.dtype, device=ref.device) for _ in range(n)]

    def q_blocks(self) -> Iterator[tuple[int, int]]:
        for i0 in range(0, self.Tq, self.bq):
            yield i0, min(self.Tq, i0 + self.bq)

    def k_blocks(self, i0: int, i1: int) -> list[tuple[int, int]]:
        """Key blocks a query block needs: causal blocks stop at the last row's last visible key."""
        end = self.Tk if not self.causal else max(0, min(self.Tk, self.off + i1))
        return [(j0, min(end, j0 + self.bk)) for j0 in range(0, end, self.bk)]


class _Chunk:
    """One rectangular (batch, head) chunk: 3-d views (n = nb * nh, T, D) and two reusable score tiles."""

    def __init__(self, plan: _Plan, b: slice, h: slice, keep: torch.Tensor | None, gamma: torch.Tensor | float,
                 bufs: list[torch.Tensor]):
        self.plan, self.b, self.h, self.keep, self.gamma = plan, b, h, keep, gamma
        self.nb, self.nh = b.stop - b.start, h.stop - h.start
        self.n = self.nb * self.nh
        self._bufs = bufs  # flat scratch buffers: every tile is a contiguous view of the first elements of one

    def view3(self, t: torch.Tensor) -> torch.Tensor:
        """(B, H, T, X) -> this chunk's (n, T, X) (a view whenever the layout allows)."""
        return t[self.b, self.h].reshape(self.n, *t.shape[2:])

    def tile(self, i: int, rows: int, cols: int) -> torch.Tensor:
        """Scratch tile ``i`` as a contiguous (nb, nh, rows, cols) tensor."""
        return self._bufs[i][: self.n * rows * cols].view(self.nb, self.nh, rows, cols)

    def scores(self, q3: torch.Tensor, k3: torch.Tensor, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """Scaled scores of one tile into scratch tile 0, masked entries at -inf: (nb, nh, rows, cols)."""
        plan = self.plan
        rows, cols = i1 - i0, j1 - j0
        s = self.tile(0, rows, cols)
        qs = q3[:, i0:i1] * plan.scale  # (n, rows, D): scale the small q tile, not the scores
        torch.bmm(qs, k3[:, j0:j1].transpose(1, 2), out=s.view(self.n, rows, cols))
        if self.keep is not None:
            s.masked_fill_(~_sl(self.keep, self.b, self.h, slice(i0, i1), slice(j0, j1)), -math.inf)
        if plan.causal:
            c0 = max(j0, plan.off + i0 + 1)  # first column that some row of the block may not see
            if c0 < j1:
                cols_ = torch.arange(c0, j1, device=s.device)[None, :]  # (1, w)
                rows_ = torch.arange(i0, i1, device=s.device)[:, None] + plan.off  # (rows, 1)
                s[..., c0 - j0:].masked_fill_(cols_ > rows_, -math.inf)
        return s

    def gamma_kappa(self, zeta: float, i0: int, i1: int) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """gamma and kappa = zeta - gamma of a query block: floats, or (nb|1, nh|1, rows, 1) tensors."""
        g = _sl(self.gamma, self.b, self.h, slice(i0, i1)) if isinstance(self.gamma, torch.Tensor) else self.gamma
        return g, zeta - g

    def probs(self, q3, k3, i0, i1, j0, j1, row_lse, g, kappa, zeta):
        """Recompute one tile: p = exp(s - lse) (tile 0), c = clip(kappa p + gamma, 0, 1) (tile 1) and the bool
        "clip blocks the gradient" mask u < 0 or u > 1 (torch.clamp's backward passes it at the bounds; with
        zeta = 1, u <= 1 always since p <= 1)."""
        p = self.scores(q3, k3, i0, i1, j0, j1).sub_(row_lse).exp_()  # (nb, nh, rows, cols)
        u = torch.mul(p, kappa, out=self.tile(1, i1 - i0, j1 - j0)).add_(g)
        clipped = u < 0  # the complement of "inside" (masked_fill_ with it needs no float copy of a bool mask)
        if zeta != 1.0:
            clipped.logical_or_(u > 1)
        return p, u.clamp_(0.0, 1.0), clipped


def _dropout_keep(shape: torch.Size, p: float, seed: int, tile_id: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
    """The dropout multiplier of one tile (0 or 1 / (1 - p)), reproducible from (seed, tile_id) in the backward."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + tile_id) % (1 << 63))
    r = torch.rand(shape, generator=g, device=device, dtype=dtype)
    return (r >= p).to(dtype).mul_(1.0 / (1.0 - p))


def clip_rows(cfg: AttentionConfig, keep: torch.Tensor | None, causal: bool, Tq: int, Tk: int,
              device: torch.device | None = None, ramp: float = 1.0) -> tuple[torch.Tensor | float, float]:
    """(gamma, zeta) of a clipped-softmax or NCS config: gamma a number or per query row, like the eager path's
    ``cfg.params.clip_params(visible_keys(keep_mask(...)))`` with the causal mask given as a flag instead of a
    T x T tensor; ``ramp`` scales gamma (training's gamma ramp)."""
    n = visible_keys(keep, Tk, causal, Tq, device) if cfg.params.needs_rows() else float(Tk)
    return cfg.params.clip_params(n, ramp)


# ---- the autograd function ---------------------------------------------------------------------------------------
class BlockedClippedAttention(torch.autograd.Function):
    """Clipped-softmax attention, blocked over queries and keys, with a backward that recomputes the tiles.

    See the module docstring for the maths. Inputs: q (B, H, Tq, D), k and v (B, H, Tk, D), gamma (float or
    (B|1, H|1, Tq|1, 1)), zeta, keep (bool, broadcastable to (B, H, Tq, Tk), or None), causal (bool).
    """

    @staticmethod
    def forward(ctx, q, k, v, gamma, zeta, keep, causal, scale, q_block, k_block, tile_elems, dropout_p, seed,
                first_pass="online"):
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        plan = _Plan(B, H, Tq, Tk, causal, q_block, k_block, tile_elems, scale)
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)  # (B, H, Tq, D)
        lse = torch.full((B, H, Tq), math.inf, dtype=q.dtype, device=q.device)  # +inf: the row sees no key
        tile = 0
        bufs = plan.buffers(1, q)
        for b, h in plan.chunks:
            ch = _Chunk(plan, b, h, keep, gamma, bufs)
            q3, k3, v3, o3, lse3 = ch.view3(q), ch.view3(k), ch.view3(v), ch.view3(out), ch.view3(lse)
            for i0, i1 in plan.q_blocks():
                kbs = plan.k_blocks(i0, i1)
                if not kbs:
                    continue
                rows = i1 - i0
                g, kappa = ch.gamma_kappa(zeta, i0, i1)
                if len(kbs) == 1 and first_pass == "two_pass":  # one tile, its lse by (mantissa, exponent) pairs
                    (j0, j1), = kbs
                    s = ch.scores(q3, k3, i0, i1, j0, j1)  # (nb, nh, rows, cols)
                    state = mexp_accumulate(s, mexp_state((ch.nb, ch.nh, rows, 1), s))
                    row_lse, ok = mexp_lse(state)
                    if ok:
                        lse3[:, i0:i1] = row_lse.view(ch.n, rows)
                        # pass 2 on the same tile: masked keys (and rows seeing nothing) give clip(g) = 0
                        c = mexp_clip_probs(s, state, row_lse, kappa, g)
                        if dropout_p > 0:
                            c.mul_(_dropout_keep(c.shape, dropout_p, seed, tile, c.device, c.dtype))
                        o3[:, i0:i1].baddbmm_(c.view(ch.n, rows, j1 - j0), v3[:, j0:j1])
                        tile += 1
                        continue
                    # a row's max beyond +-2^21: the pair's range reduction would lose bits; the online form below
                if len(kbs) == 1:  # the whole key range in one tile: softmax and clip on the same scores
                    (j0, j1), = kbs
                    s = ch.scores(q3, k3, i0, i1, j0, j1)  # (nb, nh, rows, cols)
                    m = s.amax(dim=-1, keepdim=True)  # (nb, nh, rows, 1)
                    m = torch.where(m == -math.inf, 0.0, m)  # rows with no visible key: exp(-inf - 0) = 0
                    p = s.sub_(m).exp_()  # unnormalised probabilities
                    l = p.sum(dim=-1, keepdim=True)  # (nb, nh, rows, 1)
                    lse3[:, i0:i1] = torch.where(l > 0, m + torch.log(l), math.inf).view(ch.n, rows)
                    c = p.mul_(torch.where(l > 0, kappa / l, 0.0)).add_(g).clamp_(0.0, 1.0)  # masked: clip(g) = 0
                    if dropout_p > 0:
                        c.mul_(_dropout_keep(c.shape, dropout_p, seed, tile, c.device, c.dtype))
                    o3[:, i0:i1].baddbmm_(c.view(ch.n, rows, j1 - j0), v3[:, j0:j1])
                    tile += 1
                    continue
                # pass 1: the row log-sum-exp over the key blocks
                ok = False
                if first_pass == "two_pass":  # sum of exp as (mantissa, exponent) pairs: one read of each tile
                    state = mexp_state((ch.nb, ch.nh, rows, 1), q)
                    for j0, j1 in kbs:
                        state = mexp_accumulate(ch.scores(q3, k3, i0, i1, j0, j1), state)
                    row_lse, ok = mexp_lse(state)  # not ok: a row's max beyond +-2^21, redone below
                if not ok:  # online: running max and normaliser
                    m = torch.full((ch.nb, ch.nh, rows, 1), -math.inf, dtype=q.dtype, device=q.device)
                    l = torch.zeros_like(m)  # (nb, nh, rows, 1)
                    for j0, j1 in kbs:
                        s = ch.scores(q3, k3, i0, i1, j0, j1)
                        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                        m_safe = torch.where(m_new == -math.inf, 0.0, m_new)
                        l = l * torch.exp(m - m_safe) + s.sub_(m_safe).exp_().sum(dim=-1, keepdim=True)
                        m = m_new
                    row_lse = torch.where(l > 0, torch.where(m == -math.inf, 0.0, m) + torch.log(l), math.inf)
                lse3[:, i0:i1] = row_lse.view(ch.n, rows)
                # pass 2: recompute, clip, accumulate
                for j0, j1 in kbs:
                    s = ch.scores(q3, k3, i0, i1, j0, j1)
                    if ok:  # the paper's pass 2 (m / M * 2^(n - E)) with the clip fused
                        c = mexp_clip_probs(s, state, row_lse, kappa, g)
                    else:
                        c = s.sub_(row_lse).exp_().mul_(kappa).add_(g).clamp_(0.0, 1.0)
                    if dropout_p > 0:
                        c.mul_(_dropout_keep(c.shape, dropout_p, seed, tile, c.device, c.dtype))
                    o3[:, i0:i1].baddbmm_(c.view(ch.n, rows, j1 - j0), v3[:, j0:j1])
                    tile += 1
        g_t = gamma if isinstance(gamma, torch.Tensor) else None
        ctx.save_for_backward(q, k, v, lse, g_t, keep)
        ctx.gamma = None if g_t is not None else gamma
        ctx.args = (zeta, causal, scale, q_block, k_block, tile_elems, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, lse, g_t, keep = ctx.saved_tensors
        gamma = g_t if g_t is not None else ctx.gamma
        zeta, causal, scale, q_block, k_block, tile_elems, dropout_p, seed = ctx.args
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        plan = _Plan(B, H, Tq, Tk, causal, q_block, k_block, tile_elems, scale)
        d_out = d_out.contiguous()
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)  # (B, H, Tq, D)
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)  # (B, H, Tk, D)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
        tile = 0
        bufs = plan.buffers(2, q)
        for b, h in plan.chunks:
            ch = _Chunk(plan, b, h, keep, gamma, bufs)
            q3, k3, v3, do3 = ch.view3(q), ch.view3(k), ch.view3(v), ch.view3(d_out)
            dq3, dk3, dv3, lse3 = ch.view3(dq), ch.view3(dk), ch.view3(dv), ch.view3(lse)
            # dK and dV of the chunk accumulate transposed, (n, D, Tk): dO^T c is a far faster GEMM shape on the
            # CPU (N = keys) than c^T dO (M = keys, K = query block); copied back once per chunk
            dkT, dvT = (torch.zeros(ch.n, D, Tk, dtype=q.dtype, device=q.device) for _ in range(2))
            for i0, i1 in plan.q_blocks():
                kbs = plan.k_blocks(i0, i1)
                if not kbs:
                    continue
                rows = i1 - i0
                g, kappa = ch.gamma_kappa(zeta, i0, i1)
                row_lse = lse3[:, i0:i1].reshape(ch.nb, ch.nh, rows, 1)
                q_t, do_t = q3[:, i0:i1], do3[:, i0:i1]  # (n, rows, D)
                if len(kbs) > 1:  # pass A: D_i = sum_j p_ij inside_ij dc_ij over all key blocks
                    Drow = torch.zeros_like(row_lse)
                    for t, (j0, j1) in enumerate(kbs):
                        p, c, clipped = ch.probs(q3, k3, i0, i1, j0, j1, row_lse, g, kappa, zeta)
                        dc = c  # c is not needed in this pass: its tile takes dc = dO V^T
                        torch.bmm(do_t, v3[:, j0:j1].transpose(1, 2), out=dc.view(ch.n, rows, j1 - j0))
                        if dropout_p > 0:
                            dc.mul_(_dropout_keep(dc.shape, dropout_p, seed, tile + t, dc.device, dc.dtype))
                        Drow += dc.masked_fill_(clipped, 0.0).mul_(p).sum(dim=-1, keepdim=True)
                # pass B (the only pass with one key block): dV, then ds -> dQ, dK
                factor = kappa * scale  # ds = kappa * p * (w - D); scale from s = scale * q k^T
                alpha = 1.0 if isinstance(factor, torch.Tensor) else factor
                for t, (j0, j1) in enumerate(kbs):
                    cols = j1 - j0
                    p, c, clipped = ch.probs(q3, k3, i0, i1, j0, j1, row_lse, g, kappa, zeta)
                    c3 = c.view(ch.n, rows, cols)
                    if dropout_p > 0:
                        r = _dropout_keep(c.shape, dropout_p, seed, tile + t, c.device, c.dtype)
                        c.mul_(r)
                    dvT[:, :, j0:j1].baddbmm_(do_t.transpose(1, 2), c3)
                    w = torch.bmm(do_t, v3[:, j0:j1].transpose(1, 2), out=c3).view_as(c)  # dc, in c's tile
                    if dropout_p > 0:
                        w.mul_(r)
                    w.masked_fill_(clipped, 0.0).mul_(p)  # p * inside * dc
                    if len(kbs) == 1:
                        Drow = w.sum(dim=-1, keepdim=True)
                    ds = w.addcmul_(p, Drow, value=-1.0)  # p * (w - D), still without kappa * scale
                    if isinstance(factor, torch.Tensor):
                        ds.mul_(factor)
                    ds3 = ds.view(ch.n, rows, cols)
                    dq3[:, i0:i1].baddbmm_(ds3, k3[:, j0:j1], alpha=alpha)
                    dkT[:, :, j0:j1].baddbmm_(q_t.transpose(1, 2), ds3, alpha=alpha)
                tile += len(kbs)
            dk3.copy_(dkT.transpose(1, 2))
            dv3.copy_(dvT.transpose(1, 2))
            del dkT, dvT
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


def blocked_clipped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              gamma: torch.Tensor | float = -0.025, zeta: float = 1.0,
                              keep: torch.Tensor | None = None, causal: bool = False, scale: float | None = None,
                              q_block: int = 128, k_block: int | None = None, tile_elems: int = TILE_ELEMS,
                              dropout_p: float = 0.0, seed: int | None = None,
                              first_pass: str = "online") -> torch.Tensor:
    """Clipped-softmax attention ``clip((zeta - gamma) softmax(scale q k^T) + gamma, 0, 1) v`` in linear memory.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D) (repeat grouped k/v heads before calling).
        gamma: <= 0, a float or per-row tensor broadcastable to (B, H, Tq, 1) (see :func:`clip_rows`).
        zeta: >= 1.
        keep: boolean "may attend" mask broadcastable to (B, H, Tq, Tk), or None.
        causal: query i sees keys 0 .. Tk - Tq + i (combined with ``keep`` when both are given).
        scale: score scale, default D ** -0.5.
        q_block: query rows per tile. k_block: keys per tile (default: up to ``MAX_KEY_BLOCK`` keys in one tile,
            i.e. one pass; smaller values stream the keys in two passes).
        tile_elems: target elements per tile; short sequences batch several heads into one tile.
        dropout_p: dropout on the clipped probabilities (training); the mask of each tile is regenerated in the
            backward from ``seed`` (drawn from torch's global generator when None).
        first_pass: how pass 1 gets each row's log-sum-exp: ``"online"`` (running max, rescaled sum) or
            ``"two_pass"`` (the sum as (mantissa, exponent) pairs, attention/two_pass.py, compiled on the CPU: one
            read of each score tile, no max). Same outputs and gradients within float rounding.
    Returns:
        (B, H, Tq, D), in q's dtype (half precision is computed in float32).
    """
    require(first_pass in FIRST_PASSES, f"unknown first pass {first_pass!r} for the blocked kernel",
            f"use one of {', '.join(FIRST_PASSES)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if keep is not None and keep.dim() < 4:
        keep = keep.view((1,) * (4 - keep.dim()) + tuple(keep.shape))
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # tiles in float32, like eager's float32 softmax
        q, k, v = q.float(), k.float(), v.float()
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.to(device=q.device, dtype=q.dtype)
        if gamma.dim() < 4:
            gamma = gamma.view((1,) * (4 - gamma.dim()) + tuple(gamma.shape))
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 1 << 62, (1,)).item())
    out = BlockedClippedAttention.apply(q, k, v, gamma, float(zeta), keep, bool(causal), float(scale), int(q_block),
                                        k_block, int(tile_elems), float(dropout_p), seed or 0, first_pass)
    return out.to(dtype)


# ---- GPU: FlexAttention two-call form --------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_available(device: torch.device) -> bool:
    """Whether the FlexAttention path can run on ``device``: CUDA with Triton (FlexAttention on the CPU has no
    backward and no log-sum-exp in torch 2.13). ``OUTLIERFREE_BLOCKED_BACKEND=torch`` disables it."""
    if device.type != "cuda" or os.environ.get("OUTLIERFREE_BLOCKED_BACKEND", "auto") == "torch":
        return False
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import AuxRequest  # noqa: F401
    except ImportError:
        return False
    return True


def flex_clipped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor | float,
                           zeta: float, keep: torch.Tensor | None = None, causal: bool = False,
                           scale: float | None = None, compiled: bool = True) -> torch.Tensor:
    """Clipped-softmax attention as two FlexAttention calls (GPU; forward and backward by FlexAttention).

    Call 1 returns lse_i = log sum_j exp(s_ij). Call 2 uses ``score_mod(s) = log clip((zeta - gamma) exp(s - lse)
    + gamma, 0, 1)``, so its softmax is c_ij / sum_j c_ij and its own lse2_i = log sum_j c_ij; then
    O = O2 * exp(lse2) = sum_j c_ij v_j. Gradients flow through both calls (lse is a captured tensor that
    requires grad). ``log 0`` is taken as -inf without a NaN gradient, and exp(s - lse) is clamped to <= 1.

    ``compiled=False`` runs FlexAttention's eager reference (materialises scores; used to test the maths on the
    CPU). Its CUDA test passed on an H200 (torch 2.11 + Triton); see docs/attention_kernels.md.
    """
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    fa = _compiled_flex() if compiled else flex_attention
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    off = Tk - Tq
    block_mask = None
    if keep is not None or causal:
        if keep is not None and keep.dim() < 4:
            keep = keep.view((1,) * (4 - keep.dim()) + tuple(keep.shape))
        kb, kh, kq = ((keep.shape[0] > 1, keep.shape[1] > 1, keep.shape[2] > 1) if keep is not None
                      else (False, False, False))

        def mask_mod(b, h, qi, ki):
            ok = ki <= qi + off if causal else ki >= 0
            if keep is not None:
                zero = torch.zeros_like(qi)
                ok = ok & keep[b if kb else zero, h if kh else zero, qi if kq else zero, ki]
            return ok

        block_mask = create_block_mask(mask_mod, B, H, Tq, Tk, device=q.device)
    g_rows = None
    if isinstance(gamma, torch.Tensor):
        g_dtype = torch.promote_types(q.dtype, torch.float32)
        g_rows = gamma.to(g_dtype).expand(B, H, Tq, 1)[..., 0].contiguous()  # (B, H, Tq)
    _, aux = fa(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
    lse = aux.lse  # (B, H, Tq) float32, natural log; -inf where a row sees nothing
    lse = torch.where(lse == -math.inf, 0.0, lse)

    def score_mod(score, b, h, qi, ki):
        gam = g_rows[b, h, qi] if g_rows is not None else gamma
        p = torch.exp(torch.clamp(score - lse[b, h, qi], max=0.0))
        c = torch.clamp((zeta - gam) * p + gam, 0.0, 1.0)
        pos = c > 0
        return torch.where(pos, torch.log(torch.where(pos, c, 1.0)), -math.inf)

    o2, aux2 = fa(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                  return_aux=AuxRequest(lse=True))
    lse2 = torch.where(aux2.lse == -math.inf, -math.inf, aux2.lse)  # (B, H, Tq); -inf: every c is 0
    return o2 * torch.exp(lse2)[..., None].to(o2.dtype)


_FLEX_FAILED = False


def _flex_failed(e: Exception) -> None:
    global _FLEX_FAILED
    _FLEX_FAILED = True
    import warnings

    warnings.warn(f"FlexAttention clipped-softmax path failed ({type(e).__name__}: {e}); using the PyTorch blocked "
                  f"kernel from now on (set OUTLIERFREE_BLOCKED_BACKEND=torch to skip the attempt)", stacklevel=3)


# ---- the kernel outlierfree_attention calls ----------------------------------------------------------------------
def blocked_kernel(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   keep: torch.Tensor | None, scaling: float, dropout: float, cfg: AttentionConfig,
                   causal: bool = False) -> torch.Tensor:
    """The "blocked" kernel (attention/kernels.py): context (B, H, Tq, D) of a clipped-softmax or NCS layer without a
    T x T tensor (NCS is clipped softmax with zeta = eta and a per-row gamma, see attention/variants/ncs.py).

    ``causal=True`` (with ``keep`` None where the model passed no mask) stands for the causal mask, which it applies
    tile by tile instead of reading a T x T tensor.

    On CUDA with Triton (and no dropout) it runs :func:`flex_clipped_attention`; everywhere else the PyTorch
    :func:`blocked_clipped_attention`. ``cfg.block_size`` is the query block; ``cfg.extra["key_block"]`` may set
    the key block (default: one pass up to ``MAX_KEY_BLOCK`` keys), ``cfg.extra["first_pass"]`` the first pass
    (``"online"`` or ``"two_pass"``, see :func:`blocked_clipped_attention`; the FlexAttention path has its own).
    """
    Tq, Tk = query.shape[-2], key.shape[-2]
    gamma, zeta = clip_rows(cfg, keep, causal, Tq, Tk, query.device, ramp_of(module))
    if dropout == 0.0 and flex_available(query.device) and not _FLEX_FAILED:
        try:
            return flex_clipped_attention(query, key, value, gamma, zeta, keep, causal, scaling)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - untested hardware path: fall back to the PyTorch kernel, once
            _flex_failed(e)
    return blocked_clipped_attention(query, key, value, gamma, zeta, keep, causal, scaling,
                                     q_block=cfg.block_size, k_block=cfg.extra.get("key_block"),
                                     dropout_p=dropout, first_pass=cfg.extra.get("first_pass", "online"))
