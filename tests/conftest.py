import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headpolicy import HeadPolicy, describe_model
from headpolicy.policies.plan import LayerPlan, StreamGroup
from headpolicy.runtime import attention
from headpolicy.runtime.state import set_layer_plan


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


def make_plan(num_retrieval, groups, group_size) -> LayerPlan:
    """A one-layer plan: `num_retrieval` retrieval KV heads, then groups of (num_heads, sink, window)
    or (num_heads, sink, window, compensate)."""
    out, pos = [], num_retrieval
    for n, sink, window, *compensate in groups:
        out.append(StreamGroup(pos, pos + n, sink, window, *compensate))
        pos += n
    return LayerPlan(0, tuple(range(pos)), num_retrieval, tuple(out), group_size)


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
