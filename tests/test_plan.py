"""engine.run.plan (`hierui plan`): the estimate's items against hand-computed numbers for tiny-random, the
command's table and its one-line errors, and the plan recorded by a sweep."""

import json

import pytest

from engine.errors import HieruiError
from engine.run.plan import GiB, MiB, estimate, parse_size

# tiny-random (engine.models.tiny): hidden 64, MLP 128, 4 layers, 4 heads of 16, 2 KV heads, vocabulary 260, tied head.
# One layer: q 64×64, k 32×64, v 32×64, o 64×64, gate/up 128×64, down 64×128 = 36,864 weights; 2 norms of 64.
LAYER_WEIGHTS = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 2 * 128 * 64 + 64 * 128
PARAMS = 260 * 64 + 4 * (LAYER_WEIGHTS + 2 * 64) + 64  # embeddings (tied head), 4 layers, the final norm
ROWS = 64 + 32 + 32 + 64 + 128 + 128 + 64  # output rows of one layer's linears (int8: a float32 scale each)


def items(plan) -> dict:
    return {item.name: item.nbytes for item in plan.items}


def test_tiny_random_items_by_hand():
    assert LAYER_WEIGHTS == 36_864
    plan = estimate("tiny-random", ["wanda:0.5"], device="cpu", dtype="float32", batch_size=2, max_new_tokens=6)
    found = items(plan)
    assert found["dense weights"] == PARAMS * 4 + 2 * 8 * 4  # + rotary inv_freq, original_inv_freq (head_dim / 2)
    assert found["perturbed copy (wanda:0.5)"] == 4 * LAYER_WEIGHTS * 4  # only the decoder matrices are new
    # KV caches: 2 models × (k, v) × 4 layers × batch 2 × 2 KV heads × (64 prompt + 6) tokens × head_dim 16 × 4 B
    kv = estimate(
        "tiny-random", ["none"], device="cpu", dtype="float32", batch_size=2, max_new_tokens=6, prompt_tokens=10
    )
    assert items(kv)["KV caches (both models)"] == 2 * 2 * 4 * 2 * 2 * 16 * 16 * 4
    assert "perturbed copy (none)" not in items(kv)  # `none` shares every tensor
    # bfloat16 halves the weights
    half = estimate("tiny-random", ["wanda:0.5"], device="cpu", dtype="bfloat16")
    assert items(half)["perturbed copy (wanda:0.5)"] == 4 * LAYER_WEIGHTS * 2
    # the peak is the largest stage, and the baseline is in every one
    assert (
        plan.peak == max(plan.stages.values())
        and plan.stages["load"] == found["process baseline"] + found["dense weights"]
    )


