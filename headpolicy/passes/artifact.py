"""Write the rewritten prefill + decode steps as one artifact: a `.pt2` archive or an ONNX folder.

pt2:  OUT (a file) holds ExportedPrograms "prefill" and "decode" and manifest.json;
      load with `load_pt2(OUT)` (imports the headpolicy ops first).
onnx: OUT (a folder) holds prefill.onnx, decode.onnx and manifest.json; run it with
      `headpolicy.runtime.onnx.OnnxRunner(OUT)`.
Scope of exported graphs: batch 1, no padding (positions are the step index).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from headpolicy.errors import ExportError
from headpolicy.io import atomic_directory, atomic_write
from headpolicy.models import describe_model
from headpolicy.passes.pipeline import CompiledStep, compile_step, export_program
from headpolicy.policies.schema import HeadPolicy

log = logging.getLogger(__name__)
FORMATS = ("pt2", "onnx")


def manifest(steps: dict[str, CompiledStep], model: nn.Module, policy: HeadPolicy) -> dict:
    decode = steps["decode"]
    info = describe_model(model)
    return {
        "format": "headpolicy-export/v1",
        "model": info.name,
        "fingerprint": info.fingerprint,
        "policy": {
            "retrieval": policy.num_retrieval,
            "heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
        },
        "batch": 1,
        "head_dim": decode.head_dim,
        "num_layers": decode.num_layers,
        "vocab_size": int(getattr(model.config, "vocab_size", 0)),
        "cache": [
            {"layer": e.layer, "part": e.part, "heads": e.heads, "sink": e.sink, "window": e.window}
            for e in decode.cache
        ],
        "inputs": {m: s.input_names() for m, s in steps.items()},
        "outputs": {m: s.output_names() for m, s in steps.items()},
        "passes": {m: s.counts for m, s in steps.items()},
    }


def compile_steps(model: nn.Module, policy: HeadPolicy, *, check_fingerprint: bool = True, **kw):
    return {
        mode: compile_step(
            model, policy, mode, last_logits_only=(mode == "prefill"), check_fingerprint=check_fingerprint, **kw
        )
        for mode in ("prefill", "decode")
    }


def export_artifact(
    model: nn.Module, policy: HeadPolicy, fmt: str, out: str | os.PathLike, *, check_fingerprint: bool = True
) -> Path:
    """Capture, rewrite and save `model` under `policy` as `fmt` ("pt2" or "onnx") at `out`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    steps = compile_steps(model, policy, check_fingerprint=check_fingerprint)
    meta = manifest(steps, model, policy)
    if fmt == "pt2":
        from torch.export.pt2_archive._package import package_pt2

        programs = {mode: export_program(step) for mode, step in steps.items()}
        extra = {"manifest.json": json.dumps(meta, indent=2)}
        # package_pt2 writes to a path or a file object: the archive goes through the atomic writer
        return atomic_write(out, writer=lambda f: package_pt2(f, exported_programs=programs, extra_files=extra))
    from headpolicy.passes.onnx_export import export_onnx

    with atomic_directory(out) as tmp:
        for mode, step in steps.items():
            export_onnx(step, tmp / f"{mode}.onnx")
        (tmp / "manifest.json").write_text(json.dumps(meta, indent=2))
    return out


def load_pt2(path: str | os.PathLike):
    """(programs {"prefill", "decode"}, manifest) from a .pt2 archive written by export_artifact."""
    from torch.export.pt2_archive._package import load_pt2 as _load

    import headpolicy.passes.graph_ops  # noqa: F401  (the ops must be registered before loading)

    contents = _load(path)
    extra = contents.extra_files.get("manifest.json")
    return contents.exported_programs, json.loads(extra) if extra else {}
