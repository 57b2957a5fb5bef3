"""The architecture a session records (engine.record.architecture): read from the config, written into every
session header and batch.json, validated when read back, and printed by `hierui show`."""

import json

import pytest

from engine.models.zoo import FAMILIES
from engine.record.architecture import describe, summary


@pytest.mark.parametrize(
    "family, attention, experts",
    [
        ("llama", None, None),
        ("mistral", ["sliding"] * 4, None),
        ("qwen2", ["full", "full", "sliding", "sliding"], None),
        ("gemma2", ["sliding", "full", "sliding", "full"], None),
        ("mixtral", None, 4),
        ("gpt2", None, None),
    ],
)
def test_describe_reads_each_familys_config(family, attention, experts):
    config = FAMILIES[family].config()
    arch = describe(config)
    assert arch["layers"] == 4 and arch["attention_types"] == attention and arch["experts"] == experts
    assert describe(config.to_dict()) == arch  # the same from config.json's dict (torch-free checks)
    assert summary(arch).startswith(config.model_type)


def test_summary_names_the_mix_of_attention_layers():
    assert summary(describe(FAMILIES["qwen2"].config())) == "qwen2 · 4 layers (2 sliding, 2 full) · 4/2 heads"
    assert summary(describe(FAMILIES["mixtral"].config())).endswith("4 experts, top-2")
    assert summary(None) == "" and summary({"model_type": "x"}) == "x"


def test_a_session_records_and_shows_the_architecture(cli, tmp_path):
    from engine.models.loading import load
    from engine.perturb import perturb
    from engine.record.session import load_session
    from engine.run.recorder import SessionRecorder
    from engine.run.stepper import Stepper, StepSettings

    loaded = load("tiny-random:qwen2", device="cpu")
    stepper = Stepper(perturb(loaded, "none"), "Hello", StepSettings(max_new_tokens=2))
    path = tmp_path / "s.jsonl"
    SessionRecorder(stepper, [path]).run()
    header = load_session(path).header
    assert header["architecture"]["attention_types"] == ["full", "full", "sliding", "sliding"]
    shown = cli("show", str(path))
    assert shown.returncode == 0 and "qwen2 · 4 layers (2 sliding, 2 full)" in shown.stdout

    # a file is untrusted input: a wrong-typed architecture is one line, exit 2
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[0])
    bad["architecture"]["layers"] = "four"
    path.write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n", encoding="utf-8")
    failed = cli("show", str(path))
    assert failed.returncode == 2 and "architecture" in failed.stderr and "Traceback" not in failed.stderr


def test_a_zoo_member_is_shown_by_its_full_name():
    from engine.models.names import resolve

    ref = resolve("tiny-random:Gemma2")
    assert ref.kind == "zoo" and ref.display == "tiny-random:gemma2"
    assert ref.cache_key().startswith("tiny-random:gemma2")


def test_an_unknown_zoo_family_is_one_line(cli):
    result = cli("check", "--model", "tiny-random:nosuch")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown tiny-random family 'tiny-random:nosuch'" in result.stderr and "gemma2" in result.stderr


def test_prune_reports_each_experts_sparsity_and_routed_tokens(cli):
    result = cli("prune", "--model", "tiny-random:mixtral", "--prune", "wanda:0.5", "--calib-samples", "4")
    assert result.returncode == 0, result.stderr
    assert "experts: zero weights (calibration tokens routed to each)" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip().startswith("│     ")]
    assert len(lines) == 4 and all(line.count("50.0%") == 4 for line in lines)  # 4 layers × 4 experts


@pytest.mark.parametrize(
    "name, trusted",
    [
        ("tiny-random:gemma2", True),
        ("random:llama-7b", True),
        ("random:qwen2.5-0.5b@3", True),
        ("random:/tmp/elsewhere/config.json", False),  # a path a header would point at: confirmed on the command line
        ("tiny-random:nosuch", False),
        ("/tmp/model", False),
    ],
)
def test_a_header_may_name_the_zoo_and_shipped_shapes_but_no_path(name, trusted):
    from engine.models.trust import known_model as trusted_model

    assert trusted_model(name) is trusted
