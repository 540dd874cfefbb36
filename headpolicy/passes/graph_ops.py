"""The two attention ops of exported graphs (headpolicy::retrieval_attention / streaming_attention).

(The runtime's kernels are codegen/ops.py's prefill_attention / decode_attention; these graph ops
take explicit positions instead of a cache object, so they survive torch.export and ONNX.)

Both ops take explicit token positions so that one op serves prefill (positions 0..S-1)
and decode over the split cache (slot positions derived from the step index):

    retrieval_attention   key j visible to query i  iff  0 <= k_pos[j] <= q_pos[i]
    streaming_attention   ... and (k_pos[j] < sink  or  q_pos[i] - k_pos[j] < window)

which is the rule of policies/rule.py with ranks = positions (batch rows share
positions: no padding). k_pos = -1 marks an empty cache slot. Each op has a fake
implementation, so the ops survive `torch.export` and `torch.onnx.export`; the ONNX
translation lives in `headpolicy.passes.onnx_export`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from headpolicy.policies.rule import visible
from headpolicy.runtime.attention import streaming_heads

LIB = "headpolicy"
CHUNK = 256  # prefills longer than this run the runtime's chunked streaming path


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int | None = None, window: int | None = None):
    """Boolean mask [S, T] of the rule (policies/rule.py) for positions shared by every row."""
    return visible(q_pos[:, None], k_pos[None, :], sink, window)


def _attend(q, k, v, mask, scale):
    # q: [B, Hq, S, D], k/v: [B, H, T, D]; every query sees at least itself, so no empty rows.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@torch.library.custom_op(f"{LIB}::retrieval_attention", mutates_args=())
def retrieval_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of retrieval heads. q: [B, Hq, S, D]; k, v: [B, H, T, D]; q_pos [S], k_pos [T]."""
    return _attend(q, k, v, _mask(q_pos, k_pos), scale)


@retrieval_attention.register_fake
def _(q, k, v, q_pos, k_pos, scale):
    return torch.empty_like(q)


@torch.library.custom_op(f"{LIB}::streaming_attention", mutates_args=())
def streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Sink + window attention of streaming heads; shapes as retrieval_attention.

    A long prefill (positions 0..T-1) runs block by block over sink + window keys
    (runtime.attention.streaming_heads) instead of building the dense [S, T] mask.
    """
    S, T = q.shape[2], k.shape[2]
    if (
        S > CHUNK
        and S == T
        and bool((k_pos == torch.arange(T, device=k_pos.device)).all())
        and bool((q_pos == k_pos).all())
    ):
        return _chunked_prefill(q, k, v, sink, window, scale)
    return _attend(q, k, v, _mask(q_pos, k_pos, sink, window), scale)


def _chunked_prefill(q, k, v, sink, window, scale):
    return streaming_heads(q, k, v, None, None, sink, window, scale)  # ranks are slots: the band path


@streaming_attention.register_fake
def _(q, k, v, q_pos, k_pos, sink, window, scale):
    return torch.empty_like(q)


RETRIEVAL_OP = torch.ops.headpolicy.retrieval_attention.default
STREAMING_OP = torch.ops.headpolicy.streaming_attention.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
