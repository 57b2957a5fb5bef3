"""The logit lens (engine.run.lens) and the near-tie fields: faithful to each family's own head, zero on `none`,
equal to the step's own KL at the last layer, equal to an independent computation from the model's
hidden states at the middle layers, recorded in sessions and steps.parquet, off with --no-lens."""

import pytest
import torch

from engine.models.loading import load
from engine.models.zoo import FAMILIES
from engine.perturb import perturb
from engine.record.settings import StepSettings
from engine.run.lens import LensHead, lens_head, lens_metrics
from engine.run.stepper import BatchStepper, Stepper

PROMPT = "The lighthouse keeper"
LENS = ("lens_kl", "lens_top1_agree", "lens_dense_final_kl")


def _reference_lens(head, h_d, h_p, z_d, z_p, temperature=1.0, head_p=None):
    """The lens as it was computed before it was chunked (one full-vocabulary log-softmax per model): the
    reference the chunked, online computation must equal."""

    def logits(lens, h):
        for norm in lens.norms:
            h = norm(h)
        z = lens.head(h)
        return torch.tanh(z / lens.softcap) * lens.softcap if lens.softcap else z

    depth = h_d.shape[1] - 1
    zm_d, zm_p = logits(head, h_d[:, 1:depth]), logits(head_p or head, h_p[:, 1:depth])
    lz_d = torch.cat([zm_d.float(), z_d.float().unsqueeze(1)], dim=1) / temperature
    lz_p = torch.cat([zm_p.float(), z_p.float().unsqueeze(1)], dim=1) / temperature
    logp_d, logp_p = torch.log_softmax(lz_d, dim=-1), torch.log_softmax(lz_p, dim=-1)
    kl = (logp_d.exp() * (logp_d - logp_p)).sum(-1)
    agree = (logp_d.argmax(-1) == logp_p.argmax(-1)).float()
    final_d = logp_d[:, -1:, :]
    return {
        "lens_kl": kl,
        "lens_top1_agree": agree.masked_fill(kl.isnan(), float("nan")),
        "lens_dense_final_kl": (final_d.exp() * (final_d - logp_p)).sum(-1),
    }


class _OpaqueLinear(torch.nn.Linear):
    """A head whose weight hierui must not slice (as a quantized Linear): the lens calls it whole."""


def _states(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers, hidden, vocab = model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size
    h_d = torch.randn(batch, layers + 1, hidden, generator=g) * 3
    h_p = h_d + 0.5 * torch.randn(batch, layers + 1, hidden, generator=g)
    return h_d, h_p, torch.randn(batch, vocab, generator=g) * 4, torch.randn(batch, vocab, generator=g) * 4


def _assert_lens_equal(got, want, tol=1e-5):
    for name in LENS:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, equal_nan=True, msg=name)


@pytest.mark.parametrize("chunk", [7, 100, 1 << 20])
def test_the_chunked_lens_equals_the_full_vocabulary_formula(tiny, chunk):
    """The lens in vocabulary chunks with an online log-sum-exp (engine.run.lens) equals the full log-softmax
    formula it replaced to 1e-5: at two temperatures, with soft-capping, with the perturbed model's own head (a
    checkpoint), with a head it cannot slice (called whole), and with NaN states (a dense layer without
    counterpart: NaN there, the rest untouched). Guards the rewrite of lens_metrics."""
    model = tiny.model
    head = lens_head(model)
    h_d, h_p, z_d, z_p = _states(model)
    for temperature in (1.0, 0.7):
        got = lens_metrics(head, h_d, h_p, z_d, z_p, temperature, chunk=chunk)
        _assert_lens_equal(got, _reference_lens(head, h_d, h_p, z_d, z_p, temperature))
    capped = LensHead(norms=head.norms, head=head.head, softcap=3.0)
    _assert_lens_equal(
        lens_metrics(capped, h_d, h_p, z_d, z_p, 1.3, chunk=chunk), _reference_lens(capped, h_d, h_p, z_d, z_p, 1.3)
    )
    other = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.normal_(other.weight, std=0.2)
    own = LensHead(norms=head.norms, head=other, softcap=None)
    _assert_lens_equal(
        lens_metrics(head, h_d, h_p, z_d, z_p, head_p=own, chunk=chunk),
        _reference_lens(head, h_d, h_p, z_d, z_p, head_p=own),
    )
    opaque = _OpaqueLinear(model.config.hidden_size, model.config.vocab_size, bias=False)
    opaque.weight = head.head.weight
    whole = LensHead(norms=head.norms, head=opaque, softcap=None)
    assert whole.plain_weight() is None and head.plain_weight() is not None
    _assert_lens_equal(lens_metrics(whole, h_d, h_p, z_d, z_p, chunk=chunk), _reference_lens(head, h_d, h_p, z_d, z_p))
    h_nan = h_p.clone()
    h_nan[1, 2] = float("nan")  # row 1, layer 2: lens ℓ = 2 is not a number
    got = lens_metrics(head, h_d, h_nan, z_d, z_p, chunk=chunk)
    _assert_lens_equal(got, _reference_lens(head, h_d, h_nan, z_d, z_p))
    assert got["lens_kl"][1, 1].isnan() and got["lens_top1_agree"][1, 1].isnan()
    assert not got["lens_kl"][0].isnan().any()


