"""`hierui kld --ray`: the specs of a corpus KLD scored on a Ray cluster, one spec at a time per worker.

Each worker (a Ray actor, placed as engine.sweep.cluster places `hierui batch --ray`'s pair workers: per GPU, or per
`--ray-cpus` CPUs) loads the dense model once and scores the specs it is handed with engine.kld.corpus.score,
exactly as the local command does for one spec (its own dense forward per window, or the base file's head with
`--base`, which must then be readable at the same path on every node). The driver hands the specs out dynamically,
merges the per-spec results in the command line's order and writes the same tables and report as a local run: the
local code, on the same numbers (to float tolerance: a worker of one CPU multiplies with one thread).

A worker that dies is restarted by Ray (engine.sweep.cluster.MAX_RESTARTS) and its spec handed out again, at most
engine.sweep.cluster.MAX_ATTEMPTS times in all; a spec that fails repeatedly is one line naming it.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from types import SimpleNamespace

from engine.errors import HieruiError


class KldWorker:
    """The dense model loaded once (on the first call); each call scores one spec (engine.kld.corpus.score)."""

    def __init__(
        self, model: str, device: str, dtype: str, use_cache: bool, plan: dict | None = None, calibration=None
    ):
        from engine.run.open import PairRequest

        # per spec that calibrates, its settings (engine.record.settings.calibrations), as the driver made them
        self.calibration = dict(calibration or {})

        self.request = PairRequest(model, device=device, dtype=dtype, use_cache=use_cache)
        self.plan = plan  # the driver's (engine.run.plan): streamed layers when the pair is above the budget
        self.loaded = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def score(self, spec: str, text: str, corpus: str, ctx: int, stride, base: str | None) -> dict:
        import gc

        from engine.kld import corpus as kld
        from engine.perturb.spec import parse_spec
        from engine.run.open import open_dense, open_pair
        from engine.sweep.folder import noise_floor

        started = time.perf_counter()
        if self.loaded is None:
            self.loaded = open_dense(self.request, self.plan)
        parsed = parse_spec(spec)
        pair = open_pair(self.request, parsed, dense=self.loaded, calib=self.calibration.get(str(parsed), {}))
        base_file = None
        if base is not None:
            from engine.kld.llamacpp import open_base

            base_file = open_base(base)
        run = kld.score(self.loaded, [pair], text, corpus, ctx, stride, base=base_file)
        run.noise_floor = noise_floor(self.loaded.ref.name, self.loaded.model)
        del pair
        gc.collect()
        return {"run": run, "worker": self.name, "seconds": time.perf_counter() - started}


def score_on_ray(
    model: str,
    specs: list[str],
    text: str,
    corpus: str,
    ctx: int,
    stride,
    options,
    device: str = "auto",
    dtype: str = "auto",
    use_cache: bool = True,
    base: str | None = None,
    say=None,
    plan: dict | None = None,
    calibration: dict | None = None,
):
    """engine.kld.corpus.score of every spec on the Ray cluster of `options` (engine.sweep.ray_options.RayOptions):
    a KldRun of the specs in the order given, its noise floor the workers' (they read the same HIERUI_HOME).
    `calibration`: per spec that calibrates, its settings (engine.record.settings.calibrations)."""
    from engine.sweep.cluster import actor_options, connect, import_ray, plan_workers, release

    say = say or (lambda _text: None)
    options = options.validate()
    ray = import_ray()
    started_here = connect(ray, options.address, say)
    actors, groups = [], []
    try:
        n, each, use_gpu = plan_workers(ray, SimpleNamespace(device=device), options)
        n = min(n, len(specs))
        remote = ray.remote(KldWorker)
        for _ in range(n):
            resources = actor_options(ray, each, use_gpu, options, groups)
            actors.append(remote.options(**resources).remote(model, device, dtype, use_cache, plan, calibration))
        say(f"Ray: {n} kld worker{'s' * (n != 1)} for {len(specs)} spec{'s' * (len(specs) != 1)}")
        results, attempts = _score_all(ray, actors, specs, (text, corpus, ctx, stride, base), say)
    finally:
        release(ray, actors, groups, started_here)
    run = results[specs[0]]["run"]
    for spec in specs[1:]:
        run = run.merged(results[spec]["run"])
    run.workers = [
        {
            "spec": spec,
            "worker": results[spec]["worker"],
            "seconds": results[spec]["seconds"],
            "attempts": attempts[spec],
        }
        for spec in specs
    ]
    return run


def _score_all(ray, actors: list, specs: list[str], args: tuple, say) -> tuple[dict[str, dict], dict[str, int]]:
    """Each spec scored by whichever worker is idle (KldWorker.score(spec, *args)): {spec: its answer} and {spec:
    how many times it was handed out}. A spec whose worker died goes back in the queue, up to MAX_ATTEMPTS."""
    from engine.sweep.cluster import MAX_ATTEMPTS, error_text

    queue = deque(specs)
    attempts = dict.fromkeys(specs, 0)
    results: dict[str, dict] = {}
    running: dict = {}  # object ref -> (actor, spec)
    idle = list(actors)
    while queue or running:
        while queue and idle:
            actor, spec = idle.pop(0), queue.popleft()
            attempts[spec] += 1
            running[actor.score.remote(spec, *args)] = (actor, spec)
        done, _ = ray.wait(list(running), num_returns=1)
        actor, spec = running.pop(done[0])
        try:
            answer = ray.get(done[0])
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, HieruiError):
                raise HieruiError(str(cause), cause.exit_code) from None
            raise HieruiError(f"a Ray worker failed on {spec}: {error_text(e)}", 1) from None
        except ray.exceptions.RayError as e:  # the worker died: Ray restarts it; the spec goes back
            if attempts[spec] >= MAX_ATTEMPTS:
                raise HieruiError(
                    f"{spec}: its Ray worker died {attempts[spec]} times ({error_text(e)}); nothing was written",
                    1,
                ) from None
            say(f"Ray: the worker scoring {spec} died; {spec} is handed out again")
            queue.appendleft(spec)
            idle.append(actor)
            continue
        results[spec] = answer
        say(f"Ray: {spec} scored by {answer['worker']} in {answer['seconds']:.1f} s")
        idle.append(actor)
    return results, attempts
