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


@pytest.mark.parametrize(
    "text",
    ["wanda:０.５", "wanda:0.5_0", "wanda:5e-1", "wanda:nan", "wanda:+0.5", "wanda:0.5.", "attndrop:٤", "wanda:2:４"],
)
def test_only_ascii_decimals_are_numbers(text):
    with pytest.raises(HieruiError, match="digits 0-9|decimal number"):
        parse_spec(text)


@pytest.mark.parametrize("text, sparsity", [("wanda:.5", 0.5), ("wanda:0.25", 0.25), ("magnitude: 0.5 ", 0.5)])
def test_plain_decimals_are_accepted(text, sparsity):
    assert parse_spec(text).sparsity == sparsity


def test_check_fits_against_a_config():
    from engine.perturb.spec import check_fits

    config = {"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    check_fits(parse_spec("blockdrop:3"), config)
    check_fits(parse_spec("wanda:0.02"), config)  # 1 of 64 inputs per row
    check_fits(parse_spec("wanda:0.5"), None)  # no config: nothing to check yet
    for bad in ("blockdrop:4", "wanda:0.01", "magnitude:0.0001", "wanda:2:128"):
        with pytest.raises(HieruiError):
            check_fits(parse_spec(bad), config)


def test_a_path_spec_keeps_its_path_and_the_identity_spec_is_none():
    from engine.perturb.spec import streamable, unperturbed

    spec = parse_spec("checkpoint: /models/a:b/llama-7b ")
    assert spec.path == "/models/a:b/llama-7b" and str(spec) == "checkpoint:/models/a:b/llama-7b"
    assert spec.slug == "checkpoint-llama_7b" and spec.declared.takes_path
    assert unperturbed() == parse_spec("none") and unperturbed().declared.identity
    assert "int8" not in streamable() and "nf4" not in streamable() and "blockdrop" in streamable()
