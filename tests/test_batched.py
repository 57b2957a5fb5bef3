"""Batched stepping equals stepping each prompt alone, row by row (left padding, masks, positions, EOS)."""

import pytest

from engine.perturb import perturb
from engine.stepper import BatchStepper, Stepper, StepSettings

PROMPTS = ["Hi", "A much longer prompt than the first one, to force padding", "Third: medium length"]
CHOICES = [["A", "B"], None, ["x", "y", "z"]]
SCALARS = (
    "kl",
    "kl_est",
    "tv",
    "js",
    "logit_cos",
    "prob_cos",
    "prob_cos_est",
    "nll_d",
    "nll_p",
    "cum_kl",
    "cum_nll_gap",
    "dp",
    "sub_kl",
)


@pytest.fixture(scope="module")
def pair(tiny):
    return perturb(tiny, "magnitude:0.5", use_cache=False)


def alone(pair, prompt, settings, choices, eos):
    stepper = Stepper(pair, prompt, StepSettings(**{**settings.to_dict(), "choices": choices}))
    stepper.batch.eos = eos
    return stepper.run()


def assert_same(batched, single):
    assert [r["token_d"] for r in batched] == [r["token_d"] for r in single]
    assert [r["token_p"] for r in batched] == [r["token_p"] for r in single]
    for b, s in zip(batched, single):
        assert set(b) == set(s)
        for name in SCALARS:
            if name in s:
                assert b[name] == pytest.approx(s[name], abs=1e-4), name
        assert b["emb_cos"] == pytest.approx(s["emb_cos"], abs=1e-4)
        assert [t for t, _x, _p in b["topk_d"]] == [t for t, _x, _p in s["topk_d"]]
        if "sub_p_d" in s:
            assert b["sub_p_d"] == pytest.approx(s["sub_p_d"], abs=1e-4)
        assert b["text_d"] == s["text_d"] and b.get("first_divergence") == s.get("first_divergence")


@pytest.mark.parametrize("mode", ["shared", "free"])
@pytest.mark.parametrize("sample", [False, True])
def test_batched_equals_alone_per_row(pair, mode, sample):
    settings = StepSettings(mode=mode, max_new_tokens=10, sample=sample, seed=3)
    # an end-of-sequence token that one row produces midway: that row must stop there, the others go on
    free_runs = [alone(pair, p, settings, c, set()) for p, c in zip(PROMPTS, CHOICES)]
    others = {r[key] for i in (0, 2) for r in free_runs[i] for key in ("token_d", "token_p")}
    candidates = [r["token_d"] for r in free_runs[1][2:6] if r["token_d"] not in others]
    assert candidates, "no token unique to row 1: pick other prompts"
    eos = {candidates[0]}
    batch = BatchStepper(pair, PROMPTS, settings, choices=CHOICES)
    batch.eos = eos
    rows = batch.run()
    lengths = []
    for prompt, choices, records in zip(PROMPTS, CHOICES, rows):
        single = alone(pair, prompt, settings, choices, eos)
        assert_same(records, single)
        lengths.append(len(records))
    assert lengths[1] <= 6 < 10 and lengths[0] == lengths[2] == 10  # the EOS row ended early, the batch did not
    assert "sub_kl" not in rows[1][0] and len(rows[2][0]["sub_p_d"]) == 3


def test_batch_headers_are_per_row(pair, tmp_path):
    from engine.session import SessionRecorder

    batch = BatchStepper(pair, PROMPTS, StepSettings(max_new_tokens=2), choices=CHOICES)
    recorder = SessionRecorder(batch, [tmp_path / f"{b}.jsonl" for b in range(3)])
    assert [recorder.header(b)["prompt"] for b in range(3)] == PROMPTS
    assert recorder.header(0)["choices"] == ["A", "B"] and recorder.header(1)["choices"] is None
    assert [recorder.header(b)["prompt_ids"] for b in range(3)] == [row.ids for row in batch.rows]
