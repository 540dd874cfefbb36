"""headpolicy: profile a causal LM, decide which KV heads keep the full cache, run it smaller.

    model, tok = headpolicy.load_model("smollm2-135m")
    policy = headpolicy.HeadPolicy.load("smollm2-135m-instruct.yaml")
    headpolicy.apply(model, policy)          # in place; generate() now uses a split KV cache

Importing this package touches neither CUDA nor the network.
"""

from headpolicy.checkpoint import attach, save_pretrained
from headpolicy.errors import (
    AlreadyAppliedError,
    BudgetError,
    HeadPolicyError,
    ModelSourceError,
    PolicyError,
    PolicyMismatchError,
    UnsupportedModelError,
)
from headpolicy.models import describe_model, fingerprint, load_model
from headpolicy.policies.importers import ImportFormatError, import_policy
from headpolicy.policies.schema import HeadPolicy, HeadSpec, ModelInfo, Provenance
from headpolicy.profiler.compile import CompileSettings, compile_policy
from headpolicy.runtime.apply import applied_policy, apply
from headpolicy.runtime.cache import SplitKVCache

__version__ = "0.1.0"

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
    "Provenance",
    "SplitKVCache",
    "UnsupportedModelError",
    "applied_policy",
    "apply",
    "attach",
    "compile_policy",
    "import_policy",
    "save_pretrained",
    "describe_model",
    "fingerprint",
    "load_model",
]
