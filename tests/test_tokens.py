"""engine.models.tokens: prompts follow the tokenizer's own BOS convention (as lm-eval and llama.cpp do); the
one-prompt Stepper hands its callback records; sessions record the prompt's ids."""

import math

import pytest
import torch

from engine.models.tokens import choice_token_ids, piece, prompt_ids, text_ids
from engine.record.settings import StepSettings


def _without_bos(tokenizer):
    """The same byte tokenizer configured not to add <s> (as SmolLM2's is)."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok("ab")["input_ids"] == [ord("a"), ord("b")]
    return tok


def test_raw_prompt_follows_the_tokenizer_convention(tiny):
    with_bos = tiny.tokenizer
    assert prompt_ids(with_bos, "hi", raw=True) == [with_bos.bos_token_id, ord("h"), ord("i")]
    no_bos = _without_bos(with_bos)
    assert no_bos.bos_token_id is not None  # it has a BOS token, but is not configured to add it
    assert prompt_ids(no_bos, "hi", raw=True) == [ord("h"), ord("i")]


def test_perplexity_scores_the_tokenizers_own_ids(tiny):
    from engine.run.quality import perplexity

    no_bos = _without_bos(tiny.tokenizer)
    text = "hello there"
    ids = torch.tensor([text_ids(no_bos, text)])
    assert ids[0, 0].item() == ord("h")
    with torch.no_grad():
        logits = tiny.model(input_ids=ids[:, :-1]).logits[0].float()
    expected = math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item())
    assert perplexity(tiny.model, no_bos, text) == pytest.approx(expected, rel=1e-5)


def test_session_header_records_the_prompt_ids(tiny, tmp_path):
    from engine.perturb import perturb
    from engine.record.session import load_session
    from engine.run.recorder import SessionRecorder
    from engine.run.stepper import Stepper

    stepper = Stepper(perturb(tiny, "none"), "Hey", StepSettings(max_new_tokens=2, raw=True))
    SessionRecorder(stepper, [tmp_path / "s.jsonl"]).run()
    header = load_session(tmp_path / "s.jsonl").header
    assert header["prompt_ids"] == prompt_ids(tiny.tokenizer, "Hey", raw=True) == stepper.prompt_ids
    assert header["prompt_tokens"] == 4


def test_one_prompt_stepper_hands_its_callback_records(tiny):
    from engine.perturb import perturb
    from engine.run.stepper import Stepper

    seen = []
    records = Stepper(perturb(tiny, "none"), "Hey", StepSettings(max_new_tokens=3)).run(seen.append)
    assert seen == records and all(isinstance(r, dict) and "kl" in r for r in seen)


def test_choice_token_ids_note_multi_token_choices(tiny):
    ids, notes = choice_token_ids(tiny.tokenizer, ["A", "Bc"])
    assert ids == [ord("A"), ord("B")] and len(notes) == 1 and "'Bc' is 2 tokens" in notes[0]


def test_piece_decodes_a_split_character_whole(tiny):
    tok = tiny.tokenizer
    euro = list("€".encode())
    assert piece(tok, [ord("a")], euro[0]) == ""
    assert piece(tok, [ord("a"), *euro[:2]], euro[2]) == "€"
