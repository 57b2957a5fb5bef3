"""Multiple-choice scoring: the subspace is the renormalised full distribution; multi-token choices sum."""

import pytest
import torch

from engine.errors import HieruiError
from engine.perturb import perturb
from engine.record.prompts import answer_index
from engine.run.choice import ChoiceItem, score_item, summarize_items


@pytest.fixture(scope="module")
def pair(tiny):
    return perturb(tiny, "magnitude:0.5", use_cache=False)


def full_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_single_token_subspace_is_the_renormalised_full_distribution(pair):
    item = ChoiceItem("q", "The answer is", ["A", "B", "C", "D"], 2)
    row = score_item(pair, item)
    ids = pair.tokenizer(item.prompt)["input_ids"]
    for model, key in ((pair.dense, "sub_p_d"), (pair.perturbed, "sub_p_p")):
        p = full_logprobs(model, ids)[-1].exp()
        choice = [pair.tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in item.choices]
        expected = p[choice] / p[choice].sum()
        assert row[key] == pytest.approx(expected.tolist(), abs=1e-5)
    assert sum(row["sub_p_d"]) == pytest.approx(1.0)


def test_multi_token_choices_are_scored_by_the_sum_of_their_log_probs(pair):
    item = ChoiceItem("q", "Pick:", [" cat", " dog house", "A"], 1)
    row = score_item(pair, item)
    prompt = pair.tokenizer(item.prompt)["input_ids"]
    for model, key in ((pair.dense, "score_d"), (pair.perturbed, "score_p")):
        for c, choice in enumerate(item.choices):
            ids = pair.tokenizer(choice, add_special_tokens=False)["input_ids"]
            logp = full_logprobs(model, prompt + ids)
            expected = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids))
            assert row[key][c] == pytest.approx(expected, abs=1e-4)
    expected_sub = torch.softmax(torch.tensor(row["score_d"]), -1)
    assert row["sub_p_d"] == pytest.approx(expected_sub.tolist(), abs=1e-6)


def test_single_token_choice_scores_the_same_as_the_stepper_subspace(pair):
    from engine.run.stepper import Stepper, StepSettings

    item = ChoiceItem("q", "Hello", ["A", "B", "C"], 0)
    row = score_item(pair, item)
    stepper = Stepper(pair, item.prompt, StepSettings(raw=True, choices=item.choices, max_new_tokens=1))
    assert stepper.prompt_ids == pair.tokenizer(item.prompt)["input_ids"]  # the same plain-text prompt
    record = stepper.step()
    assert record["sub_p_d"] == pytest.approx(row["sub_p_d"], abs=1e-5)
    assert record["sub_kl"] == pytest.approx(row["sub_kl"], abs=1e-5)
    assert record["kl"] == pytest.approx(row["kl"], abs=1e-5)


def test_accuracy_counting_on_items_with_known_answers(pair):
    items = [ChoiceItem(f"q{i}", f"Question {i}?", ["A", "B", "C", "D"], 0) for i in range(6)]
    preds = [score_item(pair, it) for it in items]
    # answers: the dense model's pick for the first four items, another choice for the last two
    for i, (it, row) in enumerate(zip(items, preds)):
        it.answer = row["pred_d"] if i < 4 else (row["pred_d"] + 1) % 4
    rows = [score_item(pair, it) for it in items]
    summary = summarize_items(rows)
    assert summary["items"] == 6 and summary["acc_d"] == pytest.approx(4 / 6)
    assert summary["acc_p"] == pytest.approx(sum(r["pred_p"] == it.answer for r, it in zip(rows, items)) / 6)
    assert summary["agree_rate"] == pytest.approx(sum(r["pred_d"] == r["pred_p"] for r in rows) / 6)


def test_none_scores_identically(tiny):
    row = score_item(perturb(tiny, "none"), ChoiceItem("q", "x", ["A", "BC"], 1))
    assert row["sub_kl"] == 0 and row["kl"] == 0 and row["agree"] and row["sub_p_d"] == row["sub_p_p"]


def test_answers_as_index_or_text():
    assert answer_index(2, ["a", "b", "c"]) == 2
    assert answer_index("b", ["a", "b", "c"]) == 1
    for bad in (3, -1, "z", True, None):
        with pytest.raises(HieruiError):
            answer_index(bad, ["a", "b", "c"])
