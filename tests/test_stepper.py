"""Lockstep stepping: none is exactly zero, shared mode feeds identical tokens, KV caches match full forwards,
free mode goes on after one model's end-of-sequence."""

import pytest
import torch

from engine.perturb import perturb
from engine.record import schema
from engine.record.summary import mean, summarize
from engine.run import metrics as M
from engine.run.stepper import Stepper, StepSettings

# the fields comparing the two models: null in the steps after one of them ended
PAIR_FIELDS = (
    "emb_cos",
    "emb_rel",
    "emb_perp",
    "emb_cos_est",
    "emb_cos_est_oor",
    "logit_cos",
    "logit_rel",
    "kl",
    "kl_est",
    "prob_cos",
    "prob_cos_est",
    "prob_cos_est_oor",
    "js",
    "tv",
    "top1_agree",
    "topk_overlap",
    "dp",
    "rank_shift",
    "amp",
    "sub_kl",
    "sub_cos",
    "sub_agree",
    "same_token",
)


@pytest.fixture(scope="module")
def magnitude_pair(tiny):
    return perturb(tiny, "magnitude:0.6")


@pytest.mark.parametrize("mode", ["shared", "free"])
def test_none_is_exactly_zero_divergence(tiny, mode):
    pair = perturb(tiny, "none")
    records = Stepper(pair, "Once upon a time", StepSettings(mode=mode, max_new_tokens=6)).run()
    assert len(records) == 6
    for r in records:
        assert r["kl"] == 0 and r["tv"] == 0 and r["js"] == 0 and r["top1_agree"] == 1
        assert all(c == 1.0 for c in r["emb_cos"]) and r["logit_cos"] == 1.0 and r["prob_cos"] == 1.0
        assert r["token_d"] == r["token_p"] and r["cum_kl"] == 0 and r["amp"] is None
    if mode == "free":
        assert records[-1]["first_divergence"] is None


def test_shared_mode_feeds_the_dense_choice_to_both(magnitude_pair):
    stepper = Stepper(magnitude_pair, "The weather today", StepSettings(mode="shared", max_new_tokens=8))
    seen = {"d": [], "p": []}
    original = stepper.batch._forward

    def spy(model, ids, cache, **kwargs):
        seen["d" if model is magnitude_pair.dense else "p"].append(ids.flatten().tolist())
        return original(model, ids, cache, **kwargs)

    stepper.batch._forward = spy
    records = stepper.run()
    assert seen["d"] == seen["p"]  # identical inputs, prompt included
    assert any(r["token_d"] != r["token_p"] for r in records)  # though the models disagree
    assert all(r["fed"] == [r["token_d"], r["token_d"]] for r in records)


@pytest.mark.parametrize("mode", ["shared", "free"])
def test_kv_cached_steps_equal_full_forward_passes(magnitude_pair, mode):
    stepper = Stepper(magnitude_pair, "A short prompt", StepSettings(mode=mode, max_new_tokens=6, choices=["a", "e"]))
    records = stepper.run()
    prompt = torch.tensor([stepper.prompt_ids])
    fed_d, fed_p = [], []
    for r in records:
        seq_d = torch.cat([prompt, torch.tensor([fed_d], dtype=torch.long)], dim=1)
        seq_p = torch.cat([prompt, torch.tensor([fed_p], dtype=torch.long)], dim=1)
        with torch.no_grad():
            od = magnitude_pair.dense(input_ids=seq_d, use_cache=False, output_hidden_states=True)
            op = magnitude_pair.perturbed(input_ids=seq_p, use_cache=False, output_hidden_states=True)
        hd = torch.stack([h[:, -1] for h in od.hidden_states], dim=1)
        hp = torch.stack([h[:, -1] for h in op.hidden_states], dim=1)
        zd, zp = od.logits[:, -1], op.logits[:, -1]
        assert int(zd.argmax()) == r["token_d"] and int(zp.argmax()) == r["token_p"]
        ref = M.to_host(
            M.step_metrics(
                hd,
                hp,
                zd,
                zp,
                torch.tensor([r["fed"][0]]),
                torch.tensor([r["fed"][1]]),
                choice_ids=torch.tensor(stepper.choice_ids),
            )
        )[0]
        for name in ("kl", "tv", "logit_cos", "prob_cos", "kl_est", "nll_d", "nll_p", "sub_kl"):
            assert r[name] == pytest.approx(ref[name], abs=1e-5), name
        assert r["emb_cos"] == pytest.approx(ref["emb_cos"], abs=1e-5)
        fed_d.append(r["fed"][0])
        fed_p.append(r["fed"][1])


