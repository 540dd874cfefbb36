"""`echo_induction`: echo and induction heads on repeated random tokens (RazorAttention).

On `prefix + r + r`, a query at r[i] in the second copy finds r[i] earlier at needle[0] + i
(an *echo* head attends there) and the token after it at needle[0] + i + 1 (an *induction*
head attends there). Score = mean over second-copy queries of (echo + induction)
attention probability; both kinds need the far context, so both count.
"""

from __future__ import annotations

import torch

from headpolicy.profiler.probes import Probe, capturing, kv_group, reduce_to_kv

from . import register_scorer


class _EchoProbe(Probe):
    def __init__(self, layers, heads):
        self.total = torch.zeros(layers, heads, dtype=torch.float64)
        self.n_rows = 0
        self.task = None

    def rows(self, layer, seq_len):
        a, b = self.task.needle
        return torch.arange(b + 1, b + (b - a) - 1)  # second copy; the first query has no history yet

    def consume(self, layer, rows, probs):
        a, b = self.task.needle
        src = rows - (b - a)  # the earlier copy of each query's token
        echo = probs.gather(-1, src.view(1, 1, -1, 1).expand(*probs.shape[:3], 1))
        induction = probs.gather(-1, (src + 1).view(1, 1, -1, 1).expand(*probs.shape[:3], 1))
        self.total[layer] += (echo + induction).sum(dim=(0, 2, 3)).double().cpu()
        if layer == 0:
            self.n_rows += probs.shape[0] * len(rows)


@register_scorer("echo_induction", kinds=("repeat",))
@torch.no_grad()
def echo_induction_score(model, tasks, *, sink, window, progress=None):
    """Attention to the earlier copy of the current token (echo) and to the token after it (induction)."""
    layers, heads, kv_heads = kv_group(model)
    probe = _EchoProbe(layers, heads)
    device = next(model.parameters()).device
    with capturing(model, probe):
        for t in tasks:
            probe.task = t
            model(t.tensor().to(device), use_cache=False, logits_to_keep=1)
            if progress is not None:
                progress.update(1)
    return reduce_to_kv(probe.total / max(probe.n_rows, 1), kv_heads).numpy()
