"""ONNX export of rewritten steps: translations of the headpolicy ops and the export call.

The ops become plain ONNX (opset 18): grouped MatMul attention with an additive mask built
from the positions. Masks are built with integer comparisons and applied through `Where`
on float tensors (onnxruntime's CPU kernels reject `Where` over bool values).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from headpolicy.errors import ExportError
from headpolicy.passes.graph_ops import RETRIEVAL_OP, STREAMING_OP
from headpolicy.passes.pipeline import CompiledStep

log = logging.getLogger(__name__)
OPSET = 18


def _ops():
    from onnxscript import opset18 as op

    return op


def _grouped_attention(q, k, v, allowed, scale: float):
    """q: [B, Hq, S, D]; k, v: [B, H, T, D]; allowed: bool [S, T] -> [B, Hq, S, D]."""
    op = _ops()
    one = lambda x, i: op.Shape(x, start=i, end=i + 1)
    q5 = op.Reshape(q, op.Concat(one(q, 0), one(k, 1), op.Constant(value_ints=[-1]), one(q, 2), one(q, 3), axis=0))
    k5, v5 = op.Unsqueeze(k, op.Constant(value_ints=[2])), op.Unsqueeze(v, op.Constant(value_ints=[2]))
    scores = op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3]))  # [B, H, G, S, T]
    scores = op.Mul(scores, op.CastLike(op.Constant(value_float=scale), q))
    bias = op.Where(
        allowed,
        op.CastLike(op.Constant(value_float=0.0), q),
        op.CastLike(op.Constant(value_float=float("-inf")), q),
    )
    probs = op.Softmax(op.Add(scores, bias), axis=-1)
    return op.Reshape(op.MatMul(probs, v5), op.Shape(q))


def _causal(q_pos, k_pos):
    op = _ops()
    qp = op.Unsqueeze(q_pos, op.Constant(value_ints=[1]))  # [S, 1]
    kp = op.Unsqueeze(k_pos, op.Constant(value_ints=[0]))  # [1, T]
    zero = op.Constant(value_int=0)
    return qp, kp, op.And(op.GreaterOrEqual(kp, zero), op.LessOrEqual(kp, qp))


def onnx_retrieval_attention(q, k, v, q_pos, k_pos, scale: float):
    _, _, allowed = _causal(q_pos, k_pos)
    return _grouped_attention(q, k, v, allowed, scale)


def onnx_streaming_attention(q, k, v, q_pos, k_pos, sink: int, window: int, scale: float):
    op = _ops()
    qp, kp, allowed = _causal(q_pos, k_pos)
    near = op.Or(op.Less(kp, op.Constant(value_int=sink)), op.Less(op.Sub(qp, kp), op.Constant(value_int=window)))
    return _grouped_attention(q, k, v, op.And(allowed, near), scale)


TRANSLATIONS = {RETRIEVAL_OP: onnx_retrieval_attention, STREAMING_OP: onnx_streaming_attention}


def export_onnx(step: CompiledStep, path: str | Path) -> Path:
    """Write `step` as an ONNX model (weights inline). Inputs/outputs are named as in CompiledStep."""
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("ONNX export needs onnx and onnxscript: pip install 'headpolicy[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            prog = torch.onnx.export(
                step.gm,
                step.example_args(),
                dynamo=True,
                opset_version=OPSET,
                input_names=step.input_names(),
                output_names=step.output_names(),
                dynamic_shapes=step.dynamic_shapes(),
                custom_translation_table=TRANSLATIONS,
                optimize=True,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"ONNX export of the {step.mode} step failed: {' '.join(str(e).split())[:500]}") from e
    prog.save(str(path), external_data=False)
    log.info("wrote %s", path)
    return path
