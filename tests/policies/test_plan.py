"""Planning (policies/plan.py): head order and cache parts, with and without quantised heads."""

from headpolicy import HeadPolicy, ModelInfo
from headpolicy.policies.plan import RetrievalGroup, StreamGroup, plan_layers

INFO = ModelInfo("toy", "LlamaForCausalLM", 2, 16, 8, 16, "sha256:abc")
R = None


def test_native_policy_plans_as_before():
    rules = [[(4, 8), R, (0, 4), R, (4, 8), (4, 8), R, (0, 4)], [R] * 8]
    plan, full = plan_layers(HeadPolicy.from_rules(INFO, rules))
    assert plan.perm == (1, 3, 6, 2, 7, 0, 4, 5)
    assert plan.groups == (StreamGroup(3, 5, 0, 4), StreamGroup(5, 8, 4, 8))
    assert plan.retrieval_groups == () and plan.num_native_retrieval == 3 and not plan.quantized
    assert full.all_retrieval and full.is_identity


def test_mixed_bits_split_retrieval_and_streaming_parts():
    rules = [[(4, 8), R, (4, 8), R, (4, 8), R, R, (4, 8)], [R] * 8]
    bits = [[8, 4, 16, 16, 16, 8, 4, 8], [16] * 8]
    plan, full = plan_layers(HeadPolicy.from_rules(INFO, rules, bits=bits, kv_group=8, kv_residual=16))
    # retrieval: 16 bits (head 3), 8 bits (head 5), 4 bits (heads 1, 6); streaming: 16 bits (2, 4), 8 bits (0, 7)
    assert plan.perm == (3, 5, 1, 6, 2, 4, 0, 7)
    assert plan.num_retrieval == 4 and plan.num_native_retrieval == 1
    assert plan.retrieval_groups == (RetrievalGroup(1, 2, 8), RetrievalGroup(2, 4, 4))
    assert plan.groups == (StreamGroup(4, 6, 4, 8, 16), StreamGroup(6, 8, 4, 8, 8))
    assert plan.head_table[0] == (True,) * 4 + (False,) * 4  # the rule table does not see bits
    assert plan.quantized and (plan.kv_group, plan.kv_residual) == (8, 16)
    assert not full.quantized
