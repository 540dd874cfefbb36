"""Runtime: apply a policy to a model; split KV cache; attention ops."""
