"""Naive float64 attention: a loop over queries, visible keys chosen one by one.

Optional Qwen2-style q/k/v biases (added after the projections) and Qwen3-style q/k RMSNorm
(per head over head_dim, one scale vector shared by all heads, applied after the biases and
before the rotary embedding)."""

from __future__ import annotations

import numpy as np


def rope(x, pos, theta):
    """x [heads, d] at position `pos`, rotate-half layout."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def rms_norm(x, scale, eps):
    """x [..., d] / sqrt(mean(x^2) + eps) * scale [d], element by element."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx]
        out[idx] = row / np.sqrt(sum(v * v for v in row) / len(row) + eps) * scale
    return out


def attention(x, wq, wk, wv, wo, segment_ids, positions, theta, *, q_bias=None, k_bias=None,
              v_bias=None, q_scale=None, k_scale=None, eps=1e-6):
    """x [t, e] one row; wq [e, n, d], wk/wv [e, kv, d], wo [n, d, e] -> [t, e].

    q_bias [n, d], k_bias/v_bias [kv, d]: added to the projections when given.
    q_scale/k_scale [d]: RMSNorm of each head's q/k (epsilon `eps`) when given.
    """
    t = x.shape[0]
    n, kv = wq.shape[1], wk.shape[1]
    q = np.einsum("te,end->tnd", x, wq)
    k = np.einsum("te,ekd->tkd", x, wk)
    v = np.einsum("te,ekd->tkd", x, wv)
    if q_bias is not None:
        q = q + q_bias
    if k_bias is not None:
        k = k + k_bias
    if v_bias is not None:
        v = v + v_bias
    if q_scale is not None:
        q = rms_norm(q, q_scale, eps)
    if k_scale is not None:
        k = rms_norm(k, k_scale, eps)
    q = np.stack([rope(q[i], positions[i], theta) for i in range(t)])
    k = np.stack([rope(k[i], positions[i], theta) for i in range(t)])
    out = np.zeros((t, n, wq.shape[2]))
    for i in range(t):
        visible = [j for j in range(i + 1) if segment_ids[j] == segment_ids[i]]
        for h in range(n):
            g = h // (n // kv)
            scores = np.array([q[i, h] @ k[j, g] for j in visible]) / np.sqrt(wq.shape[2])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, g] for pj, j in zip(p, visible))
    return np.einsum("tnd,nde->te", out, wo)