def test_quantized_and_workspace_sizes_by_hand():
    weights = 4 * LAYER_WEIGHTS
    int8 = items(estimate("tiny-random", ["int8"], device="cpu", dtype="float32"))
    assert int8["perturbed copy (int8)"] == weights + 4 * ROWS * 4  # 1 B per weight + a float32 scale per row
    nf4 = items(estimate("tiny-random", ["nf4"], device="cpu", dtype="float32"))
    assert nf4["perturbed copy (nf4)"] == weights // 2 + 4 * (weights // 64)  # ½ B + an absmax per 64
    magnitude = items(estimate("tiny-random", ["magnitude:0.5"], device="cpu", dtype="float32"))
    n = 128 * 64  # the largest matrix: float32 score, bool mask, top-k values (4 B) and indices (8 B) of half
    assert magnitude["pruning workspace (layer in flight)"] == 4 * n + n + 12 * (n // 2)
    sparsegpt = items(estimate("tiny-random", ["sparsegpt:0.5"], device="cpu", dtype="float32", calib=(4, 16)))
    grams = 6 * 4 * 64 * 64 + 4 * 128 * 128  # a float32 Hessian per linear: six take 64 inputs, down 128
    assert sparsegpt["pruning workspace (layer in flight)"] == grams + 5 * 4 * 128 * 128  # + down's 5 factors
    assert sparsegpt["calibration activations"] > 2 * 4 * 16 * 64 * 4  # inputs and outputs of the layer in flight


@pytest.mark.parametrize(
    "text, expected",
    [("80GiB", 80 * GiB), ("24GB", 24 * 10**9), ("512MiB", 512 * MiB), ("1.5 gib", int(1.5 * GiB))],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["80", "GiB", "80XB", "-1GiB", "", "0GiB", "eighty GiB"])
def test_parse_size_refuses_malformed(text):
    with pytest.raises(HieruiError, match="expected a size with its unit"):
        parse_size(text)


def test_plan_command_prints_the_table_and_the_placement(cli):
    run = cli("plan", "--model", "tiny-random", "--prune", "wanda:0.5", "--device", "cpu", "--batch-size", "4")
    assert run.returncode == 0, run.stderr
    for text in ("dense weights", "perturbed copy (wanda:0.5)", "KV caches (both models)", "pruning workspace"):
        assert text in run.stdout
    assert "plan: predicted peak" in run.stdout and "placement: one device (cpu)" in run.stdout
    assert ": fits" in run.stdout


def _one_line_error(run, *needles):
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


def test_plan_bad_input_is_one_line_and_exit_2(cli, tmp_path):
    base = ("plan", "--model", "tiny-random", "--prune", "wanda:0.5")
    _one_line_error(cli(*base, "--device", "cpu", "--gpu-mem", "80"), "--gpu-mem '80'", "80GiB")
    _one_line_error(cli("plan", "--model", "random:nope", "--prune", "wanda:0.5"), "unknown shape 'nope'")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": -1}))
    _one_line_error(cli("plan", "--model", f"random:{bad}"), "hidden_size must be a positive integer")
    _one_line_error(cli(*base, "--prune", "wanda:1.5"), "wanda:1.5")


def test_plan_refuses_more_gpus_than_present(cli):
    import torch

    present = torch.cuda.device_count()
    run = cli("plan", "--model", "tiny-random", "--gpus", str(present + 2), "--device", "cuda" if present else "auto")
    _one_line_error(run, f"--gpus {present + 2}: only {present} CUDA GPU(s) here")


def test_plan_refuses_a_pair_that_cannot_fit(cli, monkeypatch):
    """mixtral-8x7b in float32 on a CPU: ~350 GiB for the pair, more than this host has (made certain by
    pretending the host has 16 GiB)."""
    import engine.run.plan.placing

    monkeypatch.setattr(engine.run.plan.placing, "host_memory", lambda: (16 * GiB, 16 * GiB))
    run = cli("plan", "--model", "random:mixtral-8x7b", "--prune", "wanda:0.5", "--device", "cpu", "--dtype", "float32")
    _one_line_error(run, "cannot fit", "predicted peak", "16.00 GiB of RAM available")


def test_streamed_and_multi_gpu_placements(monkeypatch):
    """The placement decision on a (pretended) GPU: one device when it fits, several GPUs with one device_map,
    streamed when only layers fit, refused when not even that fits; the unbuilt ones say so."""
    import torch

    import engine.models.devices
    import engine.models.loading
    import engine.run.plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(engine.models.devices, "check_device", lambda d: d)
    geom = engine.run.plan.geometry("tiny-random", torch.bfloat16)

    def place(gpus, mem):
        return estimate(
            "tiny-random", ["wanda:0.5"], device="cuda", dtype="bfloat16", gpus=gpus, gpu_mem=mem, geom=geom
        )

    whole = place(1, 1 * GiB)
    assert whole.placement == "one device (cuda:0)" and whole.fits and whole.implemented
    need = whole.peak
    split = place(4, int(need * 0.6))
    assert split.placement.endswith("GPUs, one device_map for both models") and split.fits and split.implemented
    gpus = sorted(set(split.device_map.values()))
    assert len(gpus) >= 2 and gpus == list(range(len(gpus)))  # filled in order: as few boundaries as fit
    assert split.summary()["device_map"] == split.device_map  # recorded, and what the load follows
    assert "layer ℓ of dense and perturbed on one GPU" in split.placement_note
    streamed = place(1, int(need * 0.8))
    assert streamed.placement == "streamed" and not streamed.fits and streamed.implemented
    assert "streamed from disk" in streamed.placement_note
    with pytest.raises(HieruiError, match="cannot fit even streamed"):
        place(1, 1024)


def test_plan_on_pretended_gpus_prints_the_device_map(cli, monkeypatch):
    """`hierui plan` for a 7B pair on 2 × 20 GiB: a table of what each GPU holds (dense and perturbed alike) and
    its predicted peak within the budget, the layers split in order, nothing on a third GPU it does not need."""
    import torch

    import engine.models.devices
    import engine.models.loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(engine.models.devices, "check_device", lambda d: d)
    args = ("plan", "--model", "random:llama-7b", "--device", "cuda", "--dtype", "bfloat16", "--gpu-mem", "20GiB")
    run = cli(*args, "--batch-size", "16", "--calib-samples", "64", "--calib-len", "512")
    assert run.returncode == 0, run.stderr
    assert "one device_map for both models" in run.stdout and "2 GPUs" in run.stdout
    rows = [line for line in run.stdout.splitlines() if "│" in line and "cuda:" in line.split("│")[1]]
    assert [line.split("│")[1].strip() for line in rows] == ["cuda:0", "cuda:1"]
    assert "embed_tokens, layers 0–" in rows[0] and "lm_head" in rows[1] and "–31" in rows[1]
    peaks = [float(line.split("│")[4].split()[0]) for line in rows]
    assert all(0 < p <= 20.0 for p in peaks)


def test_batch_prints_and_records_the_plan(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\n")
    out = tmp_path / "out"
    run_args = ("batch", "--model", "tiny-random", "--prompts", prompts, "--prune", "magnitude:0.5")
    run_args += ("--max-new-tokens", "2", "--device", "cpu", "--out", out)
    run = cli(*run_args)
    assert run.returncode == 0, run.stderr
    assert "plan: predicted peak" in run.stdout  # stdout: stderr keeps one line per error
    manifest = json.loads((out / "batch.json").read_text())
    assert manifest["plan"]["placement"] == "one device (cpu)" and manifest["plan"]["fits"] is True
    session = next((out / "sessions").glob("*.jsonl"))
    header = json.loads(session.read_text().splitlines()[0])
    assert header["plan"] == manifest["plan"]
    again = cli(*run_args)  # a resume: the recorded plan is not compared
    assert again.returncode == 0, again.stderr
    assert "(0 computed, 1 already complete)" in again.stdout


def test_out_of_memory_names_the_plan_figure(cli, monkeypatch):
    """Running out of memory anyway: one line, exit 1, naming the stage and what hierui plan predicted."""
    import engine.models.loading

    def boom(*_args, **_kwargs):
        raise MemoryError()

    monkeypatch.setattr(engine.models.loading, "load", boom)
    run = cli("prune", "--model", "tiny-random", "--prune", "magnitude:0.5", "--device", "cpu")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out of memory" in errors[0], run.stderr
    assert "hierui plan predicted a peak of" in errors[0] and "stage" in errors[0]
    assert "plan: predicted peak" in run.stdout  # the estimate printed at the start


@pytest.mark.parametrize("columns", [80, 120])
def test_plan_help_fits_the_terminal(cli, columns):
    run = cli("plan", "--help", env={"COLUMNS": str(columns)})
    assert run.returncode == 0, run.stderr
    assert "--gpu-mem" in run.stdout and "<bool>" not in run.stdout and "<int" not in run.stdout
    assert max(len(line) for line in run.stdout.splitlines()) <= columns
