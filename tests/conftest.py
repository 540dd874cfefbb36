import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headpolicy import HeadPolicy, describe_model
from headpolicy.policies.plan import LayerPlan, RetrievalGroup, StreamGroup
from headpolicy.runtime import attention
from headpolicy.runtime.state import set_layer_plan


@pytest.fixture(autouse=True)
def _kernel_cache(tmp_path_factory, monkeypatch):
    """Generated kernels (Triton sources, built C libraries) go to a per-session temporary cache, never ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "kernel-cache"
    monkeypatch.setenv("HEADPOLICY_KERNEL_CACHE", str(root))
    yield root


def tiny_llama(
    *, layers=2, heads=6, kv_heads=2, head_dim=16, hidden=48, vocab=97, seed=0, dtype=torch.float32
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for exact tests on CPU."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def policy_for(model, retrieval, *, sink=4, window=8, **kw) -> HeadPolicy:
    return HeadPolicy.from_kinds(describe_model(model), retrieval, sink=sink, window=window, **kw)


def alias_bomb(policy_yaml: str, levels: int = 9) -> str:
    """`policy_yaml` with `levels` nested levels of nine aliases each under `results` (9**levels
    leaves once expanded; about 6 KB of text at 9 levels)."""
    lines = ["results:", "  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return policy_yaml.replace("results:", "\n".join(lines) + "\n  measured:", 1)


def make_plan(num_retrieval, groups, group_size, *, retrieval_bits=(), kv_group=4, kv_residual=3) -> LayerPlan:
    """A one-layer plan: `num_retrieval` retrieval KV heads, then groups of (num_heads, sink, window)
    followed optionally by KV bits (an int) and/or compensate (a bool).

    retrieval_bits: (num_heads, bits) quantised retrieval groups, the last of the retrieval heads."""
    out, pos = [], num_retrieval
    for n, sink, window, *extra in groups:
        flags = {"compensate" if isinstance(x, bool) else "bits": x for x in extra}
        out.append(StreamGroup(pos, pos + n, sink, window, **flags))
        pos += n
    quantised, start = [], num_retrieval - sum(n for n, _ in retrieval_bits)
    for n, bits in retrieval_bits:
        quantised.append(RetrievalGroup(start, start + n, bits))
        start += n
    return LayerPlan(0, tuple(range(pos)), num_retrieval, tuple(out), group_size, tuple(quantised), kv_group,
                     kv_residual)  # fmt: skip


def attend(plan, q, key, value, mask, scale) -> torch.Tensor:
    """The registered headpolicy attention function on one layer that follows `plan`.

    key/value: plain [B, Hkv, T, D] tensors or a SplitKVCache step (what update() returned).
    Returns [B, Hq, S, D] (transformers gets [B, S, Hq, D]).
    """
    module = torch.nn.Module()
    set_layer_plan(module, plan)
    out, _ = attention.headpolicy_attention(module, q, key, value, mask, scaling=scale)
    return out.transpose(1, 2)


@pytest.fixture
def llama():
    return tiny_llama()


def stored_kv(layer, key_valid, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What a SplitKVLayer holds, dequantised, as dense K/V [B, Hkv, T, D] in slot order (T = layer.seen).

    Streaming heads' tokens go to the slot of their rank (left padding: pad + rank); slots a
    buffer no longer holds stay zero (the sink/window rule never lets a query see them).
    key_valid: [B, T] bool (None: no padding). The dense reference on these tensors is what
    every quantised path must equal."""
    from headpolicy.runtime.attention import stream_segment

    plan, T = layer.plan, layer.seen
    B, D = layer.keys.shape[0], layer.keys.shape[3]
    K = torch.zeros(B, plan.num_kv_heads, T, D, dtype=dtype)
    V = torch.zeros_like(K)
    R = plan.num_native_retrieval
    K[:, :R], V[:, :R] = layer.keys, layer.values
    for part in layer.qparts:
        g = part.group
        K[:, g.start : g.stop] = torch.cat([part.k.dequantize(dtype), part.k_tail], dim=2)
        V[:, g.start : g.stop] = torch.cat([part.v.dequantize(dtype), part.v_tail], dim=2)
    pad = torch.zeros(B, dtype=torch.long) if key_valid is None else (~key_valid.bool()).sum(-1)
    for s in layer.streams:
        k, v, rank = stream_segment(s, dtype)
        g = s.group
        for b in range(B):
            for j in range(rank.shape[1]):
                if rank[b, j] >= 0:
                    K[b, g.start : g.stop, pad[b] + rank[b, j]] = k[b, :, j]
                    V[b, g.start : g.stop, pad[b] + rank[b, j]] = v[b, :, j]
    return K, V
