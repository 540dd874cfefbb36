"""Every supported architecture keeps the runtime invariants on a tiny random config.

- all-retrieval policy == the unmodified model (prefill logits, and split-cache decoding);
- mixed policy == the dense masked reference (reference.py) for prefill and for decoding
  well past sink + window, with left padding;
- anything else raises UnsupportedModelError naming the architecture.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from headpolicy import (
    HeadPolicy,
    HeadSpec,
    PolicyError,
    SplitKVCache,
    UnsupportedModelError,
    apply,
    describe_model,
    fingerprint,
)
from headpolicy.models import get_adapter, supported_architectures
from headpolicy.runtime.attention import REFERENCE_ATTN_NAME
from headpolicy.runtime.state import applied
from tests.conftest import policy_for

VOCAB, SINK, WINDOW = 97, 4, 8


def _common(heads, kv_heads, layers=3):
    return dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


# name -> (model class, config); configs without head_dim get hidden_size // num_attention_heads.
ARCHS = {
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**_common(6, 3), head_dim=16)),
    "llama-mha": lambda: (LlamaForCausalLM, LlamaConfig(**_common(4, 4), head_dim=16)),
    "mistral": lambda: (MistralForCausalLM, MistralConfig(**_common(6, 3), head_dim=16, sliding_window=None)),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**_common(6, 3))),  # q/k/v biases
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**_common(6, 3), head_dim=16, attention_bias=True)),
    "phi3": lambda: (Phi3ForCausalLM, Phi3Config(**_common(6, 3))),  # fused qkv_proj
    "phi3-mha": lambda: (Phi3ForCausalLM, Phi3Config(**_common(3, 3))),
    # Phi-4-mini is model_type phi3 with RoPE on part of each head
    "phi3-partial-rope": lambda: (Phi3ForCausalLM, Phi3Config(**_common(6, 3), partial_rotary_factor=0.5)),
    # Gemma 3: its own sliding-window layer (window 6) between global layers; q/k norms
    "gemma3": lambda: (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **_common(4, 2),
            head_dim=16,
            sliding_window=6,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        ),
    ),
}


def tiny(name: str, seed: int = 0):
    cls, cfg = ARCHS[name]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so per-head order matters everywhere.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def mixed_policy(model):
    """Retrieval heads not first (so apply permutes), an all-streaming layer, two streaming groups."""
    info = describe_model(model)
    H = info.num_kv_heads
    table = [[h % 2 == 1 for h in range(H)], [h % 2 == 0 for h in range(H)], [False] * H]
    policy = policy_for(model, table, sink=SINK, window=WINDOW)
    layers = [list(row) for row in policy.layers]
    layers[2][0] = dataclasses.replace(layers[2][0], sink=2, window=5)
    return policy.replace(layers=tuple(tuple(r) for r in layers))


def reference_copy(applied_model):
    """The applied model (permuted weights, plans) running the dense masked reference attention."""
    ref = copy.deepcopy(applied_model)
    ref.set_attn_implementation(REFERENCE_ATTN_NAME)
    return ref


def batch(length=30, pad=(0, 5), seed=1):
    """ids, attention mask, and rank positions [B, length] for left-padded rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pad), length), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.no_grad()
def decode_logits(model, ids, mask, pos, prompt, cache):
    """Prefill `prompt` tokens, then feed the rest one at a time. Returns logits [B, T, V]."""
    out = [
        model(
            ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt], cache=cache
        ).logits
    ]
    for t in range(prompt, ids.shape[1]):
        step = model(
            ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache
        )
        out.append(step.logits)
    return torch.cat(out, dim=1)


def real_positions(logits, mask):
    return logits[mask.bool()]


@pytest.mark.parametrize("name", list(ARCHS))
def test_all_retrieval_reproduces_the_model(name):
    model = tiny(name)
    ids, mask, pos = batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=pos).logits
    H = describe_model(model).num_kv_heads
    apply(model, policy_for(model, [[True] * H] * 3))
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    assert (real_positions(got, mask) - real_positions(expected, mask)).abs().max() <= 1e-4
    decoded = decode_logits(model, ids, mask, pos, 6, SplitKVCache.for_model(model))
    assert (real_positions(decoded, mask) - real_positions(expected, mask)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(ARCHS))