def test_free_mode_first_divergence_is_first_differing_step(tiny):
    pair = perturb(tiny, "magnitude:0.4")
    records = Stepper(pair, "abc", StepSettings(mode="free", max_new_tokens=12)).run()
    differing = [r["step"] for r in records if r["token_d"] != r["token_p"]]
    assert differing, "the perturbation should split the texts on tiny-random"
    first = differing[0]
    for r in records:
        assert r["first_divergence"] == (first if r["step"] >= first else None)
    assert all(r["fed"] == [r["token_d"], r["token_p"]] for r in records)


def test_accumulated_series(magnitude_pair):
    records = Stepper(magnitude_pair, "xyz", StepSettings(max_new_tokens=5)).run()
    assert records[-1]["cum_kl"] == pytest.approx(sum(r["kl"] for r in records))
    assert records[-1]["cum_nll_gap"] == pytest.approx(sum(r["nll_p"] - r["nll_d"] for r in records))


def test_sampling_uses_identical_streams_and_the_seed(tiny):
    none = perturb(tiny, "none")

    def run(seed):
        settings = StepSettings(mode="free", sample=True, seed=seed, max_new_tokens=10)
        return [r["token_d"] for r in Stepper(none, "hi", settings).run()]

    a = Stepper(none, "hi", StepSettings(mode="free", sample=True, seed=1, max_new_tokens=10)).run()
    assert all(r["token_d"] == r["token_p"] for r in a)  # same distribution + same noise → same token
    assert run(1) == [r["token_d"] for r in a]
    assert run(1) != run(2)
    greedy = [r["token_d"] for r in Stepper(none, "hi", StepSettings(max_new_tokens=10)).run()]
    assert run(1) != greedy


def test_max_new_tokens_ends_a_run(magnitude_pair):
    stepper = Stepper(magnitude_pair, "hello", StepSettings(max_new_tokens=3))
    assert len(stepper.run()) == 3
    assert stepper.finished and stepper.step() is None


def test_eos_in_shared_mode_stops_at_that_step(magnitude_pair):
    probe = Stepper(magnitude_pair, "hello", StepSettings(max_new_tokens=6)).run()
    target = probe[3]["token_d"]
    stepper = Stepper(magnitude_pair, "hello", StepSettings(max_new_tokens=6))
    stepper.batch.eos = {target}
    records = stepper.run()
    stop = next(i for i, r in enumerate(probe) if r["token_d"] == target)
    assert len(records) == stop + 1 and records[-1]["token_d"] == target
    assert [r["end_d"] for r in records] == [None] * stop + [stop] and all(r["end_p"] is None for r in records)
    assert summarize(records, "shared")["end_d"] == stop


def test_shared_mode_ignores_the_perturbed_models_eos(magnitude_pair):
    """Shared mode feeds the dense text to both: the perturbed model's own EOS choice ends nothing."""
    probe = Stepper(magnitude_pair, "hello", StepSettings(max_new_tokens=6)).run()
    dense = {r["token_d"] for r in probe}
    target = next(r["token_p"] for r in probe if r["token_p"] not in dense)
    stepper = Stepper(magnitude_pair, "hello", StepSettings(max_new_tokens=6))
    stepper.batch.eos = {target}
    records = stepper.run()
    assert len(records) == 6 and all(r["end_d"] is None and r["end_p"] is None for r in records)
    assert all(r["kl"] is not None and r["token_p"] is not None for r in records)


def _own_eos(probe, side):
    """A token `side` produces first at a step ≥ 1 that the other model never produces, and that step."""
    other = "p" if side == "d" else "d"
    seq, theirs = [r[f"token_{side}"] for r in probe], {r[f"token_{other}"] for r in probe}
    target = next(t for t in seq[1:] if t not in theirs and seq.index(t) >= 1)
    return target, seq.index(target)


