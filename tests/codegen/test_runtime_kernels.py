"""The runtime through the generated kernels: apply() + split cache with backend "triton".

On CPU the kernels run in the Triton interpreter; the PyTorch runtime path is the reference.
"""

import copy

import pytest
import torch
from codegen_helpers import kernel_devices

from headpolicy import SplitKVCache, apply
from headpolicy.codegen import ops
from tests.conftest import policy_for, tiny_llama


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("lengths", [[11], [11, 6]])
def test_prefill_and_decode_through_kernels_match_pytorch(triton_backend, monkeypatch, device, lengths):
    from headpolicy.codegen import kernels

    calls = {"prefill_triton": 0, "decode_triton": 0}
    for name in calls:
        real_fn = getattr(kernels, name)

        def counted(*a, _name=name, _fn=real_fn, **kw):
            calls[_name] += 1
            return _fn(*a, **kw)

        monkeypatch.setattr(kernels, name, counted)
    base = tiny_llama(layers=2, seed=11).to(device)
    policy = policy_for(base, [[False, True], [False, False]], sink=2, window=5)
    model = apply(copy.deepcopy(base), policy)
    T0 = max(lengths)
    ids = torch.randint(3, 97, (len(lengths), T0), device=device)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, T0 - n :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kernel_cache, torch_cache = SplitKVCache.for_model(model), SplitKVCache.for_model(model)
    step = ids
    with torch.no_grad():
        for i in range(1 + 2 * policy.window + 3):  # past the window: the ring wraps
            kw = dict(attention_mask=mask, position_ids=pos, use_cache=True)
            out = model(step, cache=kernel_cache, **kw).logits
            with ops.backend("reference"):  # the runtime's own PyTorch ops
                exp = model(step, cache=torch_cache, **kw).logits
            real = mask[:, -step.shape[1] :].bool()
            torch.testing.assert_close(out[real], exp[real], atol=1e-4, rtol=1e-4, msg=f"step {i}")
            step = exp[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            pos = pos[:, -1:] + 1
    assert kernel_cache.kv_bytes() == torch_cache.kv_bytes()
    steps = 2 * policy.window + 3
    assert calls == {"prefill_triton": 2, "decode_triton": 2 * steps}  # 2 layers: every step ran a kernel
