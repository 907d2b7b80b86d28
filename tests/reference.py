"""Independent float64 reference implementations: plain loops over trajectories.

Written from the formulas in DESIGN §3, sharing no code with steppo_jax.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def step_sums(x, ids, S):
    out = np.zeros((x.shape[0], S))
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if 0 <= ids[b, t] < S:
                out[b, ids[b, t]] += x[b, t]
    return out


def to_tokens(x_bs, ids):
    out = np.zeros(ids.shape)
    for b, t in np.ndindex(ids.shape):
        if 0 <= ids[b, t] < x_bs.shape[1]:
            out[b, t] = x_bs[b, ids[b, t]]
    return out


def step_gae(r, v, mask, boot, gamma, lam):
    B, S = r.shape
    adv, ret = np.zeros((B, S)), np.zeros((B, S))
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for k in reversed(range(n)):
            v_next = v[b, k + 1] if k + 1 < n else boot[b]
            last = r[b, k] + gamma * v_next - v[b, k] + gamma * lam * last
            adv[b, k] = last
            ret[b, k] = last + v[b, k]
    return adv, ret


def token_gae(r, v, mask, gamma, lam, boot=None):
    B, T = r.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        last, v_next = 0.0, (0.0 if boot is None else boot[b])
        for t in reversed(idx):
            last = r[b, t] + gamma * v_next - v[b, t] + gamma * lam * last
            adv[b, t], ret[b, t] = last, last + v[b, t]
            v_next = v[b, t]
    return adv, ret


def discounted(r, mask, gamma):
    out = np.zeros(r.shape)
    for b in range(r.shape[0]):
        n = int(mask[b].sum())
        for k in range(n):
            out[b, k] = sum(gamma ** (i - k) * r[b, i] for i in range(k, n))
    return out


def whiten(x, mask, eps=1e-8):
    vals = x[mask.astype(bool)].astype(np.float64)
    out = np.zeros(x.shape)
    if vals.size == 0:
        return out
    mean = vals.mean()
    std = math.sqrt(((vals - mean) ** 2).sum() / max(vals.size - 1, 1))
    out[mask.astype(bool)] = (vals - mean) / (std + eps)
    return out


def _groups(ids, valid=None):
    groups = defaultdict(list)
    for i, g in enumerate(ids):
        if valid is None or valid[i]:
            groups[g].append(i)
    return groups


def grpo(scores, gids, num_groups, eps=1e-6, scale_by_std=True):
    out = np.zeros(len(scores))
    for g, members in _groups(gids).items():
        if not 0 <= g < num_groups:
            continue
        xs = np.array([scores[i] for i in members], np.float64)
        if len(xs) == 1:
            mean, std = 0.0, 1.0
        else:
            mean, std = xs.mean(), xs.std(ddof=1)
        for i in members:
            out[i] = (scores[i] - mean) / (std + eps) if scale_by_std else scores[i] - mean
    return out


def rloo(scores, gids, num_groups):
    out = np.zeros(len(scores))
    for g, members in _groups(gids).items():
        if not 0 <= g < num_groups:
            continue
        for i in members:
            others = [scores[j] for j in members if j != i]
            out[i] = scores[i] - (np.mean(others) if others else 0.0)
    return out


def reinforce_pp(scores, gids, action_mask, num_groups):
    centred = np.zeros(len(scores))
    in_group = np.zeros(len(scores), bool)
    for g, members in _groups(gids).items():
        if 0 <= g < num_groups:
            mean = np.mean([scores[i] for i in members])
            for i in members:
                centred[i], in_group[i] = scores[i] - mean, True
    mask = action_mask & in_group[:, None]
    return whiten(np.where(mask, centred[:, None], 0.0), mask)


def gigpo(r, mask, gids, anchors, gamma, step_weight=1.0, eps=1e-6):
    B, S = r.shape
    scores = [sum(r[b, : int(mask[b].sum())]) for b in range(B)]
    episode = grpo(scores, gids, B, eps)
    G = discounted(r, mask, gamma)
    sets = defaultdict(list)
    for b in range(B):
        for k in range(int(mask[b].sum())):
            sets[(gids[b], anchors[b, k])].append((b, k))
    out = np.zeros((B, S))
    for members in sets.values():
        xs = np.array([G[b, k] for b, k in members])
        for b, k in members:
            step = 0.0 if len(xs) == 1 else (G[b, k] - xs.mean()) / (xs.std(ddof=1) + eps)
            out[b, k] = episode[b] + step_weight * step
    return out


def step_policy_loss(logp, old, adv_bs, ids, clip_low, clip_high, ratio, aggregation, dual_clip=None, weights=None):
    """Loss value and its analytic gradient w.r.t. logp (per token); ``dual_clip`` caps a
    negative-advantage step's loss at -c*A, ``weights`` [B, S] scale each step's loss."""
    B, T = logp.shape
    S = adv_bs.shape[1]
    total, grad = 0.0, np.zeros((B, T))
    steps = [(b, k, [t for t in range(T) if ids[b, t] == k]) for b in range(B) for k in range(S)]
    steps = [s for s in steps if s[2]]
    n_tokens = sum(len(ts) for _, _, ts in steps)
    denom = n_tokens if aggregation == "token_mean" else len(steps)
    for b, k, ts in steps:
        log_ratio = sum(logp[b, t] - old[b, t] for t in ts)
        if ratio == "geometric":
            log_ratio /= len(ts)
        s, a = math.exp(log_ratio), adv_bs[b, k]
        clipped = min(max(s, 1 - clip_low), 1 + clip_high)
        per_token = max(-a * s, -a * clipped)
        capped = dual_clip is not None and a < 0 and per_token > -dual_clip * a
        if capped:
            per_token = -dual_clip * a
        weight = 1.0 / len(ts) if aggregation == "step_mean_token_mean" else 1.0
        weight *= 1.0 if weights is None else weights[b, k]
        total += weight * per_token * len(ts)
        # d/dlogp_t of max(-a s_t, -a clip(s_t)) with d s_t / d logp_t = s.
        # Inside the clip range both branches coincide; outside, only a strictly larger
        # unclipped branch carries gradient.
        g = -a * s if (1 - clip_low < s < 1 + clip_high or -a * s > -a * clipped) and not capped else 0.0
        for t in ts:
            grad[b, t] = weight * g / denom
    return total, denom, grad
