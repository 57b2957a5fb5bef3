"""engine.run.attribution: patching dense units into the perturbed forward, and its faces (`hierui attribute`,
`hierui batch --attribute flips`)."""

import json

import pytest
import torch

from engine.run import attribution as A
from engine.run import patching as P

CONTEXT = list(range(5, 25))  # 20 tokens: past the zoo's sliding window (16)
TIGHT = dict(rtol=0, atol=2e-5)


def _pair(name: str, spec: str = "magnitude:0.5", **options):
    from engine.models.loading import load
    from engine.perturb import perturb

    return perturb(load(name, device="cpu"), spec, use_cache=False, **options)


def _groups(patcher):
    blocks = [u for u, unit in enumerate(patcher.units) if unit.kind == "block"]
    sublayers = [u for u, unit in enumerate(patcher.units) if unit.kind != "block"]
    return blocks, sublayers


FAMILIES = ["tiny-random", "tiny-random:gemma2", "tiny-random:mixtral", "tiny-random:gpt2"]
SLOW_FAMILIES = [
    "tiny-random:" + f
    for f in ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "olmo2", "gpt_neox", "opt", "qwen2_moe")
]


@pytest.mark.parametrize(
    "name", FAMILIES + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW_FAMILIES]
)  # fmt: skip
def test_patching_every_unit_restores_the_dense_logits(name):
    pair = _pair(name)
    patcher = P.Patcher(pair, CONTEXT, 1.0)
    blocks, sublayers = _groups(patcher)
    assert len(blocks) == pair.dense.config.num_hidden_layers and len(sublayers) == 2 * len(blocks)
    z = patcher.logits([[], blocks, sublayers])
    dense = patcher.logits_d[0]
    assert not torch.allclose(z[0], dense, **TIGHT)  # the perturbation shows
    torch.testing.assert_close(z[1], dense, **TIGHT)  # every block: the dense final residual
    torch.testing.assert_close(z[2], dense, **TIGHT)  # every attn and mlp likewise
    with torch.no_grad():  # patching nothing: the plain perturbed forward over the whole context
        plain = pair.perturbed(input_ids=torch.tensor([CONTEXT])).logits[0, -1]
    torch.testing.assert_close(z[0], plain, **TIGHT)
    # the batched variants equal one forward per unit
    some = [0, 1, blocks[1], len(patcher.units) - 2, len(patcher.units) - 1]
    batched = patcher.logits([[u] for u in some] + [[some[0], some[3]]])
    for row, units in enumerate([[u] for u in some] + [[some[0], some[3]]]):
        torch.testing.assert_close(batched[row], patcher.logits([units])[0], **TIGHT)


def test_one_token_context_and_chunked_rows(monkeypatch):
    pair = _pair("tiny-random")
    one = P.Patcher(pair, [7], 1.0)  # no cache to build
    blocks, _ = _groups(one)
    torch.testing.assert_close(one.logits([blocks])[0], one.logits_d[0], **TIGHT)
    whole = A.attribute(pair, CONTEXT, greedy=False)
    monkeypatch.setattr(P, "MEMORY_BOUND", 1)  # one row per forward
    chunked = A.attribute(pair, CONTEXT, greedy=False)
    assert [u.kl_patched for u in chunked.units] == pytest.approx([u.kl_patched for u in whole.units], abs=1e-6)


def test_dropped_blocks_are_patched_where_they_were(tiny):
    """blockdrop removes layers: their attn/mlp units are skipped, their block units add the dense increment."""
    from engine.perturb import PerturbReport
    from engine.perturb.drop import _own_config, drop_blocks
    from engine.perturb.pair import ModelPair, clone_sharing

    clone = clone_sharing(tiny.model)
    _own_config(tiny.model, clone)
    drop_blocks(clone, [0, 2])  # one before the first kept layer, one between kept layers
    report = PerturbReport(spec="blockdrop:2", details={"kind": "block", "dropped": [0, 2]})
    pair = ModelPair(tiny.model, clone, tiny.tokenizer, "blockdrop:2", report=report)
    patcher = P.Patcher(pair, CONTEXT, 1.0)
    assert patcher.skipped == ["attn.0", "mlp.0", "attn.2", "mlp.2"]
    blocks, _ = _groups(patcher)
    torch.testing.assert_close(patcher.logits([blocks])[0], patcher.logits_d[0], **TIGHT)
    result = A.attribute(pair, CONTEXT)
    assert {u.unit for u in result.units} >= {"block.0", "block.2", "attn.1", "mlp.3"}