@pytest.mark.parametrize("side", ["d", "p"])
def test_free_mode_goes_on_after_one_model_ends(magnitude_pair, side, tmp_path):
    """One model's EOS: the other goes on to the token limit, fed its own tokens, as it does alone (a full
    forward pass of its text); the ended model's fields and every comparison are null from the next step on."""
    other = "p" if side == "d" else "d"
    mine, theirs = (0, 1) if side == "d" else (1, 0)
    settings = StepSettings(mode="free", max_new_tokens=8, choices=["a", "e"])
    probe = Stepper(magnitude_pair, "hello", settings)
    probe.batch.eos = set()
    probe = probe.run()
    target, stop = _own_eos(probe, side)
    assert stop < 6, "the EOS should come early: pick another prompt"
    stepper = Stepper(magnitude_pair, "hello", settings)
    stepper.batch.eos = {target}
    records = stepper.run()
    assert len(records) == 8 and stepper.finished and stepper.step() is None

    # the end markers: the step of the EOS, from that step on
    assert [r[f"end_{side}"] for r in records] == [None] * stop + [stop] * (8 - stop)
    assert all(r[f"end_{other}"] is None for r in records)
    # up to the EOS step both models run: the records are those of the run without an EOS
    for r, p in zip(records[: stop + 1], probe):
        assert {k: v for k, v in r.items() if k not in ("end_d", "end_p")} == {
            k: v for k, v in p.items() if k not in ("end_d", "end_p")
        }
    assert records[stop][f"token_{side}"] == target
    first = records[stop]["first_divergence"]
    assert first is not None and first <= stop  # the EOS step differs at the latest
    for r, p in zip(records[stop + 1 :], probe[stop + 1 :]):
        # the ended model generates nothing …
        assert r[f"token_{side}"] is None and r[f"text_{side}"] == "" and r["fed"][mine] is None
        assert r[f"topk_{side}"] is None and r[f"nll_{side}"] is None and r[f"sub_p_{side}"] is None
        # … nothing compares the two …
        assert all(r[name] is None for name in PAIR_FIELDS), [n for n in PAIR_FIELDS if r[n] is not None]
        # … the running model goes on as it does without the other's EOS
        for name in (f"token_{other}", f"text_{other}", f"topk_{other}", f"nll_{other}", f"sub_p_{other}"):
            assert r[name] == p[name], name
        assert r["fed"][theirs] == r[f"token_{other}"]
        # the accumulated series stop at the last compared step; the first divergence stays
        assert r["cum_kl"] == records[stop]["cum_kl"] and r["cum_nll_gap"] == records[stop]["cum_nll_gap"]
        assert r["first_divergence"] == first
    assert records[-1]["cum_kl"] == pytest.approx(sum(r["kl"] for r in records[: stop + 1]))

    # the running model, KV-cached, equals a full forward pass of its own text
    model = magnitude_pair.dense if other == "d" else magnitude_pair.perturbed
    fed = []
    for r in records:
        seq = torch.tensor([stepper.prompt_ids + fed], dtype=torch.long)
        with torch.no_grad():
            z = model(input_ids=seq, use_cache=False).logits[0, -1]
        logp = torch.log_softmax(z.float(), dim=-1)
        assert int(z.argmax()) == r[f"token_{other}"]
        assert r[f"nll_{other}"] == pytest.approx(-logp[r[f"token_{other}"]].item(), abs=1e-5)
        top = torch.topk(logp.exp(), len(r[f"topk_{other}"]))
        assert [t for t, _x, _p in r[f"topk_{other}"]] == top.indices.tolist()
        assert [p for _t, _x, p in r[f"topk_{other}"]] == pytest.approx(top.values.tolist(), abs=1e-5)
        fed.append(r[f"token_{other}"])

    # the summary: means and rates over the compared steps, totals of the compared steps, the end markers
    summary = summarize(records, "free")
    compared = records[: stop + 1]
    assert summary["steps"] == 8 and summary[f"end_{side}"] == stop and summary[f"end_{other}"] is None
    assert summary["kl_mean"] == pytest.approx(mean(r["kl"] for r in compared))
    assert summary["same_token_rate"] == pytest.approx(mean(float(r["same_token"]) for r in compared))
    assert summary["same_top1_rate"] == pytest.approx(mean(r["top1_agree"] for r in compared))
    assert summary["ln_ppl_ratio"] == pytest.approx(mean(r["nll_p"] - r["nll_d"] for r in compared))
    assert summary["cum_kl"] == records[-1]["cum_kl"] and summary["first_divergence"] == first
    assert summary["prob_cos_est_oor_rate"] is not None and summary["emb_cos_est_oor_rate"] is not None

    # the tables hold the records with their declared types, null where a model had ended
    rows = schema.to_table(records, schema.STEP_FIELDS).to_pylist()
    assert rows[-1][f"token_{side}"] is None and rows[-1]["kl"] is None and rows[-1]["fed"][mine] is None
    assert rows[-1][f"end_{side}"] == stop and rows[0]["emb_cos_est_oor"] == records[0]["emb_cos_est_oor"]
    assert str(schema.arrow_schema(schema.STEP_FIELDS).field("emb_cos_est_oor").type.value_type) == "bool"
    assert schema.to_table([summary], schema.SUMMARY_FIELDS).to_pylist()[0][f"end_{side}"] == stop

    # a session file holds them too, and its closing summary the end markers
    from engine.record.session import load_session
    from engine.run.recorder import SessionRecorder

    stepper = Stepper(magnitude_pair, "hello", settings)
    stepper.batch.eos = {target}
    SessionRecorder(stepper, [tmp_path / "s.jsonl"]).run()
    session = load_session(tmp_path / "s.jsonl")
    assert session.steps == records and session.summary[f"end_{side}"] == stop


