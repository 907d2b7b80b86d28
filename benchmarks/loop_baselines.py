"""Per-trajectory loop implementations of each estimator, written the way PyTorch
trainers in this field usually write them (Python loops over trajectories or tokens,
boolean-mask assignment per step). The baseline `benchmarks/credit.py` measures against.

Inputs are torch tensors of the packed layout: step_ids [B, T] int, action_mask [B, T]
bool, values [B, T] float, step_rewards [B, S], step_mask [B, S] bool, value_pos [B, S],
terminated [B] bool, group_ids [B], anchor_ids [B, S].
"""

from __future__ import annotations

from collections import defaultdict

import torch


def _whiten(x, mask, eps):
    vals = x[mask]
    return torch.where(mask, (x - vals.mean()) / (vals.std() + eps), torch.zeros_like(x))


def step_gae(d, gamma, lam):
    B, T = d["step_ids"].shape
    adv_tokens = torch.zeros(B, T)
    step_adv = torch.zeros_like(d["step_rewards"])
    for b in range(B):
        n = int(d["step_mask"][b].sum())
        values = d["values"][b, d["value_pos"][b, :n]]
        boot = 0.0 if d["terminated"][b] else float(d["values"][b, d["seq_lens"][b] - 1])
        last = 0.0
        for k in reversed(range(n)):
            v_next = float(values[k + 1]) if k + 1 < n else boot
            last = float(d["step_rewards"][b, k]) + gamma * v_next - float(values[k]) + gamma * lam * last
            step_adv[b, k] = last
    step_adv = _whiten(step_adv, d["step_mask"], 1e-8)
    for b in range(B):
        for k in range(int(d["step_mask"][b].sum())):
            adv_tokens[b][d["step_ids"][b] == k] = step_adv[b, k]
    return adv_tokens


def token_gae(d, gamma, lam):
    # The batched reverse loop over tokens of the common PyTorch trainers, skipping
    # non-action tokens by carrying the next action token's value and advantage.
    B, T = d["step_ids"].shape
    mask = d["action_mask"]
    values = torch.cat([d["values"][:, :1], d["values"][:, :-1]], dim=1)
    last_tok = mask & (torch.cat([d["step_ids"][:, 1:], torch.full((B, 1), -1)], 1) != d["step_ids"])
    step_r = torch.gather(d["step_rewards"], 1, d["step_ids"].clamp(min=0))
    rewards = torch.where(last_tok, step_r, torch.zeros(()))
    v_next = torch.where(d["terminated"], 0.0, d["values"][torch.arange(B), d["seq_lens"] - 1])
    a_next = torch.zeros(B)
    adv = torch.zeros(B, T)
    for t in reversed(range(T)):
        m = mask[:, t]
        a = rewards[:, t] + gamma * v_next - values[:, t] + gamma * lam * a_next
        adv[:, t] = torch.where(m, a, torch.zeros(()))
        v_next = torch.where(m, values[:, t], v_next)
        a_next = torch.where(m, a, a_next)
    return _whiten(adv, mask, 1e-8)


def _scores(d):
    return [float(d["step_rewards"][b, d["step_mask"][b]].sum()) for b in range(d["step_ids"].shape[0])]


def _broadcast(d, per_traj):
    out = torch.zeros(d["step_ids"].shape)
    for b, a in enumerate(per_traj):
        out[b][d["action_mask"][b]] = a
    return out


def grpo(d, eps=1e-6):
    scores = _scores(d)
    groups = defaultdict(list)
    for b, g in enumerate(d["group_ids"].tolist()):
        groups[g].append(scores[b])
    stats = {g: (torch.tensor(v).mean(), torch.tensor(v).std()) if len(v) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
             for g, v in groups.items()}
    adv = [(s - stats[g][0]) / (stats[g][1] + eps) for s, g in zip(scores, d["group_ids"].tolist())]
    return _broadcast(d, adv)


def rloo(d):
    scores = _scores(d)
    groups = defaultdict(list)
    for b, g in enumerate(d["group_ids"].tolist()):
        groups[g].append(b)
    adv = [0.0] * len(scores)
    for members in groups.values():
        total = sum(scores[i] for i in members)
        for i in members:
            adv[i] = scores[i] - (total - scores[i]) / (len(members) - 1) if len(members) > 1 else scores[i]
    return _broadcast(d, adv)


def reinforce_pp(d):
    scores = _scores(d)
    groups = defaultdict(list)
    for b, g in enumerate(d["group_ids"].tolist()):
        groups[g].append(scores[b])
    means = {g: sum(v) / len(v) for g, v in groups.items()}
    adv = _broadcast(d, [s - means[g] for s, g in zip(scores, d["group_ids"].tolist())])
    return _whiten(adv, d["action_mask"], 1e-8)


def gigpo(d, gamma, eps=1e-6):
    B, S = d["step_rewards"].shape
    scores = _scores(d)
    groups = defaultdict(list)
    for b, g in enumerate(d["group_ids"].tolist()):
        groups[g].append(scores[b])
    ep = {}
    for g, v in groups.items():
        t = torch.tensor(v)
        ep[g] = (t.mean(), t.std()) if len(v) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
    returns = torch.zeros(B, S)
    anchor_sets = defaultdict(list)
    for b in range(B):
        n = int(d["step_mask"][b].sum())
        g = 0.0
        for k in reversed(range(n)):
            g = float(d["step_rewards"][b, k]) + gamma * g
            returns[b, k] = g
        for k in range(n):
            anchor_sets[(int(d["group_ids"][b]), int(d["anchor_ids"][b, k]))].append((b, k))
    step_adv = torch.zeros(B, S)
    for members in anchor_sets.values():
        if len(members) < 2:
            continue
        vals = torch.stack([returns[b, k] for b, k in members])
        mean, std = vals.mean(), vals.std()
        for b, k in members:
            step_adv[b, k] = (returns[b, k] - mean) / (std + eps)
    out = torch.zeros(d["step_ids"].shape)
    for b in range(B):
        g = int(d["group_ids"][b])
        e = (scores[b] - ep[g][0]) / (ep[g][1] + eps)
        for k in range(int(d["step_mask"][b].sum())):
            out[b][d["step_ids"][b] == k] = e + step_adv[b, k]
    return out
