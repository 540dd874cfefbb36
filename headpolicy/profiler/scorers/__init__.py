"""Head scorers, registered by name. Each returns float32 [num_layers, num_kv_heads]; higher =
more in need of the full KV cache.

    scores = get_scorer("retrieval")(model, tasks, sink=64, window=256)

A scorer takes the unmodified model, the profiling tasks (it uses the kinds it understands)
and the streaming sink/window the policy will use. Query-head scores are reduced to their
KV head with `capture.reduce_to_kv` (max over the query group: a KV head must stay full
if any query head reading it needs the far context).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SCORER_MODULES = ("retrieval", "attention_mass", "echo_induction", "gates", "ensemble")


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[..., np.ndarray]
    kinds: tuple[str, ...]  # task kinds it reads
    doc: str

    def __call__(self, model, tasks: Sequence, *, sink: int, window: int, progress=None) -> np.ndarray:
        usable = [t for t in tasks if t.kind in self.kinds]
        if not usable:
            raise ValueError(f"scorer {self.name!r} needs tasks of kind {'/'.join(self.kinds)}, got none")
        out = np.asarray(self.fn(model, usable, sink=sink, window=window, progress=progress), dtype=np.float32)
        if out.ndim != 2 or not np.isfinite(out).all():
            raise ValueError(f"scorer {self.name!r} returned a bad score array of shape {out.shape}")
        return out


_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, *, kinds: Sequence[str]):
    """Decorator: register `fn(model, tasks, *, sink, window, progress) -> [L, Hkv]` as `name`."""

    def deco(fn):
        _SCORERS[name] = Scorer(name, fn, tuple(kinds), (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return deco


def _load() -> None:
    for mod in SCORER_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def get_scorer(name: str) -> Scorer:
    _load()
    if name not in _SCORERS:
        raise KeyError(f"unknown scorer {name!r} (known: {', '.join(sorted(_SCORERS))})")
    return _SCORERS[name]


def scorer_names() -> list[str]:
    _load()
    return sorted(_SCORERS)
