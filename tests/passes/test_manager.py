import pytest

from headpolicy.errors import ExportError
from headpolicy.passes import DEFAULT_PASSES
from headpolicy.passes.manager import PASSES, Pass, order_passes


def p(name, requires=(), provides=()):
    return Pass(name, lambda ctx: 0, frozenset(requires), frozenset(provides))


def test_default_passes_order_from_requires_provides():
    shuffled = [PASSES[n] for n in reversed(DEFAULT_PASSES)]
    assert [x.name for x in order_passes(shuffled)] == list(DEFAULT_PASSES)


def test_independent_passes_keep_given_order():
    order = order_passes([p("b", {"graph"}, {"x"}), p("a", {"graph"}, {"y"}), p("c", {"x", "y"})])
    assert [x.name for x in order] == ["b", "a", "c"]


def test_cycle_is_named():
    with pytest.raises(ExportError, match="cycle: .*a .*b .*a|cycle: .*b .*a .*b"):
        order_passes([p("a", {"y"}, {"x"}), p("b", {"x"}, {"y"})])


def test_missing_provider_is_named():
    with pytest.raises(ExportError, match="pass 'bind_cache' requires 'attention_split'"):
        order_passes([PASSES["locate_attention"], PASSES["bind_cache"]])


def test_two_providers_of_one_fact():
    with pytest.raises(ExportError, match="both provide 'x'"):
        order_passes([p("a", provides={"x"}), p("b", provides={"x"})])
