"""Lockstep stepping: none is exactly zero, shared mode feeds identical tokens, KV caches match full forwards."""

import pytest
import torch

from engine import metrics as M
from engine.perturb import perturb
from engine.stepper import Stepper, StepSettings


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
