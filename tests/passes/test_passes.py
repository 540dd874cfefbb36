"""One positive test (graph changes, outputs equal the reference) and one negative test
(a graph the pass must leave untouched) per pass."""

import pytest
import torch
from torch import nn

from headpolicy.passes.capture import capture, flatten_calling_convention
from headpolicy.passes.graph_ops import RETRIEVAL_OP, SDPA, STREAMING_OP
from headpolicy.passes.manager import PassContext, run_passes
from headpolicy.passes.pipeline import pass_context
from headpolicy.policies.plan import plan_layers
from tests.conftest import policy_for, tiny_llama
from tests.passes.conftest import reference_logits, run_steps

TOL = 1e-5
MIXED = [[False, True], [True, False]]  # layer 0 must be permuted; both layers split


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def context(model, policy, mode="prefill", skip_noop=True):
    return pass_context(capture(model, mode), model, policy, skip_noop=skip_noop)


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(97, 16), nn.Linear(16, 97)

    def forward(self, input_ids):
        return self.lin(torch.relu(self.emb(input_ids)))


def no_attention_context(policy):
    ep = torch.export.export(NoAttention().eval(), (torch.zeros(1, 5, dtype=torch.long),))
    return PassContext(flatten_calling_convention(ep.module()), "prefill", tuple(plan_layers(policy)))


# ---- locate_attention ----------------------------------------------------------------------------
def test_locate_attention_binds_layers_and_unexpanded_kv(llama):
    ctx = context(llama, policy_for(llama, MIXED))
    before = ctx.gm.code
    run_passes(ctx, ["locate_attention"])
    sites = ctx.facts["attention_sites"]
    assert sorted(sites) == [0, 1] and ctx.counts["locate_attention"] == 2
    for layer, s in sites.items():
        assert s.sdpa.target == SDPA and s.num_heads == 6 and s.num_kv_heads == 2
        assert s.k.meta["val"].shape[1] == 2 and s.v.meta["val"].shape[1] == 2  # behind repeat_kv
        assert f"layers.{layer}.self_attn" in ctx.layout.paths[layer]  # found through the model adapter
    assert ctx.gm.code == before  # binding only


def test_locate_attention_finds_nothing_without_attention(llama):
    ctx = no_attention_context(policy_for(llama, MIXED))
    before = ctx.gm.code
    run_passes(ctx, ["locate_attention"])
    assert ctx.facts["attention_sites"] == {} and ctx.counts["locate_attention"] == 0
    assert ctx.gm.code == before


# ---- permute_heads --------------------------------------------------------------------------------
def test_permute_heads_reorders_weights_same_outputs(llama):
    ids = torch.randint(3, 97, (1, 11))
    expected = llama(ids).logits
    weight = llama.model.layers[0].self_attn.q_proj.weight.clone()
    ctx = context(llama, policy_for(llama, MIXED))
    run_passes(ctx, ["locate_attention", "permute_heads"])
    assert ctx.counts["permute_heads"] == 1  # layer 1 is already [retrieval, streaming]
    attrs = [n.target for n in ctx.gm.graph.nodes if n.op == "get_attr"]
    assert sum(t.startswith("hp_perm0_") for t in attrs) == 4 and not any(t.startswith("hp_perm1_") for t in attrs)
    with torch.no_grad():
        torch.testing.assert_close(ctx.gm(ids)[0], expected, atol=TOL, rtol=0)
    assert torch.equal(llama.model.layers[0].self_attn.q_proj.weight, weight)  # the model is not touched


def test_permute_heads_leaves_identity_orders(llama):
    ctx = context(llama, policy_for(llama, [[True, False], [True, True]]))
    before = ctx.gm.code
    run_passes(ctx, ["locate_attention", "permute_heads"])
    assert ctx.counts["permute_heads"] == 0 and ctx.gm.code == before


