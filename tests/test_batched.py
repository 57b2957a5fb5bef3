"""Batched stepping equals stepping each prompt alone, row by row (left padding, masks, positions, EOS; in free
mode a row where one model has ended while the other goes on)."""

import pytest

from engine.perturb import perturb
from engine.run.stepper import BatchStepper, Stepper, StepSettings

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
    "amp",
    "top1_agree",
    "sub_kl",
    "prob_cos_est_oor",
)
# fields that must be equal, not close
EXACT = ("token_d", "token_p", "text_d", "text_p", "fed", "same_token", "first_divergence", "end_d", "end_p")


@pytest.fixture(scope="module")
def pair(tiny):
    return perturb(tiny, "magnitude:0.5", use_cache=False)


def alone(pair, prompt, settings, choices, eos):
    stepper = Stepper(pair, prompt, StepSettings(**{**settings.to_dict(), "choices": choices}))
    stepper.batch.eos = eos
    return stepper.run()


def close(b, s, name):
    """Equal to float tolerance, or both null (a field of an ended model, or one not computed)."""
    if s is None or b is None:
        assert b is None and s is None, name
    else:
        assert b == pytest.approx(s, abs=1e-4), name


def assert_same(batched, single):
    assert len(batched) == len(single)
    for name in EXACT:
        assert [r.get(name) for r in batched] == [r.get(name) for r in single], name
    for b, s in zip(batched, single):
        assert set(b) == set(s)
        for name in (*SCALARS, "emb_cos", "emb_cos_est", "nll_d", "nll_p", "sub_p_d", "sub_p_p"):
            if name in s:
                close(b[name], s[name], name)
        for name in ("topk_d", "topk_p"):
            if s[name] is None:
                assert b[name] is None, name
            else:
                assert [t for t, _x, _p in b[name]] == [t for t, _x, _p in s[name]], name
                close([p for _t, _x, p in b[name]], [p for _t, _x, p in s[name]], name)


def one_side_eos(runs, side):
    """An end-of-sequence set that ends model `side` early (at a step 1…5) in every row where one of its tokens
    allows it, and never the other model: tokens of `side` that the other model never produces in any row.
    `runs`: each row's free-mode records without an EOS (each model's own trajectory, which an EOS only cuts)."""
    other = "p" if side == "d" else "d"
    taken = {r[f"token_{other}"] for run in runs for r in run}
    eos = set()
    for run in runs:
        seq = [r[f"token_{side}"] for r in run]
        found = [t for t in seq[1:6] if t not in taken and seq.index(t) >= 1]
        eos.update(found[:1])
    return eos


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
    assert lengths[0] == lengths[2] == 10  # the batch did not end with row 1
    end_d, end_p = rows[1][-1]["end_d"], rows[1][-1]["end_p"]
    assert end_d is not None and end_d <= 5
    if mode == "shared":  # row 1 ended at its dense EOS
        assert lengths[1] == end_d + 1 and end_p is None
    else:  # row 1's perturbed model went on after the dense EOS, to its own EOS or the limit
        assert lengths[1] == (10 if end_p is None else max(end_d, end_p) + 1)
    assert "sub_kl" not in rows[1][0] and len(rows[2][0]["sub_p_d"]) == 3


def test_batch_headers_are_per_row(pair, tmp_path):
    from engine.run.recorder import SessionRecorder

    batch = BatchStepper(pair, PROMPTS, StepSettings(max_new_tokens=2), choices=CHOICES)
    recorder = SessionRecorder(batch, [tmp_path / f"{b}.jsonl" for b in range(3)])
    assert [recorder.header(b)["prompt"] for b in range(3)] == PROMPTS
    assert recorder.header(0)["choices"] == ["A", "B"] and recorder.header(1)["choices"] is None
    assert [recorder.header(b)["prompt_ids"] for b in range(3)] == [row.ids for row in batch.rows]


@pytest.mark.parametrize("side", ["d", "p"])
def test_free_mode_row_where_one_model_ended_equals_alone(pair, side):
    """Free mode: in some rows one model ends early (at different steps), the other goes on to the limit; the
    ended model is fed padding in its rows, yet every row still equals its prompt stepped alone."""
    settings = StepSettings(mode="free", max_new_tokens=10)
    runs = [alone(pair, p, settings, c, set()) for p, c in zip(PROMPTS, CHOICES)]
    eos = one_side_eos(runs, side)
    assert eos, "no token of one model that the other never produces: pick other prompts"
    batch = BatchStepper(pair, PROMPTS, settings, choices=CHOICES)
    batch.eos = eos
    rows = batch.run()
    ended = 0
    other = "p" if side == "d" else "d"
    for prompt, choices, records, free in zip(PROMPTS, CHOICES, rows, runs):
        assert_same(records, alone(pair, prompt, settings, choices, eos))
        assert len(records) == 10 and all(r[f"end_{other}"] is None for r in records)
        end = records[-1][f"end_{side}"]
        if end is not None:
            ended += 1
            assert all(r[f"token_{side}"] is None and r["kl"] is None for r in records[end + 1 :])
            # the running model's trajectory is the one it has without any EOS
            assert [r[f"token_{other}"] for r in records] == [r[f"token_{other}"] for r in free]
    assert ended >= 1


def test_model_ended_in_every_row_is_no_longer_run(pair):
    """Free mode, two rows of different lengths: the dense model ends in both (at different steps), so it stops
    running; the perturbed model goes on in both rows, as when each prompt is stepped alone."""
    settings = StepSettings(mode="free", max_new_tokens=10)
    prompts, choices = PROMPTS[:2], CHOICES[:2]
    runs = [alone(pair, p, settings, c, set()) for p, c in zip(prompts, choices)]
    eos = one_side_eos(runs, "d")
    batch = BatchStepper(pair, prompts, settings, choices=choices)
    batch.eos = eos
    calls = {"dense": 0, "perturbed": 0}
    original = batch._forward

    def spy(model, ids, cache, **kwargs):
        calls["dense" if model is pair.dense else "perturbed"] += 1
        return original(model, ids, cache, **kwargs)

    batch._forward = spy
    rows = batch.run()
    ends = [records[-1]["end_d"] for records in rows]
    assert None not in ends, "the dense model should end in both rows: pick other prompts"
    for prompt, row_choices, records in zip(prompts, choices, rows):
        assert_same(records, alone(pair, prompt, settings, row_choices, eos))
        assert len(records) == 10 and records[-1]["end_p"] is None
    # the prefill, then one forward after each step but the last; the dense one only after the steps before its
    # last end (it needs no input after its EOS)
    assert calls == {"dense": 1 + max(ends), "perturbed": 1 + 9}