def test_free_mode_ends_when_both_models_have_ended(magnitude_pair):
    settings = StepSettings(mode="free", max_new_tokens=10)
    probe = Stepper(magnitude_pair, "hello", settings)
    probe.batch.eos = set()
    probe = probe.run()
    (eos_d, stop_d), (eos_p, stop_p) = _own_eos(probe, "d"), _own_eos(probe, "p")
    assert max(stop_d, stop_p) < 9
    stepper = Stepper(magnitude_pair, "hello", settings)
    stepper.batch.eos = {eos_d, eos_p}
    records = stepper.run()
    assert len(records) == max(stop_d, stop_p) + 1 and stepper.finished
    assert (records[-1]["end_d"], records[-1]["end_p"]) == (stop_d, stop_p)


def test_blockdrop_maps_hidden_states_onto_dense_layers(tiny, tiny_calib):
    pair = perturb(tiny, "blockdrop:2", calibration=tiny_calib)
    mapping = pair.hidden_map
    assert len(mapping) == 5 and mapping[0] == 0 and mapping[-1] == 2
    records = Stepper(pair, "hello", StepSettings(max_new_tokens=3)).run()
    assert all(len(r["emb_cos"]) == 5 and r["emb_cos"][0] == pytest.approx(1.0) for r in records)
    dropped = pair.report.details["dropped"]
    if 0 in dropped:  # dropping block 0 leaves the state after "layer 0" equal to the embeddings
        assert records[0]["emb_rel"][1] > 0


def test_choices_give_the_renormalised_subspace(magnitude_pair):
    records = Stepper(magnitude_pair, "Q?", StepSettings(max_new_tokens=2, choices=["A", "B", "C"])).run()
    for r in records:
        assert sum(r["sub_p_d"]) == pytest.approx(1.0) and len(r["sub_p_p"]) == 3
        assert r["sub_kl"] >= 0 and 0 <= r["sub_cos"] <= 1 + 1e-6


@pytest.mark.parametrize("mode", ["shared", "free"])
def test_chunked_prefill_equals_one_pass(magnitude_pair, monkeypatch, mode):
    """A long prompt is prefilled in chunks through the KV caches; the records equal a one-pass prefill, for
    one row and for left-padded batch rows."""
    import engine.run.stepper as S

    prompts = ["The weather today is " * 3, "Once"]
    settings = StepSettings(mode=mode, max_new_tokens=5)
    one_pass = [
        S.BatchStepper(magnitude_pair, prompts, settings).run(),
        Stepper(magnitude_pair, prompts[0], settings).run(),
    ]
    monkeypatch.setattr(S, "PREFILL_CHUNK", 7)
    chunked = [
        S.BatchStepper(magnitude_pair, prompts, settings).run(),
        Stepper(magnitude_pair, prompts[0], settings).run(),
    ]
    batch_a, single_a = one_pass
    batch_b, single_b = chunked
    for a_rows, b_rows in ((batch_a, batch_b), ([single_a], [single_b])):
        for a, b in zip(a_rows, b_rows):
            assert [r["token_d"] for r in a] == [r["token_d"] for r in b]
            assert [r["token_p"] for r in a] == [r["token_p"] for r in b]
            for ra, rb in zip(a, b):
                assert ra["kl"] == pytest.approx(rb["kl"], rel=1e-4, abs=1e-6)
                assert ra["emb_cos"] == pytest.approx(rb["emb_cos"], rel=1e-4, abs=1e-6)
