"""Named errors. Each message says what is wrong, where, and what was expected."""

from __future__ import annotations


class HeadPolicyError(Exception):
    """Base class of every error headpolicy raises on purpose."""


class PolicyError(HeadPolicyError, ValueError):
    """A policy file or object is malformed: wrong schema, bad field, bad value."""


class PolicyMismatchError(PolicyError):
    """A well-formed policy that belongs to another model (shape or fingerprint)."""


class QuantizedCompensationError(PolicyError):
    """A streaming head that is both quantised (kv_bits 8/4) and compensated: the runtime keeps
    compensation sums for full-precision streaming buffers only, so the pair is refused."""


class UnsupportedModelError(HeadPolicyError, ValueError):
    """The model's architecture has no adapter."""


class ModelSourceError(HeadPolicyError, ValueError):
    """A model source (alias, directory, .gguf path) cannot be resolved or loaded."""


class BudgetError(HeadPolicyError, ValueError):
    """A budget or accuracy target that no policy can meet."""


class PromptError(HeadPolicyError, ValueError):
    """A prompt the model cannot answer as given: empty, or longer than the model's context."""


class ResultsMismatchError(HeadPolicyError, ValueError):
    """Saved results cannot stand in for this run: unreadable, or made with other settings, items or weights."""


class AlreadyAppliedError(HeadPolicyError, RuntimeError):
    """`apply` was called on a model that already carries a policy."""


class CodegenError(HeadPolicyError, RuntimeError):
    """Generating, loading or compiling a headpolicy Triton kernel failed."""


class CodegenDisabledError(CodegenError):
    """Kernel generation is switched off (HEADPOLICY_DISABLE_CODEGEN=1 or codegen.set_enabled(False))."""


class KernelCompileError(CodegenError):
    """A generated kernel could not be written, imported or compiled (or Triton is missing)."""


class UnsupportedPolicyError(HeadPolicyError, ValueError):
    """A valid policy that a path cannot run: the compensation token on the generated Triton
    kernels or in an exported graph."""


class OutputError(HeadPolicyError, OSError):
    """A result file or folder cannot be written (read-only folder, a directory in the way...)."""


class ExportError(HeadPolicyError, RuntimeError):
    """A graph cannot be captured, rewritten or exported (missing pass provider, no attention found...)."""


class QuantizedExportError(ExportError):
    """The policy stores some KV heads quantised (kv_bits 8/4), which exported graphs do not carry."""
