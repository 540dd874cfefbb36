"""Graph passes over `torch.export`: locate attention, permute heads, split attention, bind the cache.

    from headpolicy.passes import compile_step
    step = compile_step(model, policy, "decode")   # a GraphModule taking the split cache explicitly

Passes live one per file and register with `headpolicy.passes.manager.register_pass`;
`pipeline.py` captures a step, runs them in dependency order and re-exports the result.
"""

from headpolicy.passes.pipeline import DEFAULT_PASSES, CompiledStep, compile_step, export_program

__all__ = ["DEFAULT_PASSES", "CompiledStep", "compile_step", "export_program"]