def test_identical_states_give_a_lens_of_exactly_zero(tiny, embedded):
    """Equal states of the two models give bitwise equal chunked lenses (lens_kl exactly 0, every top-1 agreeing)
    for any batch size and chunk: each model's product is the same computation (the batched product's leading
    dimension of 2, not the two models' rows stacked, whose rounding depends on where a row sits)."""
    for model in (tiny.model, embedded.model):
        head = lens_head(model)
        for batch, chunk in ((1, 1000), (3, 4096), (8, 1 << 20)):
            h_d, _, z_d, _ = _states(model, batch=batch, seed=batch)
            got = lens_metrics(head, h_d, h_d.clone(), z_d, z_d.clone(), 0.9, chunk=chunk)
            assert bool((got["lens_kl"] == 0).all()), (batch, got["lens_kl"].abs().max())
            assert bool((got["lens_top1_agree"] == 1).all())


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
    """steps.parquet holds the lens: every step with --lens all; with the default (sampled) the sampled steps hold
    the same values to 1e-6 and the others null (the tables, `hierui show` and the report take them); none with
    --no-lens. batch.json records the word."""
    import json

    import pyarrow.parquet as pq

    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\nanother prompt\n")
    sweep = ["batch", "--model", "tiny-random", "--prompts", prompts, "--prune", "magnitude:0.2", "--mode", "free"]
    out, sampled = tmp_path / "out", tmp_path / "sampled"
    r = cli(*sweep, "--out", out, "--max-new-tokens", "6", "--lens", "all")
    assert r.returncode == 0, r.stderr
    steps = pq.read_table(out / "steps.parquet").to_pylist()
    assert len(steps) == 12
    for row in steps:
        assert len(row["lens_kl"]) == 4 and row["lens_kl"][-1] == pytest.approx(row["kl"])
        assert row["margin_d"] is not None and row["near_tie"] is not None
    r = cli(*sweep, "--out", sampled, "--max-new-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert json.loads((sampled / "batch.json").read_text())["settings"]["lens"] == "sampled"
    rows = pq.read_table(sampled / "steps.parquet").to_pylist()
    assert [(r["run_id"], r["step"]) for r in rows] == [(r["run_id"], r["step"]) for r in steps]
    have = [r for r in rows if r["lens_kl"] is not None]
    assert 0 < len(have) < len(rows), "a sample: some steps with the lens, some without"
    for row, full in zip(rows, steps):
        if row["lens_kl"] is None:
            assert row["lens_top1_agree"] is None and row["lens_dense_final_kl"] is None
        else:
            assert _same_lens(row, full)
    r = cli("show", sampled)
    assert r.returncode == 0, r.stderr
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


def _same_lens(got: dict, want: dict) -> bool:
    """The lens fields equal: top-1 agreement exactly, the KLs to 1e-6 (another batch shape rounds the head's
    product differently, ~5e-7 on lens_dense_final_kl)."""
    if got["lens_top1_agree"] != want["lens_top1_agree"]:
        return False
    return all(
        [g is None for g in got[name]] == [w is None for w in want[name]]
        and [g for g in got[name] if g is not None]
        == pytest.approx([w for w in want[name] if w is not None], rel=1e-6, abs=1e-6)
        for name in (LENS[0], LENS[2])
    )


def _two_rows(pair, settings, **kwargs):
    stepper = BatchStepper(pair, [PROMPT, "Once upon a time, far away"], settings, **kwargs)
    stepper.eos = set()  # every row runs to the limit
    return stepper


def test_the_lens_computed_later_equals_the_lens_computed_inline(tiny):
    """lens_later (the explorer's background lens): step() records carry null lens fields and keep what the lens
    needs; compute_lens(row, step) gives, for every (row, step), exactly what lens "all" records inline, once."""
    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    settings = StepSettings(max_new_tokens=5, mode="free", temperature=1.3)
    inline = _two_rows(pair, settings).run()
    later = _two_rows(pair, settings, lens_later=True)
    records = later.run()
    assert all(r[name] is None for rows in records for r in rows for name in LENS)
    assert later.lens_pending() == sorted(later.lens_pending(), key=lambda p: (p[1], p[0]))
    assert set(later.lens_pending()) == {(b, i) for b in range(2) for i in range(5)}
    for b, i in later.lens_pending():
        values = later.compute_lens(b, i)
        assert set(values) == set(LENS)
        assert _same_lens(values, inline[b][i])
        assert all(type(v) is bool for v in values["lens_top1_agree"])
        assert later.compute_lens(b, i) is None  # computed once: nothing kept any more
    assert later.lens_pending() == [] and later.compute_lens(0, 99) is None


def test_compute_lens_from_a_second_thread_while_stepping(tiny):
    """The explorer's worker computes pending lenses while the loop steps: every step's lens arrives, equal to the
    inline one, and the taps on the final norm never see the lens's calls."""
    import threading

    pair = perturb(tiny, "magnitude:0.5", use_cache=False)
    settings = StepSettings(max_new_tokens=12)
    inline = Stepper(pair, PROMPT, settings).run()
    stepper = Stepper(pair, PROMPT, settings, lens_later=True)
    got, done = {}, threading.Event()

    def worker():
        while not (done.is_set() and not stepper.batch.lens_pending()):
            for row, step in stepper.batch.lens_pending():
                got[step] = stepper.batch.compute_lens(row, step)

    thread = threading.Thread(target=worker)
    thread.start()
    records = stepper.run()
    done.set()
    thread.join(timeout=60)
    assert [r["kl"] for r in records] == [r["kl"] for r in inline]
    assert sorted(got) == list(range(12))
    for step, values in got.items():
        assert _same_lens(values, inline[step])


def test_the_sampled_lens_is_computed_at_the_steps_a_reader_needs(tiny):
    """lens "sampled": the lens at every LENS_SAMPLE_EVERY-th step, every top-1 flip and the first divergence (free
    mode), equal there to lens "all"; null at the other steps; computed only on those rows (no lens call for a
    step where no row is chosen). "off" has no lens fields."""
    from engine.record.settings import LENS_SAMPLE_EVERY

    pair = perturb(tiny, "magnitude:0.2", use_cache=False)
    # sampled free mode: texts that split while the top-1s agree (the first divergence is not a flip)
    only_split = 0  # steps chosen for the first divergence alone
    for mode, sample in (("shared", False), ("free", True)):
        settings = StepSettings(max_new_tokens=8, mode=mode, temperature=1.5, sample=sample, seed=3)
        full = _two_rows(pair, settings).run()
        sampled = _two_rows(pair, StepSettings(**{**settings.to_dict(), "choices": None, "lens": "sampled"})).run()
        for rows_all, rows_sampled in zip(full, sampled):
            first = next((r["step"] for r in rows_all if r["token_d"] != r["token_p"]), None)
            chosen = 0
            for a, s in zip(rows_all, rows_sampled):
                flip = a["top1_agree"] is not None and not a["top1_agree"]
                split = mode == "free" and a["step"] == first
                want = a["step"] % LENS_SAMPLE_EVERY == 0 or flip or split
                only_split += split and not flip and a["step"] % LENS_SAMPLE_EVERY != 0
                assert {k: v for k, v in s.items() if k not in LENS} == {k: v for k, v in a.items() if k not in LENS}
                if want:
                    assert _same_lens(s, a)
                else:
                    assert all(s[name] is None for name in LENS)
                chosen += want
            assert 0 < chosen < len(rows_all), "the test needs sampled and skipped steps"
    assert only_split, "the test needs a first divergence that is neither a flip nor a multiple of 4"
    assert StepSettings(lens=True).lens == "all" and StepSettings(lens=False).lens == "off"
    off = Stepper(pair, PROMPT, StepSettings(max_new_tokens=1, lens="off")).run()[0]
    assert not set(LENS) & set(off)


def test_the_header_records_the_lens_mode_and_reads_version_1(tmp_path):
    """Header version 2 records the lens as its word; a version-1 file's true/false reads as all/off (and its line
    is written back as it was), null stays unknown; a rerun steps with the recorded mode; another word is one line."""
    import json

    from engine.errors import HieruiError
    from engine.record.header import VERSION, SessionHeader, header_of
    from engine.record.session import SessionWriter, load_session
    from engine.run.rerun import settings_from_header

    assert VERSION == 2
    base = {"format": "hierui-session", "model": "tiny-random", "prompt": "p", "mode": "shared"}
    for written, word in ((True, "all"), (False, "off"), (None, None)):
        header = SessionHeader.from_dict({**base, "version": 1, "lens": written}, "s.jsonl")
        assert header.lens == word
        if written is not None:
            assert header.to_dict()["lens"] is written  # a version-1 line round-trips
    for word in ("all", "sampled", "off"):
        path = tmp_path / f"{word}.jsonl"
        SessionWriter(path, header_of({**base, "lens": word})).close()
        line = json.loads(path.read_text().splitlines()[0])
        assert (line["version"], line["lens"]) == (2, word)
        assert load_session(path).header.lens == word
        assert settings_from_header(load_session(path).header, 3).lens == word
    with pytest.raises(HieruiError, match='lens is "most", expected all or sampled or off'):
        SessionHeader.from_dict({**base, "version": 2, "lens": "most"}, "s.jsonl")


def test_the_lens_option_is_checked_before_anything_loads(cli, tmp_path):
    """--lens takes all, sampled or off; --no-lens is --lens off; an unknown word or a contradiction is one line,
    exit 2, before any model loads (no folder made); plan estimates the mode's lens (none when off)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    batch = ["batch", "--model", "tiny-random", "--prompts", prompts, "--out", tmp_path / "out"]
    for args, said in (
        ((*batch, "--lens", "most"), "unknown --lens 'most': use all, sampled, off"),
        ((*batch, "--lens", "all", "--no-lens"), "--no-lens is --lens off: it contradicts --lens all"),
        (("explore", "--model", "tiny-random", "--lens", "most"), "unknown --lens 'most'"),
        (("explore", "--model", "tiny-random", "--lens", "sampled", "--no-lens"), "--no-lens is --lens off"),
        (("plan", "--model", "tiny-random", "--lens", "most"), "unknown --lens 'most'"),
    ):
        r = cli(*args)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
    plans = {word: cli("plan", "--model", "tiny-random", "--lens", word).stdout for word in ("all", "sampled", "off")}
    assert "logit lens (all)" in plans["all"] and "logit lens (sampled)" in plans["sampled"]
    assert "logit lens" not in plans["off"] and "logit lens" not in cli("plan", "-m", "tiny-random", "--no-lens").stdout


def test_a_sweep_resumes_with_its_own_lens(tmp_path):
    """batch.json records the lens word; a folder recorded before the modes (no lens key: on, false: off) resumes
    with its own mode when --lens is not given, and another explicit mode is refused as other settings are."""
    import json

    from engine.errors import HieruiError
    from engine.sweep.folder import check_out, recorded_sweep_lens
    from engine.sweep.sweeps import plan_sweep

    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")

    def sweep(lens):
        return plan_sweep(prompts_file=prompts, model="tiny-random", specs=["none"], device="cpu", lens=lens)

    assert sweep(None).manifest()["settings"]["lens"] == "sampled"  # batch's default
    out = tmp_path / "out"
    out.mkdir()
    assert recorded_sweep_lens(out) is None
    manifest = sweep("all").manifest()
    for recorded, mode in (({}, "all"), ({"lens": False}, "off"), ({"lens": "sampled"}, "sampled")):
        settings = {k: v for k, v in manifest["settings"].items() if k != "lens"} | recorded
        (out / "batch.json").write_text(json.dumps({**manifest, "settings": settings}))
        assert recorded_sweep_lens(out) == mode
        assert check_out(sweep(mode), out) is True
        other = "all" if mode != "all" else "off"
        with pytest.raises(HieruiError, match="holds another sweep"):
            check_out(sweep(other), out)


def test_the_report_says_when_its_lens_figures_come_from_a_sample():
    """A sampled sweep's "where it breaks" averages the steps that carry the lens (a step without is no cell, not a
    zero) and says in one sentence that its figures come from a sample; an "all" sweep, or one recorded before the
    modes (no lens key: all), does not; --lens off says so."""
    from pathlib import Path

    from engine.results import localization as W
    from engine.results.runs import RunData
    from hierui.report.breaks import where_it_breaks

    steps = [
        {"run_id": "r", "spec": "a", "mode": "shared", "step": 0, "lens_kl": [0.1, 0.4]},
        {"run_id": "r", "spec": "a", "mode": "shared", "step": 1, "lens_kl": None},  # not sampled
        {"run_id": "r", "spec": "a", "mode": "shared", "step": 2, "lens_kl": [0.3, 0.8]},
    ]

    def run(settings, steps=steps):
        data = RunData(Path("."), {"settings": settings}, [{"spec": "a", "mode": "shared"}], steps)
        data.specs = ["a"]
        return data

    (grid,) = W.lens_grids(run({"lens": "sampled"}))
    assert grid.values == [[0.1, None, 0.3], [0.4, None, 0.8]]

    def said(settings, steps=steps) -> str:
        return " ".join(r["verdict"] for r in where_it_breaks(run(settings, steps))["readings"])

    assert "come from a sample of steps (--lens sampled): every 4th step" in said({"lens": "sampled"})
    assert "sample of steps" not in said({"lens": "all"}) and "sample of steps" not in said({})
    off = [{**s, "lens_kl": None} for s in steps]
    assert "no logit lens (--lens off)" in where_it_breaks(run({"lens": "off"}, off))["nodata"]
    assert [W.sweep_lens(run(s)) for s in ({}, {"lens": False}, {"lens": "sampled"})] == ["all", "off", "sampled"]