@pytest.mark.parametrize("spec", ["attndrop:1", "mlpdrop:1"])
def test_the_dropped_sublayer_ranks_first_on_tiny_random(tiny, tiny_calib, spec):
    from engine.perturb import perturb

    pair = perturb(tiny, spec, calibration=tiny_calib, use_cache=False)
    (layer,) = pair.report.details["dropped"]
    kind = "attn" if spec.startswith("attn") else "mlp"
    result = A.attribute(pair, CONTEXT)
    best = result.ranked("sublayer")[0]
    assert best.unit == f"{kind}.{layer}" and best.rank == 1
    assert best.restored_kl > 0.5


@pytest.mark.slow  # scoring the drop calibrates the embedded model: minutes on a busy 2-core machine
@pytest.mark.parametrize("spec", ["attndrop:1", "mlpdrop:1"])
def test_the_dropped_sublayer_ranks_first_on_the_embedded_model(embedded, spec):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    pair = perturb(embedded, spec, use_cache=False, calib_options={"samples": 4, "length": 32})
    (layer,) = pair.report.details["dropped"]
    unit = f"{'attn' if spec.startswith('attn') else 'mlp'}.{layer}"
    stepper = Stepper(pair, "The capital of France is", StepSettings(max_new_tokens=1))
    result = A.attribute(pair, stepper.prompt_ids, greedy=False)
    ranked = [u.unit for u in result.ranked("sublayer")]
    assert ranked[0] == unit, ranked[:5]


def test_the_unpatched_kl_is_the_recorded_kl(tiny):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper, StepSettings

    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    stepper = Stepper(pair, "Once upon a time", StepSettings(mode="shared", max_new_tokens=6, temperature=1.5))
    records = stepper.run()
    header = {"prompt_ids": stepper.prompt_ids}
    for record in records:
        result = A.attribute(pair, A.context_at(header, records, record["step"]), 1.5, greedy=False)
        assert result.kl == pytest.approx(record["kl"], rel=1e-4, abs=1e-7)
        assert (result.top1_d == result.top1_p) == bool(record["top1_agree"])


def test_the_greedy_set_restores_the_top1_or_is_empty(tiny):
    from engine.perturb import perturb

    pair = perturb(tiny, "magnitude:0.6", use_cache=False)
    for start in range(0, 60, 3):
        result = A.attribute(pair, list(range(start, start + 12)))
        names = {u.unit for u in result.units}
        if result.top1_d == result.top1_p:
            assert result.minimal_set == [] and result.minimal_restores is True
            continue
        assert result.minimal_set and set(result.minimal_set) <= names
        assert not any(n.startswith("block.") for n in result.minimal_set)
        if result.minimal_restores:  # the set found restores it, checked by a separate forward
            patcher = P.Patcher(pair, list(range(start, start + 12)), 1.0)
            index = {u.name: i for i, u in enumerate(patcher.units)}
            _kl, top = patcher.run([[index[n] for n in result.minimal_set]])
            assert top[0] == result.top1_d
        rows = result.rows(step=4)
        assert {r["step"] for r in rows} == {4} and sum(r["in_minimal_set"] for r in rows) == len(result.minimal_set)
        return
    pytest.fail("no flip found among the contexts tried")


def _record(step, fed_d, fed_p, agree):
    return {"step": step, "fed": [fed_d, fed_p], "top1_agree": agree}


def test_flip_steps_and_context_at():
    shared = [_record(0, 5, 5, True), _record(1, 6, 6, False), _record(2, 7, 7, None), _record(3, 8, 8, False)]
    assert A.flip_steps(shared, "shared") == [1, 3]
    free = [_record(0, 5, 5, True), _record(1, 6, 9, False), _record(2, 7, 7, False), _record(3, 8, 8, False)]
    assert A.flip_steps(free, "free") == [1]  # after the first divergence the contexts differ
    header = {"prompt_ids": [1, 2]}
    assert A.context_at(header, free, 0) == [1, 2]
    assert A.context_at(header, free, 3) == [1, 2, 5, 9, 7]  # the perturbed model's own tokens
    assert A.same_context(free, 1) and not A.same_context(free, 2)
    from engine.errors import HieruiError

    with pytest.raises(HieruiError, match="no step 4"):
        A.context_at(header, free, 4)