# ---- split_attention ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "retrieval, sink, window, length",
    [(MIXED, 2, 3, 13), ([[False, False], [True, False]], 0, 1, 7), ([[False, True], [False, False]], 4, 8, 29)],
)
def test_split_attention_matches_reference(llama, retrieval, sink, window, length):
    policy = policy_for(llama, retrieval, sink=sink, window=window)
    ctx = context(llama, policy)
    run_passes(ctx, ["locate_attention", "permute_heads", "split_attention"])
    assert ctx.counts["split_attention"] == 2
    t = targets(ctx.gm)
    assert SDPA not in t and STREAMING_OP in t
    assert (RETRIEVAL_OP in t) == any(any(r) for r in retrieval)
    ids = torch.randint(3, 97, (1, length))
    with torch.no_grad():
        torch.testing.assert_close(ctx.gm(ids)[0], reference_logits(llama, policy, ids), atol=TOL, rtol=0)


def test_split_attention_mixed_windows_per_head():
    model = tiny_llama(heads=8, kv_heads=4, hidden=64)
    policy = policy_for(model, [[False, True, False, False], [True, False, True, False]], sink=1, window=3)
    layers = list(policy.layers)
    layers[0] = (layers[0][0].__class__("streaming", sink=3, window=5), *layers[0][1:])
    policy = policy.replace(layers=tuple(layers))
    ctx = context(model, policy)
    run_passes(ctx, ["locate_attention", "permute_heads", "split_attention"])
    assert targets(ctx.gm).count(STREAMING_OP) == 3  # layer 0: two (sink, window) groups
    ids = torch.randint(3, 97, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(ctx.gm(ids)[0], reference_logits(model, policy, ids), atol=TOL, rtol=0)


def test_split_attention_skips_all_retrieval_layers(llama):
    ctx = context(llama, policy_for(llama, [[True, True], [True, True]]), skip_noop=True)
    before = ctx.gm.code
    run_passes(ctx, ["locate_attention", "permute_heads", "split_attention"])
    assert ctx.counts["split_attention"] == 0 and ctx.gm.code == before


def test_split_attention_all_retrieval_reproduces_model(llama):
    """Design invariant: every head retrieval == the unmodified model (here even when split)."""
    ctx = context(llama, policy_for(llama, [[True, True], [True, True]]), skip_noop=False)
    run_passes(ctx, ["locate_attention", "permute_heads", "split_attention"])
    assert targets(ctx.gm).count(RETRIEVAL_OP) == 2
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ctx.gm(ids)[0], llama(ids).logits, atol=1e-4, rtol=0)


# ---- bind_cache -----------------------------------------------------------------------------------
@pytest.mark.parametrize("retrieval", [MIXED, [[True, True], [False, False]]])
def test_bind_cache_decode_matches_reference_over_3x_window(llama, retrieval):
    from headpolicy.passes import compile_step

    sink, window, prompt = 2, 3, 5
    policy = policy_for(llama, retrieval, sink=sink, window=window)
    prefill, decode = compile_step(llama, policy, "prefill"), compile_step(llama, policy, "decode")
    assert decode.counts["bind_cache"] == 2
    names = [n.name for n in decode.gm.graph.nodes if n.op == "placeholder"]
    assert names == decode.input_names()
    ids = torch.randint(3, 97, (1, prompt + 3 * window + 1))
    logits, cache = run_steps(prefill, decode, ids, prompt)
    ref = reference_logits(llama, policy, ids)[0, prompt - 1 :]
    torch.testing.assert_close(torch.stack(logits), ref, atol=TOL, rtol=0)
    for entry, k in zip(decode.cache, cache[::2], strict=True):  # streaming parts stay sink + window
        assert k.shape[2] == (ids.shape[1] if entry.length is None else sink + window)


def test_bind_cache_leaves_graph_without_attention(llama):
    ctx = no_attention_context(policy_for(llama, MIXED))
    before = ctx.gm.code
    run_passes(ctx, ["locate_attention", "permute_heads", "split_attention", "bind_cache"])
    assert ctx.counts["bind_cache"] == 0 and ctx.facts["cache_spec"] == [] and ctx.gm.code == before
