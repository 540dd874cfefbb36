"""`attention_mass`: the share of attention a head puts outside its sink + window.

Measured on the rows that matter for retrieval: the last `QUERY_ROWS` prompt positions
(the question) and the answer steps (teacher-forced), averaged over needle tasks. A head
that puts little mass on keys a streaming head would drop loses little by streaming.
"""

from __future__ import annotations

import torch

from headpolicy.policies.rule import dropped
from headpolicy.profiler.probes import Probe, capturing, kv_group, reduce_to_kv
from headpolicy.profiler.tasks import NEEDLE_KINDS

from . import register_scorer

QUERY_ROWS = 32


class _MassProbe(Probe):
    def __init__(self, layers, heads, sink, window):
        self.total = torch.zeros(layers, heads, dtype=torch.float64)
        self.sink, self.window = sink, window
        self.n_rows = 0
        self.task = None

    def rows(self, layer, seq_len):
        return torch.arange(max(0, seq_len - QUERY_ROWS - len(self.task.answer_ids)), seq_len)

    def consume(self, layer, rows, probs):
        T = probs.shape[-1]
        q = rows[:, None]  # capture runs full self-attention: query slot == position
        k = torch.arange(T, device=probs.device)[None, :]
        lost = dropped(q, k, self.sink, self.window)  # [n, T]
        self.total[layer] += (probs * lost).sum(-1).sum(dim=(0, 2)).double().cpu()
        if layer == 0:
            self.n_rows += probs.shape[0] * len(rows)


@register_scorer("attention_mass", kinds=NEEDLE_KINDS)
@torch.no_grad()
def attention_mass_score(model, tasks, *, sink, window, progress=None):
    """Share of attention outside the sink + window on the question and answer rows."""
    layers, heads, kv_heads = kv_group(model)
    probe = _MassProbe(layers, heads, sink, window)
    device = next(model.parameters()).device
    with capturing(model, probe):
        for t in tasks:
            probe.task = t
            model(t.tensor(with_answer=True).to(device), use_cache=False, logits_to_keep=1)
            if progress is not None:
                progress.update(1)
    return reduce_to_kv(probe.total / max(probe.n_rows, 1), kv_heads).numpy()
