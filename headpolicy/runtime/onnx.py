"""Run an ONNX export (`headpolicy export --format onnx`) with onnxruntime: greedy generation.

The folder holds prefill.onnx, decode.onnx and manifest.json. The split cache travels as
explicit tensors: retrieval parts grow by one token per step, streaming parts stay
sink + window long. Batch 1, no padding.

Provider: CUDAExecutionProvider when onnxruntime-gpu is installed and a GPU is usable,
else CPUExecutionProvider. The provider that actually runs is checked and reported
(`runner.provider`); a requested provider that onnxruntime does not give is an error,
never a silent fallback.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from headpolicy.errors import ExportError

log = logging.getLogger(__name__)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA}


def default_provider() -> str:
    import onnxruntime as ort

    return CUDA if CUDA in ort.get_available_providers() else CPU


class OnnxRunner:
    """prefill / decode / generate over an exported ONNX folder."""

    def __init__(self, directory: str | os.PathLike, provider: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.directory = Path(directory)
        manifest = self.directory / "manifest.json"
        if not manifest.exists():
            raise ExportError(f"{self.directory} is not a headpolicy ONNX export (no manifest.json)")
        self.manifest = json.loads(manifest.read_text())
        wanted = _ALIASES.get(provider, provider) if provider else default_provider()
        if wanted not in ort.get_available_providers():
            raise ExportError(
                f"onnxruntime provider {wanted} is not available here "
                f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu for CUDA"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = [wanted] if wanted == CPU else [wanted, CPU]
        self.sessions = {}
        for step in ("prefill", "decode"):
            sess = ort.InferenceSession(str(self.directory / f"{step}.onnx"), options, providers=providers)
            used = sess.get_providers()[0]
            if used != wanted:
                raise ExportError(f"onnxruntime could not start {wanted} for {step}.onnx (it would run on {used})")
            self.sessions[step] = sess
        self.provider = wanted
        self.device = "cuda" if wanted == CUDA else "cpu"
        log.info("onnx runner: %s", self.provider)

    # ---- one step -------------------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids: int64 [1, S] (S >= 2) -> (last logits [V], cache tensors in manifest order)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64).reshape(1, -1)
        out = self.sessions["prefill"].run(None, {"input_ids": ids})
        return out[0][0, -1], out[1:]

    def decode(self, token: int, position: int, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One token at `position` (= tokens already cached) -> (logits [V], updated cache)."""
        names = self.manifest["inputs"]["decode"]
        feed = {
            names[0]: np.array([[token]], dtype=np.int64),
            names[1]: np.array([[position]], dtype=np.int64),
            **dict(zip(names[2:], cache, strict=True)),
        }
        out = self.sessions["decode"].run(None, feed)
        return out[0][0, -1], out[1:]

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | None = None, return_logits: bool = False):
        """Greedy decoding. input_ids: sequence of ints or [1, S] array. Returns new token ids
        (and the logits [n, V] that chose them when return_logits)."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        logits, cache = self.prefill(ids[None])
        position, tokens, seen = len(ids), [], [logits]
        for i in range(max_new_tokens):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            if (eos_token_id is not None and tok == eos_token_id) or i == max_new_tokens - 1:
                break
            logits, cache = self.decode(tok, position, cache)
            position += 1
            seen.append(logits)
        return (tokens, np.stack(seen)) if return_logits else tokens

    def cache_bytes(self, cache: list[np.ndarray]) -> int:
        return int(sum(c.nbytes for c in cache))
