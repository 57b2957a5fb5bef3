"""The pair worker of `hierui batch --ray` (a Ray actor, engine.sweep.distributed): the dense model loaded once, one
perturbed pair at a time, the runs of the items it is handed recorded into OUT or a scratch folder of its own.

Each chunk's dense side is computed once per worker (engine.run.trajectory): a worker keeps the dense trajectory of
a chunk it stepped while the driver says other specs will step it (an item's `dense_uses`), and replays it when it
steps that chunk for another spec; what spills beyond its memory budget goes to TMP/hierui-ray-<probe>/dense-<pid>,
removed when the driver closes the worker (and by the next worker of the sweep where this one died)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from engine.errors import HieruiError
from engine.sweep.sweeps import Run, Sweep

PROBE = ".hierui-ray-probe"  # a file the driver writes into OUT: a worker that reads it back shares OUT


def mask_hash(pair) -> str:
    """A hash of what the perturbation changed: the zero pattern of every tensor the perturbed model does not
    share with the dense one (by name), and the dropped units of a drop spec. Two workers that pruned a spec
    identically give the same hash."""
    import numpy as np

    from engine.perturb import changed_tensors

    h = hashlib.sha256()
    changed = changed_tensors(pair.dense, pair.perturbed)  # streamed layers: read from disk one at a time
    for name in sorted(changed):
        zero = (changed[name].detach() == 0).cpu().numpy()
        h.update(f"{name}{tuple(zero.shape)}".encode())
        h.update(np.packbits(zero.reshape(-1)).tobytes())
    details = (pair.report.details if pair.report is not None else None) or {}
    h.update(json.dumps(details.get("dropped"), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PairWorker:
    """One pair worker: the dense model loaded once, each calibration built once, one perturbed pair at a time.

    Plain Python (Ray makes it an actor: ray.remote(PairWorker)); nothing is loaded before the first call,
    so an error comes back as the call's error and a restarted worker (a new process) loads again."""

    def __init__(self, sweep: Sweep, out: str, probe: str, collect: str, use_cache: bool):
        self.sweep, self.out, self.probe, self.collect, self.use_cache = sweep, Path(out), probe, collect, use_cache
        self.runs = {r.run_id: r for r in sweep.runs()}
        self.loaded = self.pair = self.spec = None
        self.calibrations: dict = {}  # each distinct calibration built once (engine.sweep.runner.calibration_of)
        self.scratch: Path | None = None
        self.dense = None  # the dense trajectories of the chunks stepped (engine.run.trajectory.DenseStore)
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.name = f"{self.host}:{self.pid}"

    def _node(self) -> str | None:
        try:
            import ray

            return ray.get_runtime_context().get_node_id()
        except Exception:  # outside Ray (a test of the class itself)
            return None

    @property
    def shared(self) -> bool:
        """Whether this worker writes into the driver's OUT itself (it sees the driver's probe file)."""
        if self.collect == "driver":
            return False
        try:
            sees = (self.out / PROBE).read_text(encoding="utf-8").strip() == self.probe
        except OSError:
            sees = False
        if not sees and self.collect == "shared":
            raise HieruiError(
                f"Ray worker {self.name} does not see --out {self.out}: share that folder with every node, "
                f"or use --ray-collect driver"
            )
        return sees

    def _base(self) -> Path:
        """The folder this worker records into: OUT when shared, else an empty scratch folder of its own,
        TMP/hierui-ray-<probe>/<pid> (the folders of this sweep's dead workers there are removed first)."""
        if self.shared:
            return self.out
        self._remove_dead()
        self.scratch = self.scratch_root() / str(self.pid)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        return self.scratch

    def _store(self):
        """This worker's dense trajectories, kept between items (engine.run.trajectory.DenseStore)."""
        if self.dense is None:
            from engine.run.trajectory import DenseStore

            self._remove_dead()
            self.dense = DenseStore(self.scratch_root() / f"dense-{self.pid}", {})
        return self.dense

    def close(self) -> None:
        """The sweep is over: the dense trajectories dropped, their folder removed (the driver calls it before
        stopping the workers)."""
        if self.dense is not None:
            self.dense.close()
            self.dense = None
            try:
                self.scratch_root().rmdir()  # the last worker out removes the sweep's folder
            except OSError:
                pass

    def scratch_root(self) -> Path:
        """This sweep's folder of the workers on this node: TMP/hierui-ray-<probe>."""
        return Path(tempfile.gettempdir()) / f"hierui-ray-{self.probe}"

    def _remove_dead(self) -> None:
        """The scratch and trajectory folders of this sweep's dead workers (<pid>, dense-<pid>) removed."""
        root = self.scratch_root()
        for folder in root.glob("*") if root.is_dir() else []:
            pid = folder.name.removeprefix("dense-")
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)

    def _clean(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            try:
                self.scratch.parent.rmdir()  # the last worker out removes the sweep's folder
            except OSError:
                pass
            self.scratch = None

    def _load(self):
        if self.loaded is None:
            from engine.run.open import open_dense
            from engine.run.plan import plans_streaming
            from engine.sweep.runner import sweep_request

            s = self.sweep
            # the driver's plan (engine.run.plan): above the device's budget each worker streams its layers from disk
            plan = s.plan if plans_streaming(getattr(s, "plan", None)) else self._gpu_plan()
            self.loaded = open_dense(sweep_request(s, self.use_cache), plan)
        return self.loaded

    def _gpu_plan(self):
        """A worker given several GPUs (--ray-gpus) spreads its pair over them as a local run does: one device_map
        for both models, planned here, where the GPUs are (engine.place.placement); None on one device."""
        from engine.errors import HieruiError
        from engine.run.open import plan_pair
        from engine.run.plan import visible_gpus
        from engine.sweep.runner import sweep_request

        if visible_gpus(self.sweep.device) < 2:
            return None
        try:
            return plan_pair(sweep_request(self.sweep, self.use_cache))
        except HieruiError:  # it does not fit even so: accelerate's own placement, and its error if any
            return None

    def hello(self) -> dict:
        """Load the model and check the prompts' choices; who this worker is, what it loaded, the notes."""
        from engine.record.architecture import describe
        from engine.sweep.folder import noise_floor
        from engine.sweep.runner import tokenizer_notes

        loaded = self._load()
        notes = tokenizer_notes(self.sweep, loaded.tokenizer)
        return {
            "worker": self.name,
            "host": self.host,
            "pid": self.pid,
            "node": self._node(),
            "shared": self.shared,
            "architecture": describe(loaded.model.config),
            "floor": noise_floor(self.sweep.model, loaded.model),
            "notes": notes,
        }

    def _prepare(self, spec) -> dict | None:
        """Hold the pair of `spec` (perturbed through the normal engine path and its cache); what it took, or
        None when it was held already."""
        if self.spec == spec and self.pair is not None:
            return None
        import gc

        from engine.run.open import open_pair
        from engine.sweep.runner import calibration_of, sweep_request

        self.pair = self.spec = None
        gc.collect()
        loaded = self._load()
        calibration = calibration_of(self.sweep, spec, loaded, self.calibrations, self.use_cache)
        started = time.perf_counter()
        request = sweep_request(self.sweep, self.use_cache)
        # as the local sweep: each session header records the driver's plan
        self.pair = open_pair(
            request, spec, dense=loaded, plan=getattr(self.sweep, "plan", None), calibration=calibration
        )
        self.spec = spec
        report = self.pair.report
        return {
            "spec": str(spec),
            "seconds": round(time.perf_counter() - started, 3),
            "from_cache": bool(report.from_cache) if report is not None else False,
            "mask_hash": mask_hash(self.pair),
        }

    def work(self, item: dict) -> dict:
        """Do one item: {"kind": "runs" | "mc" | "attribute", "spec", "runs": [run ids], "sessions": {run id:
        session text} (attribute, when the driver collects)}. Returns what was done, by whom, how long it
        took, and (when the driver collects) the files written, by their path relative to OUT."""
        from engine.sweep.runner import _attribute, _score_choices
        from engine.sweep.sweeps import SweepHooks

        spec = self.sweep.specs[[str(s) for s in self.sweep.specs].index(item["spec"])]
        started = time.time()
        prepared = self._prepare(spec)
        base = self._base()
        hooks = SweepHooks()
        runs = [self.runs[i] for i in item.get("runs", [])]
        done: list[dict] = []
        if item["kind"] == "mc":
            _score_choices(self.sweep, base, spec, self.pair, hooks)
        elif item["kind"] == "runs":
            done = self._record(base, runs, item.get("dense_uses", 1))
            if self.sweep.attribute == "flips":
                _attribute(self.sweep, base, runs, self.pair, hooks)
        elif item["kind"] == "attribute":
            from engine.record.paths import atomic_write
            from engine.sweep.folder import session_path

            for run in runs:  # the driver sends the sessions when this worker does not see OUT
                text = (item.get("sessions") or {}).get(run.run_id)
                if text is not None and base != self.out:
                    atomic_write(session_path(base, run), text)  # never through a link at its name
            _attribute(self.sweep, base, runs, self.pair, hooks)
        files = {}
        if base != self.out:
            files = {
                str(p.relative_to(base)): p.read_text(encoding="utf-8")
                for p in sorted(base.rglob("*.jsonl"))
                if not (item["kind"] == "attribute" and p.parent.name == "sessions")
            }
            self._clean()
        return {
            "worker": self.name,
            "host": self.host,
            "pid": self.pid,
            "node": self._node(),
            "spec": str(spec),
            "kind": item["kind"],
            "prepared": prepared,
            "runs": done,
            "files": files,
            "seconds": round(time.time() - started, 3),
        }

    def _record(self, base: Path, chunk: list[Run], dense_uses: int = 1) -> list[dict]:
        """Step the runs of `chunk` together and record each as BASE/sessions/<run_id>.jsonl (the local sweep's
        path: engine.run.recorder.SessionRecorder); each run's time from the batch's start to its closing line.
        `dense_uses`: how many specs (this one included) the driver has yet to hand out this chunk for: above 1, its
        dense trajectory is kept for them (engine.run.trajectory)."""
        from engine.run.recorder import SessionRecorder
        from engine.run.stepper import BatchStepper
        from engine.sweep.folder import session_path
        from engine.sweep.runner import dense_key

        settings = self.sweep.step_settings(chunk[0].mode)
        started = time.perf_counter()
        store, key = self._store(), dense_key(chunk)
        store.uses[key] = int(dense_uses)
        trajectory = store.take(key)
        stepper = BatchStepper(
            self.pair,
            [r.prompt.prompt for r in chunk],
            settings,
            choices=[r.prompt.choices for r in chunk],
            dense_trajectory=trajectory,
        )
        finished: dict[int, float] = {}

        def on_record(b, record):
            if stepper.rows[b].finished and b not in finished:
                finished[b] = time.perf_counter() - started

        try:
            SessionRecorder(stepper, [session_path(base, r) for r in chunk]).run(callback=on_record)
        finally:
            store.give_back(key, trajectory, stepper.finished)
        total = time.perf_counter() - started
        return [
            {"run_id": r.run_id, "seconds": round(finished.get(b, total), 3), "batch": len(chunk)}
            for b, r in enumerate(chunk)
        ]
