"""Naive float64 references: multi-head latent attention (a loop over queries, with the keys
and values expanded per head) and DeepSeek-V3 group-limited routing (a loop over tokens)."""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, pos, inv_freq, scale):
    """x [..., d] at position `pos`, rotate-half layout, cos/sin multiplied by `scale`."""
    d = x.shape[-1]
    ang = pos * inv_freq
    c, s = np.cos(ang) * scale, np.sin(ang) * scale
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def mla(x, w, segment_ids, positions, inv_freq, rope_scale, softmax_scale, eps):
    """x [t, e] one row; w: dict of float64 weights named as MLAttention's attributes
    (q or q_a/q_a_norm/q_b, kv_a, kv_a_norm, k_rope, k_b, v_b, o) -> [t, e]."""
    t = x.shape[0]
    if "q" in w:
        q = np.einsum("te,end->tnd", x, w["q"])
    else:
        q = np.einsum("tr,rnd->tnd", rms_norm(x @ w["q_a"], w["q_a_norm"], eps), w["q_b"])
    nope = w["k_b"].shape[-1]
    c_kv = rms_norm(x @ w["kv_a"], w["kv_a_norm"], eps)  # [t, kv_lora]
    k_rope = x @ w["k_rope"]  # [t, rope]: one rotary key shared by all heads
    n = q.shape[1]
    out = np.zeros((t, n, w["v_b"].shape[-1]))
    for i in range(t):
        visible = [j for j in range(i + 1) if segment_ids[j] == segment_ids[i]]
        for h in range(n):
            qi = np.concatenate([q[i, h, :nope], rope(q[i, h, nope:], positions[i], inv_freq,
                                                      rope_scale)])
            scores = []
            for j in visible:
                kj = np.concatenate([c_kv[j] @ w["k_b"][:, h], rope(k_rope[j], positions[j],
                                                                   inv_freq, rope_scale)])
                scores.append(qi @ kj * softmax_scale)
            p = np.exp(np.array(scores) - max(scores))
            p /= p.sum()
            out[i, h] = sum(pj * (c_kv[j] @ w["v_b"][:, h]) for pj, j in zip(p, visible))
    return np.einsum("tnv,nve->te", out, w["o"])


def grouped_topk(scores, bias, n_group, topk_group, k):
    """DeepSeek-V3 selection per token: scores [tokens, experts] (sigmoid), bias [experts]
    -> expert ids [tokens, k] (as a sorted list per token)."""
    e = scores.shape[1]
    size = e // n_group
    out = []
    for row in scores + bias:
        groups = [sorted(row[g * size:(g + 1) * size])[-2:] for g in range(n_group)]
        group_score = [sum(v) for v in groups]
        best = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [i for i in range(e) if i // size in best]
        out.append(sorted(sorted(allowed, key=lambda i: -row[i])[:k]))
    return np.array(out)


def yarn_mscale(factor, mscale=1.0):
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
