"""A tiny Llama whose attention pattern is set by hand, so a scorer's right answer is known.

q/k projection weights are zero and their biases constant, so after RoPE the score of query
position m on key position n depends only on m - n. With q = (A, 0) and k = A (cos dθ, sin dθ)
in every rotary pair, score(m - n) = A² Σ_i cos((d - (m - n)) θ_i): sharply largest at
m - n = d. The planted KV head (with all its query heads) looks `offset` tokens back; every
other head looks at the current token (offset 0).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

AMPLITUDE = 12.0


def planted_model(*, layer: int, head: int, offset: int, layers=2, heads=6, kv_heads=2, head_dim=16, vocab=97):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=8192, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    half = head_dim // 2
    theta = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(half, dtype=torch.float32) * 2 / head_dim))
    group = heads // kv_heads
    with torch.no_grad():
        for li, block in enumerate(model.model.layers):
            attn = block.self_attn
            attn.q_proj.weight.zero_()
            attn.k_proj.weight.zero_()
            q_bias = torch.zeros(heads, head_dim)
            q_bias[:, :half] = AMPLITUDE
            k_bias = torch.zeros(kv_heads, head_dim)
            for h in range(kv_heads):
                d = offset if (li, h) == (layer, head) else 0
                k_bias[h, :half] = AMPLITUDE * torch.cos(d * theta)
                k_bias[h, half:] = AMPLITUDE * torch.sin(d * theta)
            attn.q_proj.bias.copy_(q_bias.reshape(-1))
            attn.k_proj.bias.copy_(k_bias.reshape(-1))
    assert heads % kv_heads == 0 and group >= 1
    return model
