import pytest

from engine.errors import HieruiError
from engine.perturb.spec import parse_spec


@pytest.mark.parametrize(
    "text, method, attrs",
    [
        ("wanda:0.5", "wanda", {"sparsity": 0.5}),
        ("magnitude:0.3", "magnitude", {"sparsity": 0.3}),
        ("sparsegpt:4:8", "sparsegpt", {"n": 4, "m": 8}),
        ("wanda:2:4", "wanda", {"n": 2, "m": 4}),
        ("attndrop:4", "attndrop", {"count": 4}),
        ("blockdrop:2", "blockdrop", {"count": 2}),
        ("int8", "int8", {}),
        ("nf4", "nf4", {}),
        ("none", "none", {}),
        ("checkpoint:/models/x", "checkpoint", {"path": "/models/x"}),
        (" WANDA:0.5 ", "wanda", {"sparsity": 0.5}),
    ],
)
def test_valid_specs(text, method, attrs):
    spec = parse_spec(text)
    assert spec.method == method
    for key, value in attrs.items():
        assert getattr(spec, key) == value


def test_spec_round_trips_and_target_sparsity():
    assert str(parse_spec("wanda:2:4")) == "wanda:2:4"
    assert parse_spec("wanda:2:4").target_sparsity == 0.5
    assert parse_spec("magnitude:1:4").target_sparsity == 0.75
    assert str(parse_spec("wanda:0.50")) == "wanda:0.5"
    assert parse_spec("wanda:0.5").slug == "wanda-0.5"


@pytest.mark.parametrize(
    "text, why",
    [
        ("wanda:1.5", "in (0, 1)"),
        ("wanda:0", "in (0, 1)"),
        ("wanda:1", "in (0, 1)"),
        ("wanda:-0.2", "in (0, 1)"),
        ("wanda:nan", "in (0, 1)"),
        ("wanda:4:2", "0 < N < M"),
        ("wanda:4:4", "0 < N < M"),
        ("wanda:0:4", "0 < N < M"),
        ("foo:0.5", "unknown method 'foo'"),
        ("magnitude:", "missing"),
        ("wanda", "takes a sparsity"),
        ("wanda:x", "number"),
        ("wanda:2:x", "whole number"),
        ("int8:2", "no arguments"),
        ("attndrop:0", "at least 1"),
        ("attndrop", "one argument"),
        ("checkpoint:", "needs a path"),
        ("", "empty"),
    ],
)
def test_malformed_specs_say_why(text, why):
    with pytest.raises(HieruiError) as info:
        parse_spec(text)
    message = str(info.value)
    assert why in message
    assert "\n" not in message
