"""`retrieval`: the copy-paste retrieval score of Wu et al. (2024), teacher-forced.

One forward pass over prompt + answer stands in for greedy decoding (identical while the
model copies correctly). At answer step t the query is the token before answer[t]; a query
head *copies* at that step if its top-attended key lies in the needle span and holds
answer[t]. Score = copying steps / answer steps over all needle tasks.

Heads that never copy would all tie at 0, so the mean attention probability on the copied
token is added with weight 1e-3: it orders them without changing the order of copiers.
"""

from __future__ import annotations

import torch

from headpolicy.profiler.probes import Probe, capturing, kv_group, reduce_to_kv
from headpolicy.profiler.tasks import NEEDLE_KINDS

from . import register_scorer

SOFT_WEIGHT = 1e-3


class _CopyProbe(Probe):
    def __init__(self, layers: int, heads: int):
        self.hits = torch.zeros(layers, heads, dtype=torch.float64)
        self.soft = torch.zeros(layers, heads, dtype=torch.float64)
        self.task = None

    def rows(self, layer, seq_len):
        t = self.task
        return torch.arange(t.prompt_len - 1, t.prompt_len - 1 + len(t.answer_ids))

    def consume(self, layer, rows, probs):
        t = self.task
        ids = torch.tensor(t.input_ids + t.answer_ids, device=probs.device)
        target = ids[rows + 1]  # the token produced at each step: [n]
        a, b = t.needle
        top = probs.argmax(dim=-1)  # [B, Hq, n]
        hit = (top >= a) & (top < b) & (ids[top] == target)
        in_needle = torch.zeros(probs.shape[-1], dtype=torch.bool, device=probs.device)
        in_needle[a:b] = True
        same = in_needle[None, :] & (ids[None, : probs.shape[-1]] == target[:, None])  # [n, T]
        soft = (probs * same).sum(-1)  # [B, Hq, n]
        self.hits[layer] += hit.sum(dim=(0, 2)).double().cpu()
        self.soft[layer] += soft.sum(dim=(0, 2)).double().cpu()


@register_scorer("retrieval", kinds=NEEDLE_KINDS)
@torch.no_grad()
def retrieval_score(model, tasks, *, sink, window, progress=None):
    """Copy-paste retrieval: how often a head's top attention lands on the needle token being copied."""
    layers, heads, kv_heads = kv_group(model)
    probe = _CopyProbe(layers, heads)
    steps = 0
    device = next(model.parameters()).device
    with capturing(model, probe):
        for t in tasks:
            probe.task = t
            model(t.tensor(with_answer=True).to(device), use_cache=False, logits_to_keep=1)
            steps += len(t.answer_ids)
            if progress is not None:
                progress.update(1)
    per_q = (probe.hits + SOFT_WEIGHT * probe.soft) / max(steps, 1)
    return reduce_to_kv(per_q, kv_heads).numpy()
