"""`--model random:SHAPE`: random weights in the shape of a known model or a config.json
(engine.models.random_shapes)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine.errors import HieruiError
from engine.models.configs import read_config
from engine.models.hub import list_models
from engine.models.loading import load
from engine.models.names import resolve
from engine.models.random_shapes import SHAPES_DIR, shape_aliases

SMALL = {  # a tiny Llama shape: builds in a blink
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}


def shipped(alias: str) -> dict:
    return json.loads((SHAPES_DIR / f"{alias}.json").read_text())


@pytest.fixture(scope="module")
def smol():
    return load("random:smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture()
def small_config(tmp_path) -> Path:
    path = tmp_path / "small" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SMALL))
    return path


def test_the_shipped_shapes_are_there_and_listed():
    expected = {"llama-7b", "llama3-8b", "qwen2.5-7b", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "smollm2-135m"}
    assert expected <= set(shape_aliases())
    listed = {row["alias"] for row in list_models()}
    assert {f"random:{alias}" for alias in expected} <= listed
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "models/shapes/*.json" in pyproject["tool"]["setuptools"]["package-data"]["engine"]  # shipped in the wheel


def test_resolve_and_read_config_without_building():
    ref = resolve("random:Llama-7B")
    assert (ref.kind, ref.name, ref.source) == ("random", "random:llama-7b", "llama-7b")
    assert ref.display.startswith("llama-7b shape, random weights")
    config = read_config("random:llama-7b")
    assert config["hidden_size"] == 4096 and config["num_hidden_layers"] == 32
    assert config["max_position_embeddings"] == 2048  # what the early context checks read
    seeded = resolve("random:llama-7b@3")
    assert seeded.name == "random:llama-7b@3" and "seed 3" in seeded.display
    assert ref.cache_key() != seeded.cache_key() and "llama-7b" in ref.cache_key()
    assert resolve("random:qwen2.5-7b").cache_key() != ref.cache_key()


def test_load_builds_the_shipped_shape_with_the_tokenizers_vocabulary(smol):
    shape = shipped("smollm2-135m")
    config = smol.model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(config, key) == shape[key], key
    assert config.vocab_size == len(smol.tokenizer)  # resized to the tokenizer
    assert smol.model.get_input_embeddings().weight.shape == (len(smol.tokenizer), shape["hidden_size"])
    assert smol.model.get_output_embeddings().weight is smol.model.get_input_embeddings().weight  # tied, like SmolLM2
    assert {p.dtype for p in smol.model.parameters()} == {torch.float32}
    assert smol.tokenizer.eos_token_id in {config.eos_token_id, smol.model.generation_config.eos_token_id}
    norm = smol.model.model.layers[0].input_layernorm.weight
    assert torch.all(norm == 1)
    q = smol.model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - shape["initializer_range"]) < 0.002
    ids = smol.tokenizer("The moon is", return_tensors="pt").input_ids
    logits = smol.model(ids).logits
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights_other_seed_other_weights(smol, small_config):
    again = load("random:smollm2-135m", device="cpu", dtype="float32").model.state_dict()
    for name, tensor in smol.model.state_dict().items():
        assert torch.equal(tensor, again[name]), name
    a = load(f"random:{small_config}", device="cpu", dtype="float32").model.state_dict()
    b = load(f"random:{small_config}@1", device="cpu", dtype="float32").model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], b[q])


def test_a_config_path(small_config):
    for name in (f"random:{small_config}", f"random:{small_config.parent}"):
        ref = resolve(name)
        assert ref.kind == "random" and ref.source == str(small_config.resolve())
        assert ref.display.startswith("small shape, random weights")
        assert read_config(name)["hidden_size"] == 64
    loaded = load(f"random:{small_config}", device="cpu", dtype="bfloat16")
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.model.config.vocab_size == len(loaded.tokenizer) != SMALL["vocab_size"]
    assert loaded.model.get_output_embeddings().weight is not loaded.model.get_input_embeddings().weight
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_without_the_embedded_tokenizer_the_byte_tokenizer_stands_in_and_says_so(small_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HIERUI_MODELS", str(tmp_path / "no-models"))
    ref = resolve(f"random:{small_config}")
    assert ref.display.endswith("random weights, byte tokenizer")
    said = []
    loaded = load(ref.name, device="cpu", progress=said.append)
    assert len(loaded.tokenizer) == loaded.model.config.vocab_size == 260
    assert any("byte tokenizer" in line for line in said)


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("random:", None, "names no shape"),
        ("random:gpt-17", None, "unknown shape 'gpt-17'"),
        ("random:/no/such/config.json", None, "config file not found"),
        ("random:{path}", "{not json", "not valid JSON"),
        ("random:{path}", "[1, 2]", "not a JSON object"),
        ("random:{path}", '{"hidden_size": 64}', "no model_type"),
        ("random:{path}", '{"model_type": "llama", "hidden_size": -4}', "hidden_size must be a positive integer"),
    ],
)
def test_bad_shapes_are_one_clear_line(name, content, why, tmp_path):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HieruiError, match=why) as raised:
        resolve(name.format(path=path))
    assert "\n" not in str(raised.value)


def test_an_unknown_model_type_fails_before_building(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**SMALL, "model_type": "no-such-family"}))
    with pytest.raises(HieruiError, match="cannot build the shape"):
        load(f"random:{path}", device="cpu")


def test_the_cli_refuses_a_bad_shape_with_exit_2(cli):
    run = cli("prune", "--model", "random:gpt-17", "--prune", "wanda:0.5")
    assert run.returncode == 2
    assert "unknown shape 'gpt-17'" in run.stderr and "Traceback" not in run.stderr


def test_the_session_header_and_the_explorers_header_say_random_weights(small_config):
    from engine.perturb import perturb
    from engine.run.recorder import session_header
    from engine.run.stepper import Stepper, StepSettings
    from hierui.explorer.widgets.info import short_model

    loaded = load(f"random:{small_config}@2", device="cpu")
    pair = perturb(loaded, "none", use_cache=False)
    stepper = Stepper(pair, "Hello", StepSettings(max_new_tokens=2))
    header = session_header(pair, stepper.settings, stepper.row)
    assert header["model"] == f"random:{small_config.resolve()}@2"
    assert header["model_display"].startswith("small shape, random weights, seed 2")
    assert "random weights" in short_model(header["model_display"])  # the explorer's header, shortened


BF16_PROBE = textwrap.dedent(
    """
    import json, sys, torch
    from engine.models.random_shapes import random_tokenizer
    from engine.models.loading import load

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    random_tokenizer()  # the imports and the tokenizer before the baseline
    import transformers.models.llama.modeling_llama  # noqa: F401
    before = hwm()
    loaded = load("random:smollm2-135m", device="cpu", dtype="bfloat16")
    grown = hwm() - before
    params = {id(p): p for p in loaded.model.parameters()}.values()
    print(json.dumps({
        "grown": grown,
        "bf16_bytes": sum(p.numel() * 2 for p in params),
        "dtypes": sorted({str(p.dtype) for p in params}),
    }))
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_bfloat16_is_built_in_bfloat16_never_in_float32_on_the_host():
    run = subprocess.run([sys.executable, "-c", BF16_PROBE], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["dtypes"] == ["torch.bfloat16"]
    assert found["bf16_bytes"] > 200e6  # smollm2-135m with the tokenizer's vocabulary: 0.1 B parameters or more
    # float32 first (then cast) would grow the peak by 2× the bf16 size or more (measured: 0.97× as built)
    assert found["grown"] < 1.3 * found["bf16_bytes"], found
