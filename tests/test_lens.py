"""The logit lens (engine.run.lens) and the near-tie fields: faithful to each family's own head, zero on `none`,
equal to the step's own KL at the last layer, equal to an independent computation from the model's
hidden states at the middle layers, recorded in sessions and steps.parquet, off with --no-lens."""

import pytest
import torch

from engine.models.loading import load
from engine.models.zoo import FAMILIES
from engine.perturb import perturb
from engine.record.settings import StepSettings
from engine.run.lens import lens_head, lens_metrics
from engine.run.stepper import BatchStepper, Stepper

PROMPT = "The lighthouse keeper"


def _raw_last_state(model, ids):
    """The residual stream after the last layer (the final norm's input) at the last position, and the logits."""
    from engine.anatomy import sublayers as anatomy

    parts = anatomy.find(model)
    norms = lens_head(model).norms
    grabbed = []
    hook = norms[0].register_forward_pre_hook(lambda _m, args: grabbed.append(args[0][:, -1].clone()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]
    finally:
        hook.remove()
    assert parts is not None
    return grabbed[-1], logits


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=() if f in ("gemma2", "opt", "gpt2") else pytest.mark.slow) for f in FAMILIES],
)
def test_the_lens_head_reproduces_each_familys_logits(family):
    """head(final_norm(h_L)) with the modules lens_head finds is the model's own output (soft-capping,
    untied heads, OPT's final norm, GPT-2's ln_f included): the lens is the model's own read-out."""
    model = load(f"tiny-random:{family}", device="cpu").model
    ids = torch.tensor([[3, 17, 42, 9, 11]])
    h_last, logits = _raw_last_state(model, ids)
    head = lens_head(model)
    assert head is not None
    if family == "gemma2":
        assert head.softcap, "Gemma 2's final soft-capping is part of its read-out"
    torch.testing.assert_close(head.logits(h_last), logits, rtol=1e-5, atol=1e-5)


def test_lens_on_none_is_zero_at_every_layer(embedded):
    pair = perturb(embedded, "none")
    records = Stepper(pair, PROMPT, StepSettings(max_new_tokens=3)).run()
    layers = embedded.model.config.num_hidden_layers
    for record in records:
        assert len(record["lens_kl"]) == layers
        assert record["lens_kl"] == [0.0] * layers
        assert all(record["lens_top1_agree"])
        assert record["lens_dense_final_kl"][-1] == 0.0
        assert record["near_tie"] is False


def test_lens_at_the_last_layer_is_the_steps_kl(tiny):
    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    records = Stepper(pair, PROMPT, StepSettings(max_new_tokens=4, temperature=1.5)).run()
    for record in records:
        assert record["lens_kl"][-1] == record["kl"]
        assert record["lens_dense_final_kl"][-1] == record["kl"]
        assert record["lens_top1_agree"][-1] == record["top1_agree"]
        assert record["kl"] > 0
    # and computed by the lens itself from the logits (before the stepper sets it), the same to float tolerance
    vocab = tiny.model.config.vocab_size
    z_d, z_p = torch.randn(2, vocab), torch.randn(2, vocab)
    h = torch.randn(2, tiny.model.config.num_hidden_layers + 1, tiny.model.config.hidden_size)
    got = lens_metrics(lens_head(tiny.model), h, h + 0.1, z_d, z_p, temperature=1.5)
    lp_d, lp_p = torch.log_softmax(z_d / 1.5, -1), torch.log_softmax(z_p / 1.5, -1)
    torch.testing.assert_close(got["lens_kl"][:, -1], (lp_d.exp() * (lp_d - lp_p)).sum(-1))


def _independent_lens_kl(pair, ids, temperature):
    """KL(dense lens ℓ ‖ perturbed lens ℓ) for ℓ = 1..L−1 from output_hidden_states, in float64."""
    out = []
    with torch.no_grad():
        states = [m(input_ids=ids, output_hidden_states=True).hidden_states for m in (pair.dense, pair.perturbed)]
    model = pair.dense
    for layer in range(1, model.config.num_hidden_layers):
        z = [model.lm_head(model.model.norm(s[layer][:, -1])).double() / temperature for s in states]
        lp_d, lp_p = torch.log_softmax(z[0], -1), torch.log_softmax(z[1], -1)
        out.append(float((lp_d.exp() * (lp_d - lp_p)).sum()))
    return out


