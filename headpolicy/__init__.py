"""headpolicy: profile a causal LM, decide which KV heads keep the full cache, run it smaller.

    model, tok = headpolicy.load_model("smollm2-135m")
    policy = headpolicy.HeadPolicy.load("smollm2-135m-instruct.yaml")
    headpolicy.apply(model, policy)          # in place; the model now runs on a split KV cache
    out = headpolicy.generate(model, tok("...", return_tensors="pt").input_ids, max_new_tokens=16)

Read top to bottom: profiler/compile.py (compile) -> policies/schema.py (the policy) ->
runtime/apply.py (apply) -> runtime/generate.py (generate), with runtime/attention.py and
runtime/cache.py underneath. ../DESIGN order: cli > eval > profiler > passes > runtime >
codegen > models > policies > io > errors (a module imports only what stands below it).

Importing this package touches neither CUDA nor the network.
"""

from headpolicy.errors import (
    AlreadyAppliedError,
    BudgetError,
    HeadPolicyError,
    ModelSourceError,
    PolicyError,
    PolicyMismatchError,
    PromptError,
    UnsupportedModelError,
    UnsupportedPolicyError,
)
from headpolicy.models import describe_model, fingerprint
from headpolicy.policies.importers import ImportFormatError, import_policy
from headpolicy.policies.schema import HeadPolicy, HeadSpec, ModelInfo, Provenance
from headpolicy.profiler.compile import CompileSettings, compile_policy
from headpolicy.runtime.apply import apply, save_pretrained
from headpolicy.runtime.cache import SplitKVCache
from headpolicy.runtime.checkpoint import attach, load_model
from headpolicy.runtime.generate import generate
from headpolicy.runtime.state import applied_policy
from headpolicy.version import __version__  # noqa: F401  (the package version)

__all__ = [
    "AlreadyAppliedError",
    "BudgetError",
    "CompileSettings",
    "HeadPolicy",
    "HeadPolicyError",
    "HeadSpec",
    "ImportFormatError",
    "ModelInfo",
    "ModelSourceError",
    "PolicyError",
    "PolicyMismatchError",
    "PromptError",
    "Provenance",
    "SplitKVCache",
    "UnsupportedModelError",
    "UnsupportedPolicyError",
    "applied_policy",
    "apply",
    "attach",
    "compile_policy",
    "import_policy",
    "save_pretrained",
    "describe_model",
    "fingerprint",
    "generate",
    "load_model",
]
