"""What a command does as its slow part starts: quiet the libraries, print the memory plan, run the explorer."""

import sys

from engine.errors import HieruiError
from hierui.output import console

# library warnings that say nothing to a hierui user (each seen in a real run): (category, message start, module)
QUIET_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"torch\.utils\._pytree"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit"),
)


def quiet_libraries() -> None:
    """Silence the named library warnings and transformers' info logging and progress bars (every other
    warning still shows)."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def print_plan(request, always: bool = True, strict: bool = True):
    """The memory plan of an engine.run.open.PairRequest (engine.run.open.plan_pair) as one line on stdout before
    anything is loaded (stderr keeps its one line per error), kept for an out-of-memory message; nothing where the
    config is not known before loading. A pair that cannot fit even streamed, or a streamed one with a spec that
    cannot stream: exit 2 here. `always` False (kld, attribute, check, noise, replay --rerun, whose output came
    before the plan did): the line only when --gpu-mem or --gpus was given or the pair does not sit on one device."""
    from engine.run.open import plan_pair
    from engine.run.plan import planned_device_map, plans_streaming

    quiet_libraries()
    plan = plan_pair(request, strict)
    asked = request.gpu_mem is not None or request.gpus is not None
    if plan is not None and (always or asked or plans_streaming(plan) or planned_device_map(plan)):
        console.print(plan.line(), style="dim", markup=False, highlight=False, soft_wrap=True)
    return plan


def interactive() -> bool:
    """Whether the explorer has a terminal to draw on (tests replace this to start it headless)."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def run_app(app) -> None:
    """Run the Textual app; a crash inside it (after its screen closed) is one error line and exit 1."""
    app.run()
    if app.return_code:
        from engine.errors import one_line

        failure = getattr(app, "failure", None)
        why = one_line(failure) if failure is not None else f"exit code {app.return_code}"
        raise HieruiError(f"the explorer failed: {why}", exit_code=1)
