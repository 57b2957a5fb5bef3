"""bench/gpu_check.sh runs end to end on a CPU: its scale part (bench/scale_check.py) with a small random shape,
the embedded model's tokenizer read from a models folder that holds only its tokenizer files (the layout the GPU
machine gets in .gpu/models)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SHAPE = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_with_a_small_shape(tmp_path):
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "config.json").write_text(json.dumps(SHAPE))
    models = tmp_path / "models"
    tokenizer = models / "smollm2-135m"
    tokenizer.mkdir(parents=True)
    embedded = Path(os.environ["HIERUI_MODELS"]) / "smollm2-135m"  # the test store's converted embedded model
    has_tokenizer = (embedded / "tokenizer.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (embedded / name).is_file():
            shutil.copy(embedded / name, tokenizer / name)
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "HIERUI_MODELS": str(models),
        "SKIP_BASIC": "1",  # the scale part alone (the rest is what it was before; see bench/README.md)
        "SCALE_MODEL": f"random:{tmp_path / 'small'}",
        "SCALE_STEPS": "4",
        "SCALE_BATCH": "2",
        "SCALE_QUANT_STEPS": "2",
        "SCALE_CALIB": "4x16",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "cpu"], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) < 60
    label = "small shape, random weights" + ("" if has_tokenizer else ", byte tokenizer")
    assert any(line.startswith("scale model: ") and label in line for line in lines), lines
    for prefix in ("scale load:", "scale wanda:0.5 pruning:", "scale wanda:0.5 shared:", "scale wanda:0.5 free:"):
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)
    assert any(line.startswith(("scale int8 shared:", "scale int8/nf4: skipped")) for line in lines), lines
    # the multi-device part, here the hooked path on one CPU: exactly the one-device pair's masks and steps
    multi = {line.split(": ")[0]: line for line in lines if line.startswith("multi-device")}
    for spec in ("wanda:0.5", "sparsegpt:0.5"):
        assert "masks agree 100.0000%" in multi[f"multi-device {spec} pruning"], multi
        assert "layer ℓ of both on one device: yes" in multi[f"multi-device {spec} pruning"]
        assert "max relative KL difference 0.00e+00" in multi[f"multi-device {spec} stepping"], multi
    assert "FAILED" not in "\n".join(multi.values()), multi
    assert "max |Δ KL patched| 0.00e+00" in multi["multi-device attribution"]
    assert "FAILED" not in run.stdout
