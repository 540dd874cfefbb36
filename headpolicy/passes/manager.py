"""Passes registered by name with what they require and provide; networkx orders them.

A pass is a function `run(ctx) -> int` (how many sites it rewrote). The manager orders the
requested passes so that every fact a pass requires is provided before it runs (by an earlier
pass or by capture), fails clearly on a cycle or a missing provider, and logs and counts what
each pass changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch.fx
from torch import nn

from headpolicy.errors import ExportError
from headpolicy.models import Adapter
from headpolicy.policies.plan import LayerPlan

log = logging.getLogger(__name__)

# Facts that capture provides before any pass runs.
CAPTURED = frozenset({"graph"})


@dataclass(frozen=True)
class AttentionLayout:
    """Where the captured model keeps attention, as its adapter (models.Adapter) says.

    paths[l]: the graph's name (fully qualified, from the captured step) of layer l's attention
    module; modules[l]: that module. Passes find layers and weights through these, never by
    projection or layer names.
    """

    adapter: Adapter
    paths: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    head_dim: int

    @property
    def layer_of_path(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.paths)}

    @classmethod
    def of(cls, root: nn.Module, model: nn.Module, adapter: Adapter, head_dim: int) -> AttentionLayout:
        """The layout of `model`'s attention modules, named as under `root` (the captured step)."""
        names = {id(m): n for n, m in root.named_modules()}
        modules = tuple(adapter.attention_modules(model))
        return cls(adapter, tuple(names[id(m)] for m in modules), modules, head_dim)


@dataclass
class PassContext:
    """What passes read and write. `facts` holds what each pass provides (sites, cache spec...)."""

    gm: torch.fx.GraphModule
    mode: str  # "prefill" | "decode"
    plans: tuple[LayerPlan, ...]
    layout: AttentionLayout | None = None
    skip_noop: bool = True  # leave layers whose heads are all retrieval on the native sdpa
    facts: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[PassContext], int]
    requires: frozenset[str]
    provides: frozenset[str]


PASSES: dict[str, Pass] = {}


def register_pass(name: str, *, requires: Iterable[str] = (), provides: Iterable[str] = ()):
    """Decorator: register `run(ctx) -> int` as pass `name`."""

    def deco(run: Callable[[PassContext], int]):
        PASSES[name] = Pass(name, run, frozenset(requires), frozenset(provides))
        return run

    return deco


def order_passes(passes: Iterable[Pass], available: Iterable[str] = CAPTURED) -> list[Pass]:
    """Topological order of `passes` by requires/provides (ties keep the given order)."""
    passes = list(passes)
    rank = {p.name: i for i, p in enumerate(passes)}
    providers: dict[str, str] = {}
    for p in passes:
        for fact in p.provides:
            if fact in providers:
                raise ExportError(f"passes '{providers[fact]}' and '{p.name}' both provide '{fact}'")
            providers[fact] = p.name
    dag = nx.DiGraph()
    dag.add_nodes_from(rank)
    available = set(available)
    for p in passes:
        for fact in sorted(p.requires):
            if fact in providers:
                dag.add_edge(providers[fact], p.name, fact=fact)
            elif fact not in available:
                raise ExportError(
                    f"pass '{p.name}' requires '{fact}', which no requested pass provides "
                    f"(passes: {', '.join(rank)}; captured: {', '.join(sorted(available))})"
                )
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join(f"{a} ({dag.edges[a, b]['fact']})" for a, b in cycle) + f" -> {cycle[0][0]}"
        raise ExportError(f"pass dependencies form a cycle: {path}")
    by_name = {p.name: p for p in passes}
    return [by_name[n] for n in nx.lexicographical_topological_sort(dag, key=rank.__getitem__)]


def run_passes(ctx: PassContext, names: Iterable[str]) -> PassContext:
    """Run the named passes in dependency order, then clean the graph."""
    missing = [n for n in names if n not in PASSES]
    if missing:
        raise ExportError(f"unknown pass '{missing[0]}' (known: {', '.join(PASSES)})")
    for p in order_passes([PASSES[n] for n in names]):
        count = p.run(ctx)
        ctx.counts[p.name] = count
        for fact in p.provides:
            ctx.facts.setdefault(fact, True)
        log.info("pass %s: %d site(s) rewritten (%s)", p.name, count, ctx.mode)
    ctx.gm.graph.eliminate_dead_code()
    ctx.gm.delete_all_unused_submodules()
    ctx.gm.graph.lint()
    ctx.gm.recompile()
    return ctx
