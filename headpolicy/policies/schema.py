"""HeadPolicy: which KV heads keep the full cache, as a versioned, validated YAML file.

A policy file looks like this (abridged)::

    schema: headpolicy/v2
    model: {name: SmolLM2-135M-Instruct, architecture: LlamaForCausalLM, num_layers: 30,
            num_attention_heads: 9, num_kv_heads: 3, head_dim: 64, fingerprint: sha256:...}
    defaults: {sink: 64, window: 256, kv_bits: 16, kv_group: 32, kv_residual: 32}
    layers:
    - layer: 0
      heads:
      - {kind: retrieval, score: 0.91, kv_bits: 8}
      - {kind: streaming, score: 0.02}
      - {kind: streaming, sink: 16, window: 512, kv_bits: 4}
      - {kind: streaming, sink: 16, window: 512, compensate: true}
    provenance: {tool: headpolicy, version: 0.1.0, method: retrieval, settings: {...}, seed: 0}
    results: {...}

`kv_bits` is how many bits a head's cache keeps: 16 = the model's own dtype, 8 or 4 =
quantised by the rule in policies/precision.py, with `kv_group` values per float16 scale and
zero point and, for retrieval heads, the newest `kv_residual` tokens at full precision.

`compensate` (optional, defaults and per streaming head; false when absent) gives a streaming
head RazorAttention's compensation token: one extra slot holding the mean key and value of the
tokens it dropped, attended with logit + log(count) (policies/rule.py). It is never allowed on
a retrieval head, which drops nothing, nor (for now) on a quantised head: the runtime keeps
the sums of full-precision evictions only, so `kv_bits` 8/4 together with `compensate` is
refused by name.

Versions: v2 added `kv_bits`, `kv_group` and `kv_residual`. A v1 file still loads (every head
at native precision; `compensate`, an optional field, may appear in either version) and
becomes a v2 policy; `save` always writes v2 (see MIGRATIONS).

Loading is strict: anything unexpected raises a `PolicyError` that names the key
(and layer/head) that is wrong and what was expected. Loading is also bounded, so a hostile
file fails in well under a second instead of hanging every load of its checkpoint: at most
MAX_POLICY_BYTES of text, MAX_YAML_NODES nodes counted with every alias expanded (an alias
bomb is refused before any Python object is built), MAX_YAML_ALIASES aliases, MAX_YAML_DEPTH
levels, and no duplicate mapping keys. Saving is atomic and never writes anchors or aliases.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from headpolicy.errors import PolicyError, PolicyMismatchError, QuantizedCompensationError
from headpolicy.io import atomic_write
from headpolicy.policies import precision
from headpolicy.policies.precision import BITS, DEFAULT_GROUP, DEFAULT_RESIDUAL, NATIVE_BITS

SCHEMA = "headpolicy/v2"  # what this headpolicy writes
SCHEMA_V1 = "headpolicy/v1"  # read through MIGRATIONS
CHECKPOINT_FILE = "head_policy.yaml"  # a policy shipped inside a checkpoint directory (`headpolicy attach`)
RETRIEVAL: Literal["retrieval"] = "retrieval"
STREAMING: Literal["streaming"] = "streaming"
KINDS = (RETRIEVAL, STREAMING)
Kind = Literal["retrieval", "streaming"]

# The largest sink, window or native window a policy may name: int32, the type of the token
# ranks and of the kernels' window arguments. Any real context is far shorter, and a larger
# value would overflow there instead of being refused here.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class ModelInfo:
    """What a policy was made for. `fingerprint` hashes config and weights (see models.fingerprint).

    `native_windows[l]` is the model's own sliding window of layer l (Gemma 3's local
    layers), None for full-attention layers; None altogether when no layer has one. Such
    layers are already local: a policy keeps them as they are (streaming, sink 0, that
    window) and only chooses heads of the full-attention layers.
    """

    name: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str
    native_windows: tuple[int | None, ...] | None = None

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    def shape_str(self) -> str:
        return f"{self.num_layers} layers x {self.num_kv_heads} KV heads (head_dim {self.head_dim})"

    def native_window(self, layer: int) -> int | None:
        return None if self.native_windows is None else self.native_windows[layer]

    @property
    def policy_layers(self) -> list[int]:
        """Layers whose heads a policy chooses (all but the model's own sliding-window layers)."""
        return [li for li in range(self.num_layers) if self.native_window(li) is None]


@dataclass(frozen=True)
class HeadSpec:
    """One KV head. `sink`/`window`/`kv_bits`/`compensate` of None mean the policy's defaults."""

    kind: Kind
    sink: int | None = None
    window: int | None = None
    score: float | None = None
    kv_bits: int | None = None
    compensate: bool | None = None  # streaming heads only: keep a compensation token (rule.py)

    @property
    def is_retrieval(self) -> bool:
        return self.kind == RETRIEVAL


@dataclass(frozen=True)
class Provenance:
    tool: str = "headpolicy"
    version: str = ""
    method: str = "hand"
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    created: str | None = None


@dataclass(frozen=True)
class HeadPolicy:
    """A per-KV-head retrieval/streaming decision for one model.

    `layers[l][h]` is the HeadSpec of KV head h of layer l (original head order). sink, window
    and kv_bits are the defaults of heads that name none; kv_group and kv_residual hold for
    every quantised head (policies/precision.py).
    """

    model: ModelInfo
    layers: tuple[tuple[HeadSpec, ...], ...]
    sink: int = 64
    window: int = 256
    kv_bits: int = NATIVE_BITS
    kv_group: int = DEFAULT_GROUP
    kv_residual: int = DEFAULT_RESIDUAL
    provenance: Provenance = field(default_factory=Provenance)
    results: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA
    compensate: bool = False  # the default of streaming heads that name none

    def __post_init__(self) -> None:
        _validate_policy(self)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_kinds(
        cls,
        model: ModelInfo,
        retrieval: Sequence[Sequence[bool]],
        *,
        sink: int = 64,
        window: int = 256,
        scores: Sequence[Sequence[float]] | None = None,
        provenance: Provenance | None = None,
        results: Mapping[str, Any] | None = None,
        bits: Sequence[Sequence[int]] | None = None,
        kv_group: int = DEFAULT_GROUP,
        kv_residual: int = DEFAULT_RESIDUAL,
        compensate: bool = False,
    ) -> HeadPolicy:
        """Build a policy from a [layers][kv_heads] boolean table (True = retrieval), every
        streaming head with the same sink/window (and compensation token if `compensate`);
        `bits` as in from_rules.

        Layers with a native sliding window (model.native_windows) ignore their row: their
        heads stay streaming with sink 0 and that window, which is what the model does anyway.
        """
        rules = [[None if bool(keep) else (sink, window) for keep in row] for row in retrieval]
        return cls.from_rules(model, rules, defaults=(sink, window), scores=scores, provenance=provenance,
                              results=results, bits=bits, kv_group=kv_group, kv_residual=kv_residual,
                              compensate=compensate)  # fmt: skip

    @classmethod
    def from_rules(
        cls,
        model: ModelInfo,
        rules: Sequence[Sequence[tuple[int, int] | tuple[int, int, bool] | None]],
        *,
        defaults: tuple[int, int] | None = None,
        scores: Sequence[Sequence[float]] | None = None,
        provenance: Provenance | None = None,
        results: Mapping[str, Any] | None = None,
        bits: Sequence[Sequence[int]] | None = None,
        kv_bits: int | None = None,
        kv_group: int = DEFAULT_GROUP,
        kv_residual: int = DEFAULT_RESIDUAL,
        compensate: bool = False,
    ) -> HeadPolicy:
        """Build a policy from a [layers][kv_heads] table of rules: None = retrieval, (sink, window) =
        streaming with its own window. `defaults` (default: the most common streaming rule) is
        written once; heads with another rule carry their own. Native sliding layers as in from_kinds.

        bits: a [layers][kv_heads] table of KV bits (16, 8 or 4; None: all 16), the precision axis
        beside the rules; `kv_bits` (default: the most common entry) is written once, other heads
        carry their own. kv_group/kv_residual: the quantisation settings (policies/precision.py).

        compensate: whether streaming heads keep a compensation token (the policy's default); a
        rule (sink, window, flag) sets it for one head. Native sliding layers never compensate.
        """
        compensate = bool(compensate)
        chosen = [row for li, row in enumerate(rules) if li >= model.num_layers or model.native_window(li) is None]
        streaming = [tuple(r)[:2] for row in chosen for r in row if r is not None]
        if defaults is None:
            counts = {r: streaming.count(r) for r in sorted(set(streaming))}
            defaults = max(counts, key=counts.get) if counts else (64, 256)
        if kv_bits is None:
            every = [b for row in bits or [] for b in row]
            kv_bits = max(sorted(set(every), reverse=True), key=every.count) if every else NATIVE_BITS
        layers = []
        for li, row in enumerate(rules):
            native = model.native_window(li) if li < model.num_layers else None
            heads = []
            for hi, rule in enumerate(row):
                score = None if scores is None else float(scores[li][hi])
                head_bits = None if bits is None or bits[li][hi] == kv_bits else bits[li][hi]
                if native is not None:
                    spec = HeadSpec(STREAMING, sink=0, window=native, score=score,
                                    compensate=False if compensate else None)  # fmt: skip
                elif rule is None:
                    spec = HeadSpec(RETRIEVAL, score=score)
                else:
                    own = tuple(rule)[:2] != tuple(defaults)
                    flag = bool(rule[2]) if len(rule) > 2 else compensate
                    spec = HeadSpec(STREAMING, sink=rule[0] if own else None, window=rule[1] if own else None,
                                    score=score, compensate=None if flag == compensate else flag)  # fmt: skip
                heads.append(dataclasses.replace(spec, kv_bits=head_bits))
            layers.append(tuple(heads))
        return cls(
            model=model,
            layers=tuple(layers),
            sink=defaults[0],
            window=defaults[1],
            kv_bits=kv_bits,
            kv_group=kv_group,
            kv_residual=kv_residual,
            provenance=provenance or Provenance(),
            results=dict(results or {}),
            compensate=compensate,
        )

    def replace(self, **changes: Any) -> HeadPolicy:
        return dataclasses.replace(self, **changes)

    # ---- queries ------------------------------------------------------------------------
    def retrieval_table(self) -> list[list[bool]]:
        """[layers][kv_heads] booleans, True for retrieval heads."""
        return [[h.is_retrieval for h in row] for row in self.layers]

    def head_window(self, layer: int, head: int) -> tuple[int, int]:
        """(sink, window) of a streaming head, defaults resolved."""
        spec = self.layers[layer][head]
        return (
            self.sink if spec.sink is None else spec.sink,
            self.window if spec.window is None else spec.window,
        )

    def head_bits(self, layer: int, head: int) -> int:
        """KV bits of a head (16, 8 or 4), the default resolved."""
        spec = self.layers[layer][head]
        return self.kv_bits if spec.kv_bits is None else spec.kv_bits

    def bits_table(self) -> list[list[int]]:
        """[layers][kv_heads] KV bits, defaults resolved."""
        return [[self.head_bits(li, hi) for hi in range(len(row))] for li, row in enumerate(self.layers)]

    @property
    def num_quantized(self) -> int:
        """KV heads whose cache is quantised (kv_bits 8 or 4)."""
        return sum(precision.is_quantized(b) for row in self.bits_table() for b in row)
    def head_compensates(self, layer: int, head: int) -> bool:
        """Whether a head keeps a compensation token (streaming heads only), the default resolved."""
        spec = self.layers[layer][head]
        if spec.is_retrieval:
            return False
        return self.compensate if spec.compensate is None else spec.compensate

    @property
    def num_compensated(self) -> int:
        """Streaming heads with a compensation token (never in a hybrid model's own sliding layers)."""
        return sum(self.head_compensates(li, hi) for li, row in enumerate(self.layers) for hi in range(len(row)))

    @property
    def num_heads(self) -> int:
        return self.model.num_layers * self.model.num_kv_heads

    @property
    def num_policy_heads(self) -> int:
        """KV heads the policy chooses for (those outside the model's own sliding-window layers)."""
        return len(self.model.policy_layers) * self.model.num_kv_heads

    @property
    def num_retrieval(self) -> int:
        return sum(h.is_retrieval for row in self.layers for h in row)

    @property
    def retrieval_fraction(self) -> float:
        return self.num_retrieval / self.num_heads

    def kv_tokens(self, context: int, *, chosen_only: bool = False) -> int:
        """Cached tokens summed over all KV heads at `context` tokens (per sequence, K or V); a
        compensation token counts as one (its slot is allocated from the first token on).

        chosen_only: only the heads the policy chooses (not a hybrid model's own sliding layers).
        """
        total = 0
        layers = set(self.model.policy_layers) if chosen_only else None
        for li, row in enumerate(self.layers):
            if layers is not None and li not in layers:
                continue
            for hi, spec in enumerate(row):
                if spec.is_retrieval:
                    total += context
                else:
                    sink, window = self.head_window(li, hi)
                    total += min(context, sink + window) + self.head_compensates(li, hi)
        return total

    def head_kv_bytes(self, layer: int, head: int, context: int, *, dtype_bytes: int = 4) -> int:
        """Exact bytes of one head's cache (keys and values, one sequence) at `context` tokens:
        codes, scales, zero points and full-precision residual (precision.kv_head_bytes), plus
        a compensation token's float32 sums (compensation_bytes; its count is a function of the
        rank, not stored)."""
        sink = window = None
        if not self.layers[layer][head].is_retrieval:
            sink, window = self.head_window(layer, head)
        stored = precision.kv_head_bytes(
            context, head_dim=self.model.head_dim, dtype_bytes=dtype_bytes, bits=self.head_bits(layer, head),
            sink=sink, window=window, group=self.kv_group, residual=self.kv_residual,
        )  # fmt: skip
        if self.head_compensates(layer, head):
            stored += compensation_bytes(self.model.head_dim, dtype_bytes)
        return stored

    def kv_bytes(self, context: int, *, batch: int = 1, dtype_bytes: int = 4, chosen_only: bool = False) -> int:
        """Bytes of the split KV cache (keys and values, every stored tensor) at `context` tokens;
        what SplitKVCache.kv_bytes() reports for a model whose elements take `dtype_bytes`.

        chosen_only: only the heads the policy chooses (not a hybrid model's own sliding layers).
        """
        layers = self.model.policy_layers if chosen_only else range(self.model.num_layers)
        per_row = sum(
            self.head_kv_bytes(li, hi, context, dtype_bytes=dtype_bytes)
            for li in layers
            for hi in range(self.model.num_kv_heads)
        )
        return batch * per_row

    def full_kv_bytes(self, context: int, *, batch: int = 1, dtype_bytes: int = 4, chosen_only: bool = False) -> int:
        """Bytes of the unmodified model's cache (every head, every token, `dtype_bytes` an element)."""
        heads = self.num_policy_heads if chosen_only else self.num_heads
        return 2 * batch * self.model.head_dim * dtype_bytes * context * heads

    def kv_fraction(self, context: int, *, chosen_only: bool = False, dtype_bytes: int = 4) -> float:
        """Split-cache bytes relative to the full cache at `context` tokens, both with elements of
        `dtype_bytes` (chosen_only: over the heads the policy chooses, what compile's --kv-budget
        counts). Without quantised heads this is the fraction of tokens kept, whatever the dtype."""
        kept = self.kv_bytes(context, dtype_bytes=dtype_bytes, chosen_only=chosen_only)
        return kept / self.full_kv_bytes(context, dtype_bytes=dtype_bytes, chosen_only=chosen_only)

    def check_model(self, model: ModelInfo, *, check_fingerprint: bool = True) -> None:
        """Raise PolicyMismatchError unless this policy was made for `model`."""
        mine, theirs = self.model, model
        shape = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "native_windows")
        if any(getattr(mine, k) != getattr(theirs, k) for k in shape):
            raise PolicyMismatchError(
                f"policy is for {mine.shape_str()} with {mine.num_attention_heads} query heads "
                f"({mine.name}), model has {theirs.shape_str()} with {theirs.num_attention_heads} "
                f"query heads ({theirs.name})"
            )
        if check_fingerprint and mine.fingerprint != theirs.fingerprint:
            raise PolicyMismatchError(
                f"policy fingerprint {mine.fingerprint} ({mine.name}) does not match the model's "
                f"{theirs.fingerprint} ({theirs.name}): the policy was compiled for other weights. "
                "Recompile it, or, if you know the heads are the same, pass --no-fingerprint-check "
                "(check_fingerprint=False in Python)."
            )

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for li, row in enumerate(self.layers):
            heads = []
            for spec in row:
                h: dict[str, Any] = {"kind": spec.kind}
                if spec.sink is not None:
                    h["sink"] = spec.sink
                if spec.window is not None:
                    h["window"] = spec.window
                if spec.score is not None:
                    h["score"] = round(float(spec.score), 6)
                if spec.kv_bits is not None:
                    h["kv_bits"] = spec.kv_bits
                if spec.compensate is not None:
                    h["compensate"] = spec.compensate
                heads.append(_Flow(h))
            layers.append({"layer": li, "heads": heads})
        model = dataclasses.asdict(self.model)
        if model["native_windows"] is None:
            del model["native_windows"]
        else:
            model["native_windows"] = list(model["native_windows"])
        defaults: dict[str, Any] = {"sink": self.sink, "window": self.window, "kv_bits": self.kv_bits,
                                    "kv_group": self.kv_group, "kv_residual": self.kv_residual}  # fmt: skip
        if self.compensate:  # written only when on: a policy without compensation reads as before
            defaults["compensate"] = True
        return {
            "schema": self.schema,
            "model": _Flow(model),
            "defaults": _Flow(defaults),
            "layers": layers,
            "provenance": dataclasses.asdict(self.provenance),
            "results": dict(self.results),
        }

    @classmethod
    def from_dict(cls, data: Any) -> HeadPolicy:
        return _parse_policy(data)

    def to_yaml(self) -> str:
        header = (
            f"# headpolicy policy for {self.model.name}: {self.num_retrieval}/{self.num_heads} KV heads "
            f"keep the full cache, the rest keep sink {self.sink} + window {self.window}.\n"
        )
        if self.num_quantized:
            counts = [f"{n} at {b} bits" for b in BITS if (n := sum(r.count(b) for r in self.bits_table()))]
            header += (
                f"# KV precision: {', '.join(counts)} (16 = the model's dtype; groups of {self.kv_group}, "
                f"residual {self.kv_residual}).\n"
            )
        if self.num_compensated:
            header += f"# {self.num_compensated} streaming heads keep a compensation token (mean of what they drop).\n"
        native = [li for li in range(self.model.num_layers) if self.model.native_window(li) is not None]
        if native:
            header += (
                f"# It covers the {len(self.model.policy_layers)} full-attention layers only: layers "
                f"{', '.join(map(str, native))} keep the model's own sliding window.\n"
            )
        return header + yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, width=100)

    @classmethod
    def from_yaml(cls, text: str) -> HeadPolicy:
        """Parse and validate policy YAML (bounded: see MAX_POLICY_BYTES and MAX_YAML_*)."""
        if not isinstance(text, str):
            raise PolicyError(f"policy text must be str, got {type(text).__name__}")
        if len(text) > MAX_POLICY_BYTES:
            raise PolicyError(
                f"policy text is {len(text)} characters, more than MAX_POLICY_BYTES = {MAX_POLICY_BYTES}; "
                "a policy for a 128-layer model is well under that"
            )
        return _parse_policy(_load_yaml(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the YAML atomically (io.atomic_write); returns the path written."""
        return atomic_write(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadPolicy:
        path = Path(path)
        text = _read_policy_text(path)
        try:
            return cls.from_yaml(text)
        except PolicyError as e:
            raise type(e)(f"{path}: {e}") from None


def compensation_bytes(head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one head's compensation token per sequence: the sums of its dropped keys and
    values, accumulated in float32 (or the cache dtype if wider) so a long run of small keys
    is not rounded away."""
    return 2 * head_dim * max(dtype_bytes, 4)


# ---- YAML formatting ------------------------------------------------------------------------
class _Flow(dict):
    """A mapping written on one line."""


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared objects are written out in full: a policy file never holds anchors or aliases


_Dumper.add_representer(_Flow, lambda d, data: d.represent_mapping("tag:yaml.org,2002:map", data, flow_style=True))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ---- bounded YAML reading -------------------------------------------------------------------
# A policy for a 128-layer model with 128 KV heads a layer, each head with a score and its own
# sink and window, is about 1 MiB and 150k YAML nodes. The caps leave room for that and refuse
# what would take minutes or gigabytes: a 44 MB results list, nine nested levels of aliases.
MAX_POLICY_BYTES = 4 * 2**20
MAX_YAML_NODES = 250_000  # with every alias expanded: what validation (and a later save) walks
MAX_YAML_ALIASES = 1_000  # our dumper writes none; a hand-written file may share a few anchors
MAX_YAML_DEPTH = 64  # a policy is 6 levels deep; settings and results nest a little more

# libyaml scans and parses in C when it is installed; composing stays in Python (below), so the
# caps are counted as the node tree is built, not after.
try:
    from yaml.cyaml import CParser as _EventSource
except ImportError:  # PyYAML built without libyaml: the same events, scanned in Python
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _EventSource(Reader, Scanner, Parser):
        def __init__(self, stream: str) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            Parser.__init__(self)


class _BoundedLoader(Composer, _EventSource, SafeConstructor, Resolver):
    """yaml.SafeLoader that counts nodes, aliases and depth while it composes (Composer comes
    first, so its Python compose_node runs even over libyaml's events)."""

    def __init__(self, text: str) -> None:
        _EventSource.__init__(self, text)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.nodes = self.aliases = self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        line = self.peek_event().start_mark.line + 1
        if self.check_event(AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise PolicyError(f"line {line}: more than MAX_YAML_ALIASES = {MAX_YAML_ALIASES} aliases")
        else:
            self.nodes += 1
            if self.nodes > MAX_YAML_NODES:
                raise PolicyError(f"line {line}: more than MAX_YAML_NODES = {MAX_YAML_NODES} YAML nodes")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise PolicyError(f"line {line}: nested more than MAX_YAML_DEPTH = {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str) -> Any:
    """Plain data from YAML text, refusing oversized, alias-bombed or ambiguous documents."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_tree(loader, root)
        return loader.construct_document(root)
    except PolicyError:
        raise  # (a ValueError too)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        # ValueError: a value PyYAML recognises but cannot build (date 2001-13-01, a 5000-digit int)
        raise PolicyError(f"policy is not valid YAML: {_one_line(e)[:300]}") from None
    except RecursionError:
        raise PolicyError("policy YAML is nested too deeply") from None
    finally:
        loader.dispose()


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return node.value
    return [n for pair in node.value for n in pair]  # a MappingNode's keys and values


def _check_tree(loader: _BoundedLoader, root: Node) -> None:
    """Size and depth with aliases expanded, no recursive alias, no duplicate keys; O(composed nodes).

    An alias is the same node object as its anchor, so the expanded size of a node is memoised
    by identity: nine nested levels of nine aliases cost 81 steps here, not 9**9. Scalars (size
    and depth 1) never enter the tables.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: meeting one again is a recursive alias
    stack: list[tuple[Node, bool]] = [] if isinstance(root, ScalarNode) else [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            kids = _children(node)
            size[key] = 1 + sum(size.get(id(k), 1) for k in kids)
            depth[key] = 1 + max((depth.get(id(k), 1) for k in kids), default=0)
            open_nodes.discard(key)
            line = node.start_mark.line + 1
            if size[key] > MAX_YAML_NODES:
                raise PolicyError(
                    f"line {line}: expands to more than MAX_YAML_NODES = {MAX_YAML_NODES} YAML nodes "
                    "(an alias counts as a copy of its anchor)"
                )
            if depth[key] > MAX_YAML_DEPTH:
                raise PolicyError(f"line {line}: nested more than MAX_YAML_DEPTH = {MAX_YAML_DEPTH} levels deep")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise PolicyError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it")
        open_nodes.add(key)
        if isinstance(node, MappingNode):
            _refuse_duplicate_keys(loader, node)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if not isinstance(k, ScalarNode))


def _refuse_duplicate_keys(loader: _BoundedLoader, node: MappingNode) -> None:
    """YAML would keep the last of two equal keys; a policy with `kind` twice is a mistake, not a choice."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # a merge key (<<) may be overridden; complex keys are refused when constructed
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise PolicyError(f"line {line}: duplicate key {key!r} (first at line {seen[key]}); give it once")
            seen[key] = line
        except TypeError:
            continue  # unhashable: the constructor refuses it with its own message


def _read_policy_text(path: Path) -> str:
    """The file's text, refusing more than MAX_POLICY_BYTES before reading it."""
    too_big = f"policy file {path} is larger than MAX_POLICY_BYTES = {MAX_POLICY_BYTES} bytes; is it a policy?"
    try:
        if path.stat().st_size > MAX_POLICY_BYTES:
            raise PolicyError(too_big)
        with open(path, "rb") as f:
            data = f.read(MAX_POLICY_BYTES + 1)  # a pipe or device has no size to stat
        if len(data) > MAX_POLICY_BYTES:
            raise PolicyError(too_big)
        return data.decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read policy file {path}: {_one_line(e)}") from None


# ---- validation -----------------------------------------------------------------------------
_TOP_KEYS = {"schema", "model", "defaults", "layers", "provenance", "results"}
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelInfo)}
_HEAD_KEYS = {"kind", "sink", "window", "score", "kv_bits", "compensate"}
_DEFAULT_KEYS = {"sink", "window", "kv_bits", "kv_group", "kv_residual", "compensate"}
_V2_KEYS = {"kv_bits", "kv_group", "kv_residual"}  # what a v1 file may not hold
_PROV_KEYS = {f.name for f in dataclasses.fields(Provenance)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def finite_number(x: Any) -> float | None:
    """`x` as a float when it is a finite int or float (not a bool), else None. An int too large
    for a float (10**400) is not finite: math.isfinite would raise OverflowError on it."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    try:
        value = float(x)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _need_mapping(x: Any, where: str) -> Mapping:
    if not isinstance(x, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {type(x).__name__}")
    bad = [k for k in x if not isinstance(k, str)]
    if bad:
        raise PolicyError(f"{where}: keys must be strings, got {bad[0]!r}")
    return x


def _no_unknown(x: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(x) - allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _need_int(x: Any, where: str, *, minimum: int) -> int:
    if not _is_int(x):
        raise PolicyError(f"{where}: expected an integer >= {minimum}, got {x!r}")
    if x < minimum:
        raise PolicyError(f"{where}: expected an integer >= {minimum}, got {x}")
    return x


def need_tokens(x: Any, where: str, *, minimum: int) -> int:
    """`x` as a token count (sink, window) in [minimum, MAX_TOKENS]; else PolicyError naming `where` and the cap."""
    if not _is_int(x) or not minimum <= x <= MAX_TOKENS:
        raise PolicyError(f"{where}: expected an integer from {minimum} to MAX_TOKENS = {MAX_TOKENS}, got {x!r}")
    return x


def need_bits(x: Any, where: str) -> int:
    """`x` as KV bits (one of precision.BITS); else PolicyError naming `where`."""
    if not _is_int(x) or x not in BITS:
        raise PolicyError(
            f"{where}: expected KV bits {', '.join(map(str, BITS))} (16 = the model's own dtype), got {x!r:.80}"
        )
    return x


def _need_bool(x: Any, where: str) -> bool:
    if not isinstance(x, bool):
        raise PolicyError(f"{where}: expected true or false, got {x!r:.80}")
    return x


def _need_str(x: Any, where: str) -> str:
    if not isinstance(x, str) or not x:
        raise PolicyError(f"{where}: expected a non-empty string, got {x!r}")
    return x


def _check_plain(x: Any, where: str, depth: int = 0) -> None:
    """Settings/results must be plain YAML data (so they round-trip)."""
    if depth > 32:
        raise PolicyError(f"{where}: nested too deeply")
    if x is None or isinstance(x, str | bool | int):
        return
    if isinstance(x, float):
        return
    if isinstance(x, Mapping):
        for k, v in x.items():
            if not isinstance(k, str | int):
                raise PolicyError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}.{k}", depth + 1)
        return
    if isinstance(x, list | tuple):
        for i, v in enumerate(x):
            _check_plain(v, f"{where}[{i}]", depth + 1)
        return
    raise PolicyError(f"{where}: unsupported value of type {type(x).__name__}")


def _parse_head(x: Any, where: str) -> HeadSpec:
    x = _need_mapping(x, where)
    _no_unknown(x, _HEAD_KEYS, where)
    if "kind" not in x:
        raise PolicyError(f"{where}: missing 'kind' (one of {', '.join(KINDS)})")
    kind = x["kind"]
    if kind not in KINDS:
        raise PolicyError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    sink = None if x.get("sink") is None else need_tokens(x["sink"], f"{where}.sink", minimum=0)
    window = None if x.get("window") is None else need_tokens(x["window"], f"{where}.window", minimum=1)
    score = x.get("score")
    if score is not None:
        if finite_number(score) is None:
            raise PolicyError(f"{where}.score: expected a finite number, got {score!r:.80}")
        score = finite_number(score)
    bits = None if x.get("kv_bits") is None else need_bits(x["kv_bits"], f"{where}.kv_bits")
    compensate = None if x.get("compensate") is None else _need_bool(x["compensate"], f"{where}.compensate")
    return HeadSpec(kind=kind, sink=sink, window=window, score=score, kv_bits=bits, compensate=compensate)


def _parse_native_windows(x: Any, num_layers: int) -> tuple[int | None, ...] | None:
    if x is None:
        return None
    if not isinstance(x, list) or len(x) != num_layers:
        raise PolicyError(f"model.native_windows: expected a list of {num_layers} entries (window or null), got {x!r}")
    return tuple(
        None if w is None else need_tokens(w, f"model.native_windows[{i}]", minimum=1) for i, w in enumerate(x)
    )


# ---- versions ---------------------------------------------------------------------------------
def _v1_to_v2(data: Mapping) -> dict:
    """v1 -> v2: no field changed meaning; v2 added kv_bits/kv_group/kv_residual, so every head
    of a v1 file keeps its cache in the model's own dtype (the v2 default, kv_bits 16)."""
    d = data.get("defaults")
    if isinstance(d, Mapping) and _V2_KEYS & set(d):
        key = sorted(_V2_KEYS & set(d))[0]
        raise PolicyError(f"defaults: '{key}' needs schema {SCHEMA!r}, the file says {SCHEMA_V1!r}")
    rows = data.get("layers")
    for li, row in enumerate(rows if isinstance(rows, list) else []):
        heads = row.get("heads") if isinstance(row, Mapping) else None
        for hi, h in enumerate(heads if isinstance(heads, list) else []):
            if isinstance(h, Mapping) and "kv_bits" in h:
                raise PolicyError(
                    f"layer {li} head {hi}: 'kv_bits' needs schema {SCHEMA!r}, the file says {SCHEMA_V1!r}"
                )
    return {**data, "schema": SCHEMA}


# schema version -> the step that turns it into the next one; applied until SCHEMA is reached
MIGRATIONS = {SCHEMA_V1: _v1_to_v2}


def migrate(data: Mapping) -> Mapping:
    """Policy data of any readable version as current (SCHEMA) data; PolicyError for another schema."""
    seen = []
    while data.get("schema") != SCHEMA:
        version = data.get("schema")
        step = MIGRATIONS.get(version) if isinstance(version, str) else None
        if step is None or version in seen:
            readable = ", ".join(repr(v) for v in (SCHEMA, *MIGRATIONS))
            raise PolicyError(f"schema: unsupported schema {version!r:.80}; this headpolicy reads {readable}")
        seen.append(version)
        data = step(data)
    return data


def _parse_policy(data: Any) -> HeadPolicy:
    data = _need_mapping(data, "policy")
    _no_unknown(data, _TOP_KEYS, "policy")
    for key in ("schema", "model", "layers"):
        if key not in data:
            raise PolicyError(f"policy: missing required key '{key}'")
    data = migrate(data)

    m = _need_mapping(data["model"], "model")
    _no_unknown(m, _MODEL_KEYS, "model")
    missing = sorted(_MODEL_KEYS - {"native_windows"} - set(m))
    if missing:
        raise PolicyError(f"model: missing required key '{missing[0]}'")
    model = ModelInfo(
        name=_need_str(m["name"], "model.name"),
        architecture=_need_str(m["architecture"], "model.architecture"),
        num_layers=_need_int(m["num_layers"], "model.num_layers", minimum=1),
        num_attention_heads=_need_int(m["num_attention_heads"], "model.num_attention_heads", minimum=1),
        num_kv_heads=_need_int(m["num_kv_heads"], "model.num_kv_heads", minimum=1),
        head_dim=_need_int(m["head_dim"], "model.head_dim", minimum=1),
        fingerprint=_need_str(m["fingerprint"], "model.fingerprint"),
        native_windows=_parse_native_windows(m.get("native_windows"), m["num_layers"]),
    )

    d = _need_mapping(data.get("defaults") or {}, "defaults")
    _no_unknown(d, _DEFAULT_KEYS, "defaults")
    sink = need_tokens(d.get("sink", 64), "defaults.sink", minimum=0)
    window = need_tokens(d.get("window", 256), "defaults.window", minimum=1)
    kv_bits = need_bits(d.get("kv_bits", NATIVE_BITS), "defaults.kv_bits")
    kv_group = need_tokens(d.get("kv_group", DEFAULT_GROUP), "defaults.kv_group", minimum=1)
    kv_residual = need_tokens(d.get("kv_residual", DEFAULT_RESIDUAL), "defaults.kv_residual", minimum=0)
    compensate = _need_bool(d.get("compensate", False), "defaults.compensate")

    rows = data["layers"]
    if not isinstance(rows, list):
        raise PolicyError(f"layers: expected a list of {model.num_layers} layers, got {type(rows).__name__}")
    layers = []
    for li, row in enumerate(rows):
        where = f"layers[{li}]"
        row = _need_mapping(row, where)
        _no_unknown(row, {"layer", "heads"}, where)
        if row.get("layer", li) != li:
            raise PolicyError(f"{where}.layer: expected {li} (layers are listed in order), got {row['layer']!r}")
        heads = row.get("heads")
        if not isinstance(heads, list):
            raise PolicyError(f"{where}.heads: expected a list of {model.num_kv_heads} heads, got {heads!r}")
        layers.append(tuple(_parse_head(h, f"layer {li} head {hi}") for hi, h in enumerate(heads)))

    p = _need_mapping(data.get("provenance") or {}, "provenance")
    _no_unknown(p, _PROV_KEYS, "provenance")
    settings = _need_mapping(p.get("settings") or {}, "provenance.settings")
    _check_plain(settings, "provenance.settings")
    seed = p.get("seed")
    if seed is not None and not _is_int(seed):
        raise PolicyError(f"provenance.seed: expected an integer or null, got {seed!r}")
    created = p.get("created")
    provenance = Provenance(
        tool=_need_str(p.get("tool", "headpolicy"), "provenance.tool"),
        version=str(p.get("version", "")),
        method=_need_str(p.get("method", "hand"), "provenance.method"),
        settings=dict(settings),
        seed=seed,
        created=None if created is None else str(created),
    )
    results = _need_mapping(data.get("results") or {}, "results")
    _check_plain(results, "results")

    return HeadPolicy(
        model=model,
        layers=tuple(layers),
        sink=sink,
        window=window,
        kv_bits=kv_bits,
        kv_group=kv_group,
        kv_residual=kv_residual,
        provenance=provenance,
        results=dict(results),
        compensate=compensate,
    )


def _validate_policy(p: HeadPolicy) -> None:
    """Invariants that hold however a policy was built (also for policies made in code)."""
    m = p.model
    if m.num_attention_heads % m.num_kv_heads:
        raise PolicyError(
            f"model: num_attention_heads ({m.num_attention_heads}) is not a multiple of num_kv_heads ({m.num_kv_heads})"
        )
    if m.native_windows is not None:
        if len(m.native_windows) != m.num_layers:
            raise PolicyError(f"model.native_windows: expected {m.num_layers} entries, got {len(m.native_windows)}")
        for li, w in enumerate(m.native_windows):
            if w is not None:
                need_tokens(w, f"model.native_windows[{li}]", minimum=1)
    if p.schema != SCHEMA:
        raise PolicyError(
            f"schema: a policy object is always {SCHEMA!r} (older files are migrated on load), got {p.schema!r}"
        )
    need_tokens(p.sink, "defaults.sink", minimum=0)
    need_tokens(p.window, "defaults.window", minimum=1)
    _need_head_bits(p.kv_bits, "defaults.kv_bits", m.head_dim)
    need_tokens(p.kv_group, "defaults.kv_group", minimum=1)
    need_tokens(p.kv_residual, "defaults.kv_residual", minimum=0)
    _need_bool(p.compensate, "defaults.compensate")
    if len(p.layers) != m.num_layers:
        raise PolicyError(f"layers: expected {m.num_layers} layers (model.num_layers), got {len(p.layers)}")
    for li, row in enumerate(p.layers):
        if len(row) != m.num_kv_heads:
            raise PolicyError(
                f"layers[{li}].heads: expected {m.num_kv_heads} heads (model.num_kv_heads), got {len(row)}"
            )
        for hi, spec in enumerate(row):
            if spec.kind not in KINDS:
                raise PolicyError(f"layer {li} head {hi}: kind must be one of {KINDS}, got {spec.kind!r}")
            if spec.is_retrieval and (spec.sink is not None or spec.window is not None):
                raise PolicyError(
                    f"layer {li} head {hi}: a retrieval head keeps every token; sink/window apply "
                    "only to streaming heads"
                )
            if spec.compensate is not None:
                _need_bool(spec.compensate, f"layer {li} head {hi}.compensate")
                if spec.is_retrieval:
                    raise PolicyError(
                        f"layer {li} head {hi}: a retrieval head keeps every token, so it has nothing to "
                        "compensate; compensate applies only to streaming heads"
                    )
            native = m.native_window(li)
            if native is not None and (spec.is_retrieval or p.head_window(li, hi) != (0, native)):
                raise PolicyError(
                    f"layer {li} head {hi}: layer {li} is the model's own sliding-window layer "
                    f"(window {native}); its heads must be streaming with sink 0 and window {native}"
                )
            if native is not None and p.head_compensates(li, hi):
                raise PolicyError(
                    f"layer {li} head {hi}: layer {li} is the model's own sliding-window layer; its heads "
                    "run as the model does and take no compensation token (set compensate: false)"
                )
            if spec.sink is not None:
                need_tokens(spec.sink, f"layer {li} head {hi}.sink", minimum=0)
            if spec.window is not None:
                need_tokens(spec.window, f"layer {li} head {hi}.window", minimum=1)
            if spec.kv_bits is not None:
                _need_head_bits(spec.kv_bits, f"layer {li} head {hi}.kv_bits", m.head_dim)
            if p.head_compensates(li, hi) and precision.is_quantized(p.head_bits(li, hi)):
                raise QuantizedCompensationError(
                    f"layer {li} head {hi}: a compensation token on a quantised head (kv_bits "
                    f"{p.head_bits(li, hi)}) is not supported; keep the head at kv_bits 16 or set compensate: false"
                )


def _need_head_bits(bits: Any, where: str, head_dim: int) -> None:
    need_bits(bits, where)
    if bits == 4 and head_dim % 2:
        raise PolicyError(
            f"{where}: 4-bit codes pack two channels a byte, so they need an even head_dim; the model's is {head_dim}"
        )