def test_mixed_policy_matches_reference(name):
    model = tiny(name)
    policy = mixed_policy(model)
    apply(model, policy)
    assert any(not p.is_identity for p in applied(model).plans)
    ref = reference_copy(model)
    ids, mask, pos = batch(length=3 * WINDOW + 10)  # decoding runs 3x past the window
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=pos).logits
        dense = model(ids, attention_mask=mask, position_ids=pos).logits
    assert (real_positions(dense, mask) - real_positions(expected, mask)).abs().max() <= 1e-4
    decoded = decode_logits(model, ids, mask, pos, 7, SplitKVCache.for_model(model))
    assert (real_positions(decoded, mask) - real_positions(expected, mask)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(ARCHS))
def test_generate_with_all_retrieval_policy_matches_the_model(name):
    """HF generate() (left padding, the split cache apply installs) gives the model's own tokens."""
    model = tiny(name)
    ids, mask, _ = batch(length=9, pad=(0, 3))
    kw = dict(attention_mask=mask, max_new_tokens=3 * WINDOW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
    H = describe_model(model).num_kv_heads
    apply(model, policy_for(model, [[True] * H] * 3))
    with torch.no_grad():
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", list(ARCHS))
def test_mixed_policy_changes_the_output(name):
    """Guards the test above against a reference that silently ignores the policy."""
    model = tiny(name)
    ids, mask, pos = batch(length=3 * WINDOW + 10)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
    apply(model, mixed_policy(model))
    with torch.no_grad():
        mixed = model(ids, attention_mask=mask, position_ids=pos).logits
    assert (real_positions(mixed, mask) - real_positions(full, mask)).abs().max() > 1e-3


def test_phi3_permutation_moves_fused_rows():
    model = tiny("phi3")
    adapter = get_adapter(model)
    attn = model.model.layers[0].self_attn
    wq, wk, wv, wo = (w.clone() for w in adapter.qkvo_weights(attn))
    D = describe_model(model).head_dim
    adapter.permute_kv_heads(attn, [2, 0, 1], group=2, head_dim=D)
    nq, nk, nv, no = adapter.qkvo_weights(attn)
    assert torch.equal(nk[:D], wk[2 * D : 3 * D]) and torch.equal(nv[D : 2 * D], wv[:D])
    assert torch.equal(nq[: 2 * D], wq[4 * D :]) and torch.equal(no[:, : 2 * D], wo[:, 4 * D :])
    with pytest.raises(NotImplementedError, match="qkv_proj"):
        adapter.projections(attn)


@pytest.mark.parametrize("name", list(ARCHS))
def test_fingerprint_is_kept_after_apply_and_differs_across_weights(name):
    a, b = tiny(name, seed=0), tiny(name, seed=1)
    fa = fingerprint(a)
    assert fa != fingerprint(b)
    apply(a, mixed_policy(a))
    assert fingerprint(a) == fa


def test_unsupported_architecture_is_named():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter(GPT2LMHeadModel(cfg))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "gpt2" in msg
    for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"):
        assert t in msg and t in supported_architectures()


def test_gemma3_sliding_layers_stay_as_they_are():
    model = tiny("gemma3")
    info = describe_model(model)
    assert info.native_windows == (None, 6, None) and info.policy_layers == [0, 2]
    policy = policy_for(model, [[True, True]] * 3, sink=SINK, window=WINDOW)
    # the sliding layer's heads are fixed: streaming with the model's own rule (sink 0, window 6)
    assert [(h.kind, h.sink, h.window) for h in policy.layers[1]] == [("streaming", 0, 6)] * 2
    assert policy.num_policy_heads == 4 and policy.num_retrieval == 4
    text = policy.to_yaml()
    assert "covers the 2 full-attention layers only: layers 1 keep the model's own sliding window" in text
    assert HeadPolicy.from_yaml(text) == policy
    with pytest.raises(PolicyError, match="layer 1 is the model's own sliding-window layer"):
        layers = list(policy.layers)
        layers[1] = (HeadSpec("retrieval"), HeadSpec("retrieval"))
        policy.replace(layers=tuple(layers))


def test_model_with_its_own_sliding_window_is_refused():
    cfg = MistralConfig(**_common(6, 3), head_dim=16, sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="sliding attention window of 64"):
        get_adapter(MistralForCausalLM(cfg))
    # a window no context can reach is harmless
    cfg = MistralConfig(**_common(6, 3), head_dim=16, sliding_window=4096)
    get_adapter(MistralForCausalLM(cfg))