# ------------------------------------------------------------------ the command line


def _batch(cli, tmp_path, out, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe quick brown fox\n", encoding="utf-8")
    args = ["batch", "--model", "tiny-random", "--prune", "magnitude:0.6", "--prompts", prompts, "--out", out]
    args += ["--max-new-tokens", "6", "--mode", "shared", "--mode", "free", "--no-lens", *extra]
    return cli(*args)


def test_batch_attributes_the_flip_steps_and_resumes(cli, tmp_path):
    import pyarrow.parquet as pq

    from engine.record import schema
    from engine.record.session import load_session

    out = tmp_path / "out"
    first = _batch(cli, tmp_path, out)  # recorded without attribution …
    assert first.returncode == 0, first.stderr
    assert not (out / "attribution.parquet").exists()
    result = _batch(cli, tmp_path, out, "--attribute", "flips")  # … then turned on: every run gets it
    assert result.returncode == 0, result.stderr
    assert "attribution.parquet" in result.stdout
    table = pq.read_table(out / "attribution.parquet")
    assert table.schema == schema.arrow_schema(schema.ATTRIBUTION)
    rows = table.to_pylist()
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["attribute"] == "flips"
    flips = {}
    for session_file in sorted((out / "sessions").glob("*.jsonl")):
        session = load_session(session_file)
        flips[session_file.stem] = A.flip_steps(session.steps, session.header["mode"])
    assert any(flips.values())
    for run_id, steps in flips.items():
        assert sorted({r["step"] for r in rows if r["run_id"] == run_id}) == steps
    units = {r["unit"] for r in rows}
    assert {"attn.0", "mlp.3", "block.2"} <= units
    # resume: a run whose attribution is missing gets it again, nothing else is recomputed
    victim = next(run_id for run_id, steps in flips.items() if steps)
    (out / "attribution" / f"{victim}.jsonl").unlink()
    again = _batch(cli, tmp_path, out, "--attribute", "flips")
    assert again.returncode == 0, again.stderr
    assert "0 computed" in again.stdout
    assert pq.read_table(out / "attribution.parquet").to_pylist() == rows
    # turning it off over an attributed sweep is refused in one line
    off = _batch(cli, tmp_path, out)
    assert off.returncode == 2 and "--attribute flips" in off.stderr and "Traceback" not in off.stderr


def test_attribute_prints_a_session(cli, tmp_path):
    out = tmp_path / "out"
    assert _batch(cli, tmp_path, out).returncode == 0
    session = out / "sessions" / "p000-magnitude-0.6-shared.jsonl"
    rows = tmp_path / "rows.parquet"
    result = cli("attribute", session, "--step", 1, "--step", 2, "--out", rows)  # counted from 1, as on screen
    assert result.returncode == 0, result.stderr
    for text in ("step 1:", "step 2:", "KL removed", "restores top-1", "smallest set", "block.", "attn.", "mlp."):
        assert text in result.stdout
    import pyarrow.parquet as pq

    table = pq.read_table(rows).to_pylist()
    assert sorted({r["step"] for r in table}) == [0, 1] and len(table) == 2 * 12  # the tables count from 0
    for step in (99, 0):
        bad = cli("attribute", session, "--step", step)
        assert bad.returncode == 2 and f"no step {step}" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = cli("attribute", tmp_path / "nope.jsonl")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    corrupt = tmp_path / "bad.jsonl"
    corrupt.write_text("not json\n", encoding="utf-8")
    bad = cli("attribute", corrupt)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_attribute_command_has_no_traceback_on_a_bad_step(hierui, tmp_path):
    """The real command (a subprocess): one line, exit 2."""
    session = tmp_path / "s.jsonl"
    header = {"format": "hierui-session", "version": 1, "model": "tiny-random", "prompt": "hi", "mode": "shared"}
    header.update(prompt_ids=[1, 2], perturbation={"spec": "magnitude:0.5"})
    session.write_text(json.dumps(header) + "\n", encoding="utf-8")
    result = hierui("attribute", session, "--step", 3)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
