"""Clipped softmax and the mask helpers every attention path and variant shares.

    clipped_softmax(x) = clip((zeta - gamma) * softmax(x) + gamma, 0, 1),   gamma <= 0 <= 1 <= zeta

With gamma < 0 a head reaches an *exact* zero probability at finite logits (softmax(x) <= -gamma / (zeta - gamma)),
so it no longer needs to push its logits to extremes to "do nothing" (Bondarenko et al., 2023, eq. 4.1).
Which gamma a variant uses is the variant's (attention/variants/clipped.py, ncs.py: ``gamma_at``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def keep_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool,
              device: torch.device | None = None) -> torch.Tensor | None:
    """Normalise any attention mask into a boolean "may attend" mask, broadcastable to (B, H, Tq, Tk).

    Accepts the boolean masks of transformers' ``sdpa_mask`` (True = attend), additive float masks (0 = attend,
    large negative = masked) and ``None``. With ``None`` and ``causal`` a lower-triangular mask is made (aligned to
    the last key, as with a KV cache); ``None`` without ``causal`` stays ``None`` (every key visible).
    """
    if attention_mask is None:
        if not causal or q_len == 1:
            return None
        # query i (of the last q_len positions) sees keys 0 .. k_len - q_len + i
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
        return (k_pos <= q_pos)[None, None]  # (1, 1, Tq, Tk)
    if attention_mask.dtype == torch.bool:
        mask = attention_mask
    else:
        # additive masks use dtype-min (or -inf) for masked keys; anything below half of min is masked
        mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return mask[..., -k_len:]


def visible_keys(mask: torch.Tensor | None, k_len: int, causal: bool = False, q_len: int | None = None,
                 device: torch.device | None = None) -> torch.Tensor | float:
    """Number of keys each query row can see, (B|1, H|1, Tq|1, 1) float32 clamped to >= 1, or ``k_len`` when nothing
    is masked.

    ``causal=True`` adds the causal mask of ``q_len`` query rows (aligned to the last key, as :func:`keep_mask`)
    without building it, for the blocked kernel, which never holds a T x T tensor: row i alone sees
    ``k_len - q_len + i + 1`` keys; with ``mask`` as well the count is summed one block of query rows at a time.
    Counts are whole numbers, so they equal the counts of the materialised mask exactly.
    """
    if not causal:
        if mask is None:
            return float(k_len)
        return mask.sum(dim=-1, keepdim=True).clamp_min(1).to(torch.float32)
    if q_len is None:
        raise ValueError("visible_keys with causal=True needs q_len")
    Tq, Tk = q_len, k_len
    if mask is None:
        i = torch.arange(Tq, device=device, dtype=torch.float32)
        return (i + (Tk - Tq + 1)).clamp(0, Tk).clamp_min(1).view(1, 1, Tq, 1)
    if mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    out = []
    off = Tk - Tq
    kq = mask.expand(*mask.shape[:2], Tq, Tk)
    for i0 in range(0, Tq, 256):  # (.., 256, Tk) bool at a time: memory stays linear in T
        i1 = min(Tq, i0 + 256)
        tri = torch.arange(Tk, device=mask.device)[None, :] <= (torch.arange(i0, i1, device=mask.device)[:, None] + off)
        out.append((kq[:, :, i0:i1] & tri).sum(-1, keepdim=True))
    return torch.cat(out, dim=2).clamp_min(1).to(torch.float32)


def clipped_softmax(scores: torch.Tensor, gamma: torch.Tensor | float = 0.0, zeta: float = 1.0,
                    mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """``clip((zeta - gamma) * softmax(scores) + gamma, 0, 1)`` over ``dim``, with masked entries exactly zero.

    Args:
        scores: attention logits, e.g. (B, H, Tq, Tk).
        gamma: <= 0; a float, or a tensor broadcastable to ``scores`` (per-row gamma).
        zeta: >= 1.
        mask: boolean "may attend" mask broadcastable to ``scores``, or ``None``.

    With ``gamma == 0`` and ``zeta == 1`` the result equals ``softmax`` bit for bit (no stretch, no clip is
    applied), so vanilla models lose nothing by going through this function.
    """
    if mask is not None:
        # dtype-min instead of -inf: a fully masked row then gives a finite uniform softmax that the mask zeroes,
        # where -inf would give NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    # half-precision softmax is computed in float32 (as transformers' OPT does); float32/64 stay as they are
    probs = F.softmax(scores.float() if low_precision else scores, dim=dim)
    plain = isinstance(gamma, (int, float)) and gamma == 0 and zeta == 1
    if not plain:
        probs = torch.clamp((zeta - gamma) * probs + gamma, 0.0, 1.0)
    probs = probs.to(scores.dtype)
    if mask is not None:
        probs = probs.masked_fill(~mask, 0.0)
    return probs


def masked_max(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Row max over visible keys, (.., Tq, 1); -inf for a row that sees nothing."""
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.amax(dim=-1, keepdim=True)


# softmax by the Two-Pass algorithm (and its three-pass / online references): attention/two_pass.py
from .two_pass import online_softmax, three_pass_softmax, two_pass_softmax  # noqa: E402,F401
