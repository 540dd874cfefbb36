"""Head scorers, registered by name. Each gives float32 [num_layers, num_kv_heads]; higher = more
in need of the full KV cache.

    maps = get_scorer("ensemble").score_maps(model, tasks, sink=64, window=256)  # its map and its members'
    scores = get_scorer("retrieval")(model, tasks, sink=64, window=256)        # just the map

A *measuring* scorer runs the unmodified model on the profiling tasks (it uses the kinds it
understands) for the streaming sink/window the policy will use. A *combined* scorer
(`ensemble`, `hybrid`) has members: its map is a function of its members' maps, so it is
built one way whoever asks for it. Query-head scores are reduced to their KV head with
`probes.reduce_to_kv` (max over the query group: a KV head must stay full if any query head
reading it needs the far context).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

SCORER_MODULES = ("retrieval", "attention_mass", "echo_induction", "gates", "causal", "ensemble")


@dataclass(frozen=True)
class Scorer:
    name: str
    doc: str
    kinds: tuple[str, ...]  # task kinds it reads (a combined scorer: its members')
    measure: Callable[..., np.ndarray] | None = None  # fn(model, tasks, *, sink, window, progress) -> [L, Hkv]
    members: tuple[str, ...] = ()  # a combined scorer's members
    combine: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = None  # members' maps -> map

    def score_maps(
        self, model, tasks: Sequence, *, sink: int, window: int, bar: Callable[[int, str], object] | None = None
    ) -> dict[str, np.ndarray]:
        """{name: [L, Hkv]} for this scorer and, for a combined one, each member (members first).

        bar(total, description) may return a progress bar (a context manager with update()).
        """
        if not self.members:
            return {self.name: self._measure(model, tasks, sink=sink, window=window, bar=bar)}
        maps = {m: get_scorer(m)._measure(model, tasks, sink=sink, window=window, bar=bar) for m in self.members}
        maps[self.name] = _checked(self.name, self.combine(maps))
        return maps

    def __call__(self, model, tasks: Sequence, *, sink: int, window: int, progress=None) -> np.ndarray:
        if self.members:
            return self.score_maps(model, tasks, sink=sink, window=window)[self.name]
        usable = self._usable(tasks)
        return _checked(self.name, self.measure(model, usable, sink=sink, window=window, progress=progress))

    def _usable(self, tasks: Sequence) -> list:
        usable = [t for t in tasks if t.kind in self.kinds]
        if not usable:
            raise ValueError(f"scorer {self.name!r} needs tasks of kind {'/'.join(self.kinds)}, got none")
        return usable

    def _measure(self, model, tasks, *, sink, window, bar) -> np.ndarray:
        usable = self._usable(tasks)
        with bar(len(usable), f"score {self.name}") if bar is not None else nullcontext() as progress:
            return self(model, usable, sink=sink, window=window, progress=progress)


def _checked(name: str, out) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or not np.isfinite(out).all():
        raise ValueError(f"scorer {name!r} returned a bad score array of shape {out.shape}")
    return out


_SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, *, kinds: Sequence[str]):
    """Decorator: register `fn(model, tasks, *, sink, window, progress) -> [L, Hkv]` as scorer `name`."""

    def deco(fn):
        _SCORERS[name] = Scorer(name, _first_line(fn), tuple(kinds), measure=fn)
        return fn

    return deco


def register_combination(name: str, *, members: Sequence[str]):
    """Decorator: register `combine({member: [L, Hkv]}) -> [L, Hkv]` as combined scorer `name`."""

    def deco(fn):
        _SCORERS[name] = Scorer(name, _first_line(fn), (), members=tuple(members), combine=fn)
        return fn

    return deco


def _first_line(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def _load() -> None:
    for mod in SCORER_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def get_scorer(name: str) -> Scorer:
    _load()
    if name not in _SCORERS:
        raise KeyError(f"unknown scorer {name!r} (known: {', '.join(sorted(_SCORERS))})")
    scorer = _SCORERS[name]
    if scorer.members and not scorer.kinds:  # a combination reads what its members read
        kinds = tuple(dict.fromkeys(k for m in scorer.members for k in get_scorer(m).kinds))
        scorer = _SCORERS[name] = Scorer(scorer.name, scorer.doc, kinds, None, scorer.members, scorer.combine)
    return scorer


def scorer_names() -> list[str]:
    _load()
    return sorted(_SCORERS)