@pytest.mark.parametrize("spec", ["magnitude:0.5", "wanda:0.5"])
def test_lens_in_the_middle_layers_equals_an_independent_computation(tiny, tiny_calib, spec):
    pair = perturb(tiny, spec, calibration=tiny_calib, use_cache=False)
    stepper = Stepper(pair, PROMPT, StepSettings(max_new_tokens=1, temperature=0.7))
    record = stepper.run()[0]
    expected = _independent_lens_kl(pair, torch.tensor([stepper.prompt_ids]), 0.7)
    assert record["lens_kl"][:-1] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert any(v > 1e-4 for v in expected), "the perturbation shows in the middle layers"


def test_no_lens_records_no_lens_fields(tiny):
    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    record = Stepper(pair, PROMPT, StepSettings(max_new_tokens=1, lens=False)).run()[0]
    assert not {"lens_kl", "lens_top1_agree", "lens_dense_final_kl"} & set(record)
    assert record["kl"] > 0


def test_margin_and_near_ties(tiny):
    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    everything = Stepper(pair, PROMPT, StepSettings(max_new_tokens=8, topk=2, tie_margin=1.0)).run()
    nothing = Stepper(pair, PROMPT, StepSettings(max_new_tokens=8, topk=2, tie_margin=0.0)).run()
    assert any(not r["top1_agree"] for r in everything), "the test needs a flip"
    for wide, none in zip(everything, nothing):
        top = wide["topk_d"]
        assert wide["margin_d"] == pytest.approx(top[0][2] - top[1][2], abs=1e-6)
        assert wide["near_tie"] is (not wide["top1_agree"])  # every flip is within a margin of 1
        assert none["near_tie"] is False  # no margin is below 0


def test_a_prefix_row_continues_a_run_where_it_left_off(tiny):
    """A branch row (prompt + the tokens generated before step s, starting at step s) steps exactly as the parent
    did from s: greedy, and sampled (the parent's noise stream from step s on)."""
    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    for settings in (StepSettings(max_new_tokens=8, mode="free"), StepSettings(max_new_tokens=8, sample=True, seed=3)):
        parent = Stepper(pair, PROMPT, settings).run()
        s = 3
        prefix = [r["fed"][0] for r in parent[:s]]
        rest = BatchStepper(
            pair,
            [PROMPT],
            StepSettings(**{**settings.to_dict(), "choices": None, "max_new_tokens": 8 - s}),
            prefixes=[prefix],
            start_steps=[s],
        ).run()[0]
        assert [r["token_d"] for r in rest] == [r["token_d"] for r in parent[s:]]
        if settings.mode == "shared":  # the same context for the perturbed model too: the same divergence
            assert [r["kl"] for r in rest] == pytest.approx([r["kl"] for r in parent[s:]], rel=1e-4, abs=1e-7)


def test_batch_tables_carry_the_lens(cli, tmp_path):
    import pyarrow.parquet as pq

    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    out = tmp_path / "out"
    r = cli(
        "batch",
        "--model",
        "tiny-random",
        "--prompts",
        prompts,
        "--prune",
        "magnitude:0.5",
        "--out",
        out,
        "--max-new-tokens",
        "3",
    )
    assert r.returncode == 0, r.stderr
    steps = pq.read_table(out / "steps.parquet").to_pylist()
    assert len(steps) == 6
    for row in steps:
        assert len(row["lens_kl"]) == 4 and row["lens_kl"][-1] == pytest.approx(row["kl"])
        assert row["margin_d"] is not None and row["near_tie"] is not None
    summary = pq.read_table(out / "summary.parquet").to_pylist()
    assert all(
        row["flips"] == sum(not s["top1_agree"] for s in steps if s["run_id"] == row["run_id"]) for row in summary
    )
    off = tmp_path / "off"
    r = cli(
        "batch",
        "--model",
        "tiny-random",
        "--prompts",
        prompts,
        "--prune",
        "magnitude:0.5",
        "--out",
        off,
        "--max-new-tokens",
        "2",
        "--no-lens",
    )
    assert r.returncode == 0, r.stderr
    assert all(row["lens_kl"] is None for row in pq.read_table(off / "steps.parquet").to_pylist())


def test_lens_is_exactly_zero_before_a_dropped_sublayer(tiny, tiny_calib):
    """Layers before the dropped MLP are the dense model's own tensors: their lenses are equal, bit for bit."""
    pair = perturb(tiny, "mlpdrop:1", calibration=tiny_calib, use_cache=False)
    dropped = pair.report.details["dropped"][0]
    record = Stepper(pair, PROMPT, StepSettings(max_new_tokens=1)).run()[0]
    # lens_kl[ℓ − 1] reads the residual stream after ℓ layers: layers 0..dropped−1 untouched, dropped's MLP gone
    assert record["lens_kl"][:dropped] == [0.0] * dropped
    assert all(v > 0 for v in record["lens_kl"][dropped:])
