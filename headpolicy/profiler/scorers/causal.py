"""`causal`: each KV head's first-order effect on the selection objective when it alone streams.

For every KV head h and every streaming option (sink, window) o, estimate how much the
objective (profiler/objective.py: answer log-prob drop + text NLL increase, nats per token)
grows when h keeps only its sink + window instead of every token:

    est[h, o] = sum over calibration sequences i, query heads q of h, positions t:
                g_i[q, t] . (out_o[q, t] - out_full[q, t])

with g_i = d loss_i / d (attention output of q at t) from one forward and one backward of the
full model per sequence (loss_i = the sequence's share of the objective's NLL terms), and
out_o the head's attention output under option o, computed from the captured q, k, v with the
runtime's own streaming op. One forward + one backward per sequence gives every head and
every option at once; no policy is run. It is an estimate (linear in a change that is not
small), so selection uses it to order the choices and measurement decides (compile.py).

`estimate(...)` returns the whole [layers, kv_heads, options] table (signed); the registered
scorer gives the column of the policy's own sink/window.

Linearised at a policy (`rules=`): the forward runs every head as the policy says (its
streaming heads at their sink/window), so g is the gradient with the other heads already
streaming; the effects stay g . (out_o - out_full). One head's estimate at the full model is
small when other heads carry the same answer (streaming any one of them alone costs nothing);
at a policy that streams those others, the heads that still carry it show their whole cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headpolicy.models import describe_model
from headpolicy.policies.precision import DEFAULT_GROUP, DEFAULT_RESIDUAL, quantize, quantized_tokens
from headpolicy.profiler.objective import Calibration, Reference
from headpolicy.profiler.probes import kv_group
from headpolicy.profiler.tasks import NEEDLE_KINDS, Task
from headpolicy.runtime.attention import model_attention, padding_mask, streaming_band
from headpolicy.runtime.state import applied

from . import register_scorer

CAUSAL_NAME = "headpolicy_causal"
_ACTIVE: list[_Recorder] = []
Rules = Sequence[Sequence[tuple[int, int] | None]]  # [layers][kv_heads]: (sink, window), None = every token


@dataclass
class _Layer:
    q: torch.Tensor  # [B, Hq, S, D]
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor
    out: torch.Tensor  # full attention output [B, Hq, S, D]
    delta: torch.Tensor  # zeros added to the output: its gradient is d loss / d output
    scale: float


class _Recorder:
    def __init__(self, native_windows, rules: Rules | None = None):
        self.layers: dict[int, _Layer] = {}
        self.native = native_windows
        self.rules = rules  # the policy the forward runs (None: the full model)


def _policy_output(out: torch.Tensor, q, k, v, scale: float, rules_row) -> torch.Tensor:
    """The layer's attention output under one layer's rules: each streaming KV head's query heads
    at its sink/window (the runtime's own op), the others as `out` (full attention) has them."""
    by_rule: dict[tuple[int, int], list[int]] = {}
    for h, rule in enumerate(rules_row):
        if rule is not None:
            by_rule.setdefault(tuple(rule), []).append(h)
    if not by_rule:
        return out
    group = q.shape[1] // k.shape[1]
    out = out.clone()
    for (sink, window), heads in by_rule.items():
        kv = torch.tensor(heads, device=q.device)
        qh = (kv[:, None] * group + torch.arange(group, device=q.device)).reshape(-1)
        out[:, qh] = streaming_band(q[:, qh], k[:, kv], v[:, kv], sink, window, scale)
    return out


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention that records q, k, v and leaves a hook for d loss / d output."""
    rec = _ACTIVE[-1]
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("causal profiling runs unpadded sequences only")
    if query.shape[2] != key.shape[2]:
        raise ValueError("causal profiling runs whole sequences without a KV cache (use_cache=False)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    native = None if rec.native is None else rec.native[layer]
    out = model_attention(query, key, value, scale, native)
    run = out if rec.rules is None or native is not None else _policy_output(out, query, key, value, scale,
                                                                              rec.rules[layer])  # fmt: skip
    delta = torch.zeros_like(out, requires_grad=True)
    rec.layers[layer] = _Layer(query.detach(), key.detach(), value.detach(), out.detach(), delta, scale)
    # d loss / d delta = d loss / d output, through every later layer (their attention included)
    return (run + delta).transpose(1, 2).contiguous(), None


AttentionInterface.register(CAUSAL_NAME, causal_attention)
AttentionMaskInterface.register(CAUSAL_NAME, padding_mask)


@contextlib.contextmanager
def _recording(model, native_windows, rules: Rules | None = None):
    if applied(model) is not None:
        raise ValueError("profile the unmodified model: this one already has a headpolicy applied")
    previous = model.config._attn_implementation
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    rec = _Recorder(native_windows, rules)
    model.set_attn_implementation(CAUSAL_NAME)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def _sequences(calib: Calibration, ref: Reference | None) -> list[tuple[torch.Tensor, int, float, bool]]:
    """(ids [1, T], first target position, weight, is an answer task) per sequence, weighted as in Loss.value."""
    tasks: list[Task] = [t for i, t in enumerate(calib.tasks) if ref is None or ref.answered[i]]
    out = []
    for t in tasks:
        ids = t.tensor(with_answer=True)
        out.append((ids, t.prompt_len, 1.0 / (len(tasks) * len(t.answer_ids)), True))
    for text in calib.texts:
        ids = torch.tensor([list(text)])
        out.append((ids, calib.text_from + 1, 1.0 / (len(calib.texts) * (len(text) - calib.text_from - 1)), False))
    return out


def _answer_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over positions: the NLL, or minus the log-odds log p - log(1 - p) of the target.

    A model that is sure of an answer (p near 1) has a vanishing NLL gradient: to first order,
    no head matters to it, although streaming a retrieval head loses the answer outright. The
    log-odds (target logit minus the log-sum-exp of the others) does not saturate, so its
    gradient still says which heads carry the answer."""
    if kind == "nll":
        return F.cross_entropy(logits, target, reduction="sum")
    z = logits.gather(-1, target[:, None])[:, 0]
    others = logits.scatter(-1, target[:, None], float("-inf")).logsumexp(-1)
    return (others - z).sum()


def estimate(
    model,
    calib: Calibration,
    options: Sequence[tuple[int, int]],
    *,
    ref: Reference | None = None,
    samples: int = 0,
    chunks: int | None = None,
    answer_loss: str = "log_odds",
    seed: int = 0,
    rules: Rules | None = None,
    progress=None,
) -> np.ndarray:
    """Per KV head and (sink, window) option, what streaming that head alone costs, as the
    ESTIMATES [len(ESTIMATES), layers, kv_heads, len(options)]:

    first_order      the first-order objective increase (nats per token), from the true tokens'
                     NLL on text and, on answers, `answer_loss` ("log_odds", default: see
                     _answer_loss; or "nll")
    abs_first_order  the same with every query position's term in absolute value
    dropped_mass     the attention mass the option drops, summed over query positions and heads
    target_mass      the attention mass the option drops at the target positions only (the
                     answers' and the text's), summed over query heads, mean per target position
                     (answers and text weighted as in Loss.value)
    answer_abs, answer_mass, text_abs
                     abs_first_order and target_mass over the answer tasks only, abs_first_order
                     over the texts only
    fisher           the second-order increase of KL(full || policy) at the target positions:
                     with labels y sampled from the full model's own next-token distributions,
                     E_y[(g_y . d_out)^2] / 2 = d_out^T J^T F J d_out / 2 (F the Fisher of the
                     logits, J the Jacobian from the head's output to them): the Gauss-Newton
                     quadratic, exact in expectation, `samples` backward passes per sequence.
                     Positive and scale-aware where the first order cancels.

    0 where a layer is the model's own sliding layer. `ref` restricts the answer terms to the
    tasks the full model answers. `chunks`: per layer and sequence, sum about this many blocks of
    query rows (drawn by gradient norm, unbiased) instead of all: the cost falls in proportion.
    `rules`: linearise at that policy instead of the full model (module docstring)."""
    return _estimate(model, calib, options, (), DEFAULT_GROUP, DEFAULT_RESIDUAL, ref, samples, chunks, answer_loss,
                     seed, progress, rules)[0]  # fmt: skip


def estimate_with_precision(
    model,
    calib: Calibration,
    options: Sequence[tuple[int, int]],
    bits: Sequence[int],
    *,
    kv_group: int = DEFAULT_GROUP,
    kv_residual: int = DEFAULT_RESIDUAL,
    ref: Reference | None = None,
    samples: int = 0,
    chunks: int | None = None,
    answer_loss: str = "log_odds",
    seed: int = 0,
    rules: Rules | None = None,
    progress=None,
) -> tuple[np.ndarray, np.ndarray]:
    """`estimate`, and from the same forward and backward passes what quantising each head alone
    costs: [len(ESTIMATES), layers, kv_heads, len(bits), 2], the first four ESTIMATES filled, for
    each of `bits` (8, 4) in a retrieval head's layout ([..., 0]) and a streaming head's
    ([..., 1]); see `_quant_effects`.
    The fisher estimate uses the same sampled labels as the options'; `chunks` samples the query
    blocks of the options and of the quantisation effects alike (drawn apart)."""
    return _estimate(model, calib, options, tuple(bits), kv_group, kv_residual, ref, samples, chunks, answer_loss,
                     seed, progress, rules)  # fmt: skip


def _estimate(model, calib, options, bits, kv_group_size, kv_residual, ref, samples, chunks, answer_loss, seed,
              progress, rules=None):  # fmt: skip
    layers, heads, kv_heads = kv_group(model)
    group = heads // kv_heads
    native = describe_model(model).native_windows
    est = torch.zeros(len(ESTIMATES), layers, kv_heads, len(options), dtype=torch.float64)
    qest = torch.zeros(len(ESTIMATES), layers, kv_heads, len(bits), 2, dtype=torch.float64)
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with _recording(model, native, rules) as rec:
        for ids, first, weight, is_task in _sequences(calib, ref):
            ids = ids.to(device)
            rec.layers.clear()
            logits = model(ids, use_cache=False, logits_to_keep=ids.shape[1] - first + 1).logits[0, :-1].float()
            loss = _answer_loss(logits, ids[0, first:], answer_loss if is_task else "nll")
            loss.mul(weight).backward(retain_graph=samples > 0)
            grads = {li: [lay.delta.grad.clone()] for li, lay in rec.layers.items()}
            probs = torch.softmax(logits.detach().cpu(), dim=-1)
            for k in range(samples):  # gradients of the log-likelihood of labels the model itself samples
                for lay in rec.layers.values():
                    lay.delta.grad = None
                y = torch.multinomial(probs, 1, generator=gen)[:, 0].to(device)
                F.cross_entropy(logits, y, reduction="sum").backward(retain_graph=k < samples - 1)
                for li, lay in rec.layers.items():
                    grads[li].append(lay.delta.grad.clone())
            for li, lay in rec.layers.items():
                if native is not None and native[li] is not None:
                    continue
                effects = _layer_effects(lay, options, group, grads[li], chunks, gen, targets=first - 1)
                effects = effects.cpu()  # [4 + samples, Hkv, O]
                est[:3, li] += effects[:3]
                est[4, li] += weight * effects[3]
                if is_task:  # the answers' and the text's parts apart
                    est[5, li] += effects[1]
                    est[6, li] += weight * effects[3]
                else:
                    est[7, li] += effects[1]
                if samples:  # the squared per-sequence sums; each target position's KL counts with its weight
                    est[3, li] += weight * 0.5 * effects[4:].pow(2).mean(0)
                if bits:  # [3 + samples, Hkv, len(bits), 2], reduced as the options' effects are
                    qeffects = _quant_effects(lay, bits, group, kv_group_size, kv_residual, grads[li], chunks, gen,
                                              first - 1).cpu()  # fmt: skip
                    qest[:3, li] += qeffects[:3]
                    if samples:
                        qest[3, li] += weight * 0.5 * qeffects[3:].pow(2).mean(0)
            rec.layers.clear()
            if progress is not None:
                progress.update(1)
    return est.numpy(), qest.numpy()


CHUNK = 256  # query rows per block in _layer_effects
# what estimate() gives per head and option (see its docstring)
ESTIMATES = ("first_order", "abs_first_order", "dropped_mass", "fisher", "target_mass", "answer_abs", "answer_mass",
             "text_abs")  # fmt: skip
KEY_BLOCK = 64  # prefix sums are kept per block of keys; the partial block is summed exactly


def losses(est: np.ndarray, name: str) -> np.ndarray:
    """[layers, kv_heads, options] selection losses from estimate()'s table: one of ESTIMATES, or
    `split`: the answers' part (answer_abs) at the smallest window for every streaming option,
    plus the text's part (text_abs) per option.

    Why split: where a needle sits is unknown at inference, so no window can be counted on to
    keep it; a head that carries answers must keep everything, and what the window ladder
    trades is the text (perplexity), where more window keeps more of what a head reads."""
    if name == "split":
        answers, text = est[ESTIMATES.index("answer_abs")], est[ESTIMATES.index("text_abs")]
        return answers[:, :, :1] + text
    return est[ESTIMATES.index(name)]


SELECTION = (*ESTIMATES, "split")  # what compile --estimate accepts


class _PrefixSums:
    """sum_{j <= x} of a row quantity, for any key index x per row: block sums plus the partial block.

    t: [..., C, b] (rows x keys, zero beyond each row's last key). Cheaper than a full cumulative
    sum: one reduction over the row, then only KEY_BLOCK elements per row and per lookup.
    """

    def __init__(self, t: torch.Tensor):
        n = -(-t.shape[-1] // KEY_BLOCK) * KEY_BLOCK
        self.blocks = F.pad(t, (0, n - t.shape[-1])).unflatten(-1, (-1, KEY_BLOCK))  # [..., C, nb, K]
        sums = self.blocks.sum(-1).double()
        self.before = F.pad(sums.cumsum(-1), (1, 0))  # [..., C, nb + 1]: sum of the blocks before block m
        self.total = sums.sum(-1)  # [..., C]

    def upto(self, x: torch.Tensor) -> torch.Tensor:
        """x: int64 [C] key index per row (-1: nothing). Returns float64 [..., C]."""
        xc = x.clamp(min=0)
        blk = xc // KEY_BLOCK
        shape = self.before.shape[:-1]
        full = self.before.gather(-1, blk.view(*([1] * (len(shape) - 1)), -1, 1).expand(*shape, 1))[..., 0]
        idx = blk.view(*([1] * (len(shape) - 1)), -1, 1, 1).expand(*shape, 1, KEY_BLOCK)
        block = self.blocks.gather(-2, idx)[..., 0, :]  # [..., C, K]: the block holding x
        inside = torch.arange(KEY_BLOCK, device=x.device)[None, :] <= (xc % KEY_BLOCK)[:, None]
        part = (block * inside).sum(-1).double()
        return torch.where(x >= 0, full + part, torch.zeros_like(full))


def _blocks(
    start: int, S: int, grads, chunks: int | None, gen, certain_from: int | None = None
) -> list[tuple[int, float]]:
    """(first query row, weight) of the blocks of CHUNK rows _layer_effects sums: every block, or
    about `chunks` of them drawn with probability growing with the block's gradient norm and
    weighted by 1 / probability (Horvitz-Thompson: the sums stay unbiased, and the blocks that
    carry the gradient, an answer's rows, are always in). Blocks with rows from `certain_from` on
    are always in too."""
    starts = list(range(start, S, CHUNK))
    if chunks is None or len(starts) <= chunks:
        return [(a, 1.0) for a in starts]
    norm = torch.stack([sum(g[:, :, a : a + CHUNK].double().norm() for g in grads) for a in starts]).cpu()
    prob = torch.ones(len(starts), dtype=torch.float64)
    free = torch.tensor([certain_from is None or a + CHUNK <= certain_from for a in starts])
    for _ in range(len(starts)):  # probabilities proportional to the norm, capped at 1 (the capped are certain)
        room = chunks - int((~free).sum())
        share = norm * free
        if room <= 0 or float(share.sum()) <= 0:
            prob = torch.where(free, torch.zeros_like(prob), prob)
            break
        prob = torch.where(free, room * share / share.sum(), prob)
        over = free & (prob >= 1.0)
        if not bool(over.any()):
            break
        prob[over], free = 1.0, free & ~over
    draw = torch.rand(len(starts), generator=gen, dtype=torch.float64) < prob
    return [(a, 1.0 / float(pr)) for a, pr, d in zip(starts, prob, draw, strict=True) if d]


@torch.no_grad()
def _layer_effects(
    lay: _Layer,
    options,
    group: int,
    grads: Sequence[torch.Tensor],
    chunks: int | None = None,
    gen=None,
    targets: int | None = None,
) -> torch.Tensor:
    """[4 + len(grads) - 1, kv_heads, options]: for grads[0] (the objective's gradient) the first-order
    effect, its per-position absolute value and the dropped attention mass; the dropped mass on
    the rows from `targets` on (all rows when None; with `chunks`, in blocks always summed when
    they are few); for every further gradient its first-order effect (signed), summed over
    positions and query heads.

    Exactly, from the full attention rows, without running attention once per option: for query i
    with full-attention probabilities p_j, a streaming option drops D_i = {j: sink <= j <= i - window}.
    With P = sum_D p_j and U_D = sum_D p_j (g . v_j), the kept keys renormalise to
        out_option = (out_full - sum_D p_j v_j) / (1 - P),   so
        g . (out_option - out_full) = (P * U - U_D) / (1 - P),   U = sum_{j <= i} p_j (g . v_j).
    Every window of the ladder drops a prefix of the same row (in key order), so prefix sums of
    one row serve every option: a layer costs about one dense attention per gradient. With
    `chunks`, about that many blocks of query rows are summed, drawn by gradient norm (_blocks).
    """
    B, Hq, S, D = lay.q.shape
    Hkv = lay.k.shape[1]
    out = torch.zeros(3 + len(grads), Hkv, len(options), dtype=torch.float64, device=lay.q.device)
    first = min(sink + window for sink, window in options)
    targets = 0 if targets is None else targets
    few = S - targets <= CHUNK  # an answer's rows: summed exactly, not sampled
    for a, scale in _blocks(min(first, S), S, grads, chunks, gen, certain_from=targets if few else None):
        b = min(S, a + CHUNK)
        C = b - a
        # one [G*C, D] x [D, b] product per KV head (broadcasting over the group is several times slower)
        q = lay.q[:, :, a:b].reshape(B, Hkv, group * C, D)
        k, v = lay.k[:, :, :b], lay.v[:, :, :b]  # keys up to the last query of the block
        rows = torch.arange(a, b, device=q.device)
        future = torch.arange(b, device=q.device)[None, :] > rows[:, None]  # [C, b]
        logits = (q @ k.transpose(-1, -2)).view(B, Hkv, group, C, b) * lay.scale
        p = torch.softmax(logits.masked_fill_(future, float("-inf")), dim=-1)
        P = _PrefixSums(p)
        Us = [_PrefixSums(p * (g[:, :, a:b].reshape(B, Hkv, group * C, D) @ v.transpose(-1, -2)).view(p.shape))
              for g in grads]  # fmt: skip
        sink_ends = {}
        for j, (sink, window) in enumerate(options):
            last = rows - window  # the last dropped key of each row; none when last < sink
            has = last >= sink
            if not bool(has.any()):
                continue
            if sink not in sink_ends:
                sink_ends[sink] = torch.full_like(rows, sink - 1)
            P_d = P.upto(last) - P.upto(sink_ends[sink])
            kept = (1.0 - P_d).clamp(min=1e-6)
            out[2, :, j] += scale * (P_d * has).sum(dim=(0, 2, 3))
            out[3, :, j] += scale * (P_d * (has & (rows >= targets))).sum(dim=(0, 2, 3))
            for n, U in enumerate(Us):
                U_d = U.upto(last) - U.upto(sink_ends[sink])
                effect = ((P_d * U.total - U_d) / kept) * has  # [B, Hkv, G, C]
                if n == 0:
                    out[0, :, j] += scale * effect.sum(dim=(0, 2, 3))
                    out[1, :, j] += scale * effect.abs().sum(dim=(0, 2, 3))
                else:
                    out[3 + n, :, j] += scale * effect.sum(dim=(0, 2, 3))
    return out


@torch.no_grad()
def _quant_effects(
    lay: _Layer,
    bits: Sequence[int],
    group: int,
    kv_group_size: int,
    residual: int,
    grads: Sequence[torch.Tensor],
    chunks: int | None = None,
    gen=None,
    targets: int | None = None,
) -> torch.Tensor:
    """[3 + len(grads) - 1, kv_heads, len(bits), 2], laid out as `_layer_effects`: for grads[0]
    (the true tokens' gradient) the sum over positions and query heads of g . (out_quantised -
    out_full), its per-position absolute value and the dropped mass (0: quantisation drops no
    key); for every further (sampled-label) gradient its signed sum, which `_estimate` squares
    into the fisher estimate. out_quantised is the full attention output with the head's K/V
    replaced by what the quantised cache would give back (policies/precision.py):

        layout 0 (a retrieval head)  keys per channel in groups of kv_group tokens, values per
                                     token, the last tokens (the residual) exact
        layout 1 (a streaming head)  keys and values per token

    The cache as it stands after the whole sequence stands in for every query (a query early in
    the sequence really saw a few more exact tokens), and a streaming head's quantisation is
    measured over full attention: selection adds it to the streaming estimate of the head's
    window. Each head's output depends on its own K/V only, so quantising all heads at once
    gives every head's single-head effect. `chunks`, `gen`, `targets`: as `_layer_effects`, the
    query rows summed in about `chunks` blocks drawn by gradient norm (every row when None).
    """
    B, Hq, S, D = lay.q.shape
    Hkv = lay.k.shape[1]
    out = torch.zeros(2 + len(grads), Hkv, len(bits), 2, dtype=torch.float64, device=lay.q.device)
    n_q = quantized_tokens(S, kv_group_size, residual)
    if chunks is None:
        blocks = [(0, S, 1.0)]  # one causal attention over every row
    else:
        few = targets is not None and S - targets <= CHUNK  # an answer's rows: always summed
        blocks = [(a, min(S, a + CHUNK), w) for a, w in _blocks(0, S, grads, chunks, gen, targets if few else None)]

    def restored(x, b, per_channel, upto):
        head = quantize(x[:, :, :upto], b, kv_group_size, per_channel=per_channel).dequantize(x.dtype)
        return torch.cat([head, x[:, :, upto:]], dim=2)

    for i, b in enumerate(bits):
        layouts = ((restored(lay.k, b, True, n_q), restored(lay.v, b, False, n_q)),
                   (restored(lay.k, b, False, S), restored(lay.v, b, False, S)))  # fmt: skip
        for j, (k, v) in enumerate(layouts):
            for a, e, weight in blocks:  # query rows a..e-1 over keys 0..e-1
                mask = (
                    None
                    if a == 0
                    else torch.arange(e, device=k.device)[None, :] <= torch.arange(a, e, device=k.device)[:, None]
                )
                o = F.scaled_dot_product_attention(lay.q[:, :, a:e], k[:, :, :e], v[:, :, :e], attn_mask=mask,
                                                   is_causal=a == 0, scale=lay.scale, enable_gqa=True)  # fmt: skip
                d_out = o - lay.out[:, :, a:e]
                for n, g in enumerate(grads):  # g: [B, Hq, S, D]
                    effect = (g[:, :, a:e] * d_out).sum(-1).double().view(B, Hkv, group, e - a)  # per head, position
                    if n == 0:
                        out[0, :, i, j] += weight * effect.sum(dim=(0, 2, 3))
                        out[1, :, i, j] += weight * effect.abs().sum(dim=(0, 2, 3))
                    else:
                        out[2 + n, :, i, j] += weight * effect.sum(dim=(0, 2, 3))
    return out


@register_scorer("causal", kinds=NEEDLE_KINDS)
def causal_score(model, tasks, *, sink, window, progress=None):
    """First-order effect on the answers' log-odds of streaming each KV head alone (sink, window)."""
    calib = Calibration(tuple(tasks), (), 0)
    return estimate(model, calib, [(sink, window)], samples=0, progress=progress)[0, :, :, 0]
