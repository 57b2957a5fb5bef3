"""Sweeps on a Ray cluster (`hierui batch --ray`): the runs of engine.sweep.runner handed to pair workers, one per GPU.

connect   `--ray auto` joins the cluster started on this machine with `ray start --head`, or starts a
          local one when none runs (and stops it at the end); `--ray ADDRESS` joins that cluster. Ray
          is imported only here, lazily: without it, one line says how to install it.
place     one PairWorker (a Ray actor) per `gpus` GPUs (several: one placement-group bundle, so a pair's
          GPUs are reserved together on one node and both models get the same device map), or per
          `cpus` CPUs on a cluster without GPUs (or with --device cpu); never more than there is work.
work      the driver computes the missing runs exactly as the local resume does (engine.sweep.runner's
          complete_runs, choices_complete, attribution_complete), cuts them into the local batches
          (engine.sweep.runner.batches, grouped by spec) and hands the items out one at a time per worker
          (a ray.wait loop): a worker keeps the spec it holds while that spec has work, an idle one
          takes a spec nobody holds, and only then shares a spec another worker has already pruned
          (from the shared cache under HIERUI_HOME when the workers share it). Each worker loads the
          dense model once, builds the calibration once and holds one perturbed pair at a time.
collect   a worker that sees the driver's --out (a probe file the driver writes there) records its
          sessions there itself; one that does not (or --ray-collect driver) records them in a
          temporary folder and returns them, and the driver writes them into OUT. Either way the
          driver then writes the tables with engine.sweep.tables, as the local sweep does, so the output
          of a Ray sweep is the output of the same sweep run locally.
faults    a worker that dies (killed, out of memory, node lost) is restarted by Ray (max_restarts) and
          its unfinished item goes back in the queue for whichever worker is idle next, its runs
          already complete in OUT left out; an item is tried at most MAX_ATTEMPTS times, then its runs
          are reported as failed. A driver stopped by Ctrl-C or killed leaves complete sessions
          complete: the rerun with the same --out computes only the missing runs.
record    OUT/workers.jsonl, appended by the driver as results come in: a "prune" line per (worker,
          spec) with its time and the hash of the pruning mask (every worker must find the same), a
          "run" line per run with the worker (host:pid), the seconds it took and the attempt.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.sweep.ray_options import RayOptions
from engine.sweep.sweeps import Run, Sweep, SweepHooks, SweepResult

INSTALL = "pip install 'hierui[ray]'"
MAX_ATTEMPTS = 3  # an item (a batch of runs) is tried at most this often before its runs are reported failed
MAX_RESTARTS = 2  # Ray restarts a dead worker this often
WORKERS_FILE = "workers.jsonl"
PROBE = ".hierui-ray-probe"
# the driver's environment the workers get (a cluster started elsewhere does not have it)
ENV_PREFIXES = ("HIERUI_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def import_ray():
    """The ray module, or one HieruiError saying how to install it."""
    _token_auth()  # read by Ray when it is imported
    try:
        import ray
    except ImportError:
        raise HieruiError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


# ------------------------------------------------------------------ the worker


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
    """One pair worker: the dense model loaded once, the calibration built once, one perturbed pair at a time.

    Plain Python (Ray makes it an actor: ray.remote(PairWorker)); nothing is loaded before the first call,
    so an error comes back as the call's error and a restarted worker (a new process) loads again."""

    def __init__(self, sweep: Sweep, out: str, probe: str, collect: str, use_cache: bool):
        self.sweep, self.out, self.probe, self.collect, self.use_cache = sweep, Path(out), probe, collect, use_cache
        self.runs = {r.run_id: r for r in sweep.runs()}
        self.loaded = self.calibration = self.pair = self.spec = None
        self.scratch: Path | None = None
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
        root = Path(tempfile.gettempdir()) / f"hierui-ray-{self.probe}"
        for folder in root.glob("*") if root.is_dir() else []:
            if folder.name.isdigit() and not _alive(int(folder.name)):
                shutil.rmtree(folder, ignore_errors=True)
        self.scratch = root / str(self.pid)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        return self.scratch

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
        from engine.sweep.runner import check_choices

        loaded = self._load()
        notes = check_choices(self.sweep, loaded.tokenizer)
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
        from engine.sweep.runner import sweep_request

        self.pair = self.spec = None
        gc.collect()
        loaded = self._load()
        if spec.needs_calibration and self.calibration is None:
            from engine.perturb.calibration import build_calibration

            started = time.perf_counter()
            c = self.sweep.calib
            self.calibration = build_calibration(
                loaded, source=c.source, samples=c.samples, length=c.length, seed=c.seed, use_cache=self.use_cache
            )
            self.calibration.seconds = time.perf_counter() - started
        started = time.perf_counter()
        request = sweep_request(self.sweep, self.use_cache)
        # as the local sweep: each session header records the driver's plan
        self.pair = open_pair(
            request, spec, dense=loaded, plan=getattr(self.sweep, "plan", None), calibration=self.calibration
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
            done = self._record(base, runs)
            if self.sweep.attribute == "flips":
                _attribute(self.sweep, base, runs, self.pair, hooks)
        elif item["kind"] == "attribute":
            from engine.sweep.folder import session_path

            for run in runs:  # the driver sends the sessions when this worker does not see OUT
                text = (item.get("sessions") or {}).get(run.run_id)
                if text is not None and base != self.out:
                    session_path(base, run).parent.mkdir(parents=True, exist_ok=True)
                    session_path(base, run).write_text(text, encoding="utf-8")
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

    def _record(self, base: Path, chunk: list[Run]) -> list[dict]:
        """Step the runs of `chunk` together and record each as BASE/sessions/<run_id>.jsonl (the local sweep's
        path: engine.run.recorder.SessionRecorder); each run's time from the batch's start to its closing line."""
        from engine.run.recorder import SessionRecorder
        from engine.run.stepper import BatchStepper
        from engine.sweep.folder import session_path

        settings = self.sweep.step_settings(chunk[0].mode)
        started = time.perf_counter()
        stepper = BatchStepper(
            self.pair, [r.prompt.prompt for r in chunk], settings, choices=[r.prompt.choices for r in chunk]
        )
        finished: dict[int, float] = {}

        def on_record(b, record):
            if stepper.rows[b].finished and b not in finished:
                finished[b] = time.perf_counter() - started

        SessionRecorder(stepper, [session_path(base, r) for r in chunk]).run(callback=on_record)
        total = time.perf_counter() - started
        return [
            {"run_id": r.run_id, "seconds": round(finished.get(b, total), 3), "batch": len(chunk)}
            for b, r in enumerate(chunk)
        ]

    def ping(self) -> int:
        return self.pid


# ------------------------------------------------------------------ the driver


class RayHooks(SweepHooks):
    """SweepHooks with the workers' state: `worker_state(worker, state, spec, runs_done)` when a worker starts
    or ends an item, is restarted or given up (state: perturbing, stepping, idle, restarting, dead)."""

    def worker_state(self, worker: str, state: str, spec: str | None, runs_done: int) -> None: ...


@dataclass
class Item:
    kind: str  # "mc", "runs" or "attribute"
    spec: str
    runs: list[str] = field(default_factory=list)
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "spec": self.spec, "runs": list(self.runs)}


@dataclass
class _Slot:
    """The driver's view of one worker."""

    actor: object
    name: str  # host:pid once known; "worker N" before
    spec: str | None = None  # the spec it holds (None: none, or restarted)
    runs_done: int = 0
    failures: int = 0
    dead: bool = False
    item: Item | None = None


def worker_env() -> dict:
    """The driver's HIERUI_*/HF_*/… variables, for the workers (a cluster started elsewhere lacks them)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def connect(ray, address: str, say) -> bool:
    """Join the cluster at `address` ("auto": the one on this machine, else a new local one), with the driver's
    HIERUI_*/HF_* variables for every worker of the job; True when this call started Ray here (the caller stops
    it). A Ray already initialized in this process (a test's, a script's) is used as it is. An address where
    nothing answers is refused at once (Ray itself would keep retrying)."""
    import logging

    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": worker_env()})
    if address == "auto":
        found = _bootstrap_address("auto")
        if found is not None and _answers(found):
            ray.init(address="auto", **common)  # "auto": Ray also reads that cluster's settings (token auth)
            say(f"Ray: joined the cluster running on this machine ({found})")
            return False
        say("Ray: no cluster running here, starting a local one")
        ray.init(include_dashboard=False, **common)
        return True
    check_address(address)
    try:
        ray.init(address=address, **common)
    except Exception as e:  # a refused connection, a version mismatch: one line
        from engine.errors import one_line

        raise HieruiError(f"cannot join the Ray cluster at {address}: {one_line(e)}") from None
    say(f"Ray: joined the cluster at {address}")
    return False


def _token_auth() -> None:
    """Ray 2.60 clusters use token authentication by default, and a driver joining one by its address sends its
    token only in token mode: turn it on where a token is at hand (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]) and
    the mode is not set (a cluster without authentication accepts such a driver too)."""
    import sys

    if os.environ.get("RAY_AUTH_MODE") or sys.modules.get("ray") is not None:  # set, or too late to matter
        return
    if (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def check_address(address: str) -> None:
    """Refuse, before anything starts, an address that is malformed or where nothing answers ("auto" always
    does: it starts a local Ray when none runs here)."""
    if address.strip() == "auto":
        return
    target = _bootstrap_address(address)
    if target is None or not _answers(target):
        raise HieruiError(
            f"cannot join the Ray cluster at {address}: nothing answers there (start one with `ray start --head`, "
            f"or use --ray auto)"
        )


def _bootstrap_address(address: str) -> str | None:
    """host:port of the cluster `address` names ("auto": the one `ray start` recorded on this machine; None when
    there is none); a malformed address is one HieruiError."""
    text = address.strip()
    if text.startswith("ray://"):  # Ray Client: its server's host:port
        text = text.removeprefix("ray://").split("/", 1)[0]
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise HieruiError(f"--ray {address}: use host:port or ray://host:port")
        return text
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(text)
    except Exception:
        if text == "auto":
            return None
        raise HieruiError(f"--ray {address}: use auto, host:port or ray://host:port") from None


def _answers(host_port: str, timeout: float = 3.0) -> bool:
    """Whether something accepts a TCP connection at host:port within `timeout` seconds."""
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def plan_workers(ray, sweep: Sweep, opts: RayOptions) -> tuple[int, dict, bool]:
    """(how many workers, the resources of each, whether they use GPUs) for the cluster as it is now: per live
    node, as many workers as its GPUs (or CPUs) hold whole (a pair's GPUs are on one node)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    cpus = sum(int(r.get("CPU", 0)) for r in nodes)
    use_gpu = gpus > 0 and not str(sweep.device).startswith("cpu")
    if use_gpu:
        n, each = sum(int(r.get("GPU", 0)) // opts.gpus for r in nodes), {"num_gpus": opts.gpus, "num_cpus": 1}
    else:
        if str(sweep.device).startswith("cuda"):
            raise HieruiError(f"--device {sweep.device}: the Ray cluster has no GPU")
        n, each = sum(int(r.get("CPU", 0)) // opts.cpus for r in nodes), {"num_cpus": opts.cpus}
    if n < 1:
        need = f"{opts.gpus} GPUs" if use_gpu else f"{opts.cpus} CPUs"
        raise HieruiError(f"the Ray cluster has {cpus} CPUs and {gpus} GPUs: no node has the {need} of one pair worker")
    return min(n, opts.workers or n), each, use_gpu


def actor_options(ray, each: dict, use_gpu: bool, opts: RayOptions, groups: list) -> dict:
    """A worker's Ray options: its resources (several GPUs: one bundle of a placement group, appended to
    `groups`, so they are reserved together on one node) and restarts."""
    options = dict(max_restarts=MAX_RESTARTS, max_task_retries=0)  # the environment: the job's (connect)
    if use_gpu and opts.gpus > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"GPU": opts.gpus, "CPU": 1}], strategy="STRICT_PACK")
        groups.append(group)
        try:
            ray.get(group.ready(), timeout=120)
        except Exception:
            raise HieruiError(f"the Ray cluster has no node with {opts.gpus} free GPUs for one more pair") from None
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        options.update(num_gpus=opts.gpus, num_cpus=1)
    else:
        options.update(each)
    return options


def release(ray, actors: list, groups: list, started_here: bool) -> None:
    """The end of a Ray job, whatever happened: its actors killed (no restart), its placement groups removed, and
    the Ray instance stopped where this process started it."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    for group in groups:
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
        except Exception:
            pass
    if started_here:
        ray.shutdown()


def _append(out: Path, lines: list[dict]) -> None:
    """Append lines to OUT/workers.jsonl, flushed to the disk (a driver killed later loses none of them)."""
    if not lines:
        return
    with open(out / WORKERS_FILE, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def read_workers(out: str | Path) -> list[dict]:
    """OUT/workers.jsonl's lines (none when the sweep ran locally); a truncated last line is dropped."""
    path = Path(out) / WORKERS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def mask_agreement(lines: list[dict]) -> dict[str, list[str]]:
    """Per spec, the distinct mask hashes the workers found (one each when every worker pruned identically)."""
    found: dict[str, list[str]] = {}
    for line in lines:
        if line.get("kind") == "prune" and line.get("mask_hash"):
            hashes = found.setdefault(line["spec"], [])
            if line["mask_hash"] not in hashes:
                hashes.append(line["mask_hash"])
    return found


def error_text(e: BaseException) -> str:
    from engine.errors import one_line

    cause = getattr(e, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else e)


def run_ray_sweep(
    sweep: Sweep,
    out: str | Path,
    options: RayOptions | None = None,
    use_cache: bool = True,
    hooks: SweepHooks | None = None,
    batch_size: int | None = None,
) -> SweepResult:
    """engine.sweep.runner.run_sweep on a Ray cluster: the same runs, files and tables (see the module docstring)."""
    from engine.record.lock import lock_folder
    from engine.sweep.folder import check_out
    from engine.sweep.runner import batches, finish, pending

    options = (options or RayOptions()).validate()
    ray = import_ray()
    hooks = hooks or SweepHooks()
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise HieruiError(f"--out {out} is a file, not a folder")
    if batch_size is not None and batch_size < 1:
        raise HieruiError(f"--batch-size must be at least 1, got {batch_size}")
    with lock_folder(out, warn=hooks.message):
        check_out(sweep, out)
        result, todo, mc_todo, att_todo = pending(sweep, out)

        def make_items(size: int) -> list[Item]:
            """The work, grouped by spec, each spec's items in the local sweep's order."""
            items: list[Item] = []
            for spec in sweep.specs:
                if spec in mc_todo:
                    items.append(Item("mc", str(spec)))
                spec_runs = [r for r in todo if r.spec == spec]
                items += [Item("runs", str(spec), [r.run_id for r in chunk]) for chunk in batches(spec_runs, size)]
                spec_att = [r.run_id for r in att_todo if r.spec == spec]
                if spec_att:
                    items.append(Item("attribute", str(spec), spec_att))
            return items

        hooks.sweep_started(len(result.runs), len(result.skipped))
        if todo or mc_todo or att_todo:
            _drive(ray, sweep, out, options, use_cache, hooks, result, make_items, batch_size)
        finish(sweep, out, result)
    return result


def _drive(ray, sweep, out: Path, options: RayOptions, use_cache, hooks, result, make_items, batch_size):
    """Start the workers, hand out the items (make_items(batch size): the local batches, 8 runs on a CPU and 16
    on a GPU unless --batch-size says) until all are done or failed MAX_ATTEMPTS times, stop the workers."""
    from engine.record.paths import atomic_write
    from engine.sweep.folder import write_manifest

    say = hooks.message
    state = getattr(hooks, "worker_state", lambda *a: None)
    started_here = connect(ray, options.address, say)
    probe = secrets.token_hex(8)
    atomic_write(out / PROBE, probe + "\n")
    slots: list[_Slot] = []
    groups: list = []  # placement groups (pairs of several GPUs), removed at the end
    try:
        n, each, use_gpu = plan_workers(ray, sweep, options)
        items = make_items(batch_size or (16 if use_gpu else 8))
        n = min(n, len(items))
        remote = ray.remote(PairWorker)
        for i in range(n):
            actor = remote.options(**actor_options(ray, each, use_gpu, options, groups)).remote(
                sweep, str(out), probe, options.collect, use_cache
            )
            slots.append(_Slot(actor, f"worker {i + 1}"))
        what = f"{each['num_gpus']} GPU" if use_gpu else f"{each['num_cpus']} CPU"
        say(f"Ray: {n} pair worker{'s' * (n != 1)} ({what}{'s' * (max(each.values()) != 1)} each)")
        # every worker loads the model and checks the choices: a bad start fails here, before batch.json
        hellos = ray.get([slot.actor.hello.remote() for slot in slots])
        for slot, hello in zip(slots, hellos):
            slot.name = hello["worker"]
            state(slot.name, "idle", None, 0)
        for note in hellos[0]["notes"]:
            say(note)
        if options.collect == "auto" and any(not h["shared"] for h in hellos):
            say(
                f"Ray: {sum(not h['shared'] for h in hellos)} worker(s) do not see --out: the driver writes "
                "their sessions"
            )
        write_manifest(sweep, out, hellos[0]["architecture"], hellos[0]["floor"])
        _dispatch(ray, sweep, out, slots, items, hooks, result, state)
    except BaseException as e:
        if isinstance(e, ray.exceptions.RayTaskError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, HieruiError):
                raise HieruiError(str(cause), cause.exit_code) from None
            raise HieruiError(f"a Ray worker failed: {error_text(e)}", 1) from None
        if isinstance(e, ray.exceptions.RayError):
            raise HieruiError(f"a Ray worker failed: {error_text(e)}", 1) from None
        raise
    finally:
        release(ray, [slot.actor for slot in slots], groups, started_here)
        (out / PROBE).unlink(missing_ok=True)


def _pick(slot: _Slot, queues: dict[str, deque], slots: list[_Slot], ready: set[str]) -> Item | None:
    """The next item for an idle worker: its own spec's; else a spec no worker holds (the sweep's order);
    else a share of the spec with the most items left, once that spec is pruned (in the cache)."""
    if slot.spec in queues and queues[slot.spec]:
        return queues[slot.spec].popleft()
    held = {s.spec for s in slots if s is not slot and not s.dead and s.spec is not None}
    free = [spec for spec, q in queues.items() if q and spec not in held]
    if free:
        return queues[free[0]].popleft()
    shareable = [spec for spec, q in queues.items() if q and spec in ready]
    if shareable:
        spec = max(shareable, key=lambda s: len(queues[s]))
        return queues[spec].pop()  # from the end: the holder keeps taking from the front
    return None


def _dispatch(ray, sweep: Sweep, out: Path, slots, items, hooks, result: SweepResult, state) -> None:
    from engine.record.paths import atomic_write
    from engine.sweep.folder import load_complete, session_path

    runs = {r.run_id: r for r in sweep.runs()}
    queues: dict[str, deque] = {}
    for item in items:
        queues.setdefault(item.spec, deque()).append(item)
    ready: set[str] = set()
    inflight: dict = {}
    failed: list[Item] = []

    def submit(slot: _Slot, item: Item) -> None:
        payload = item.to_dict()
        if item.kind == "attribute":  # a worker that does not see OUT gets the sessions it attributes
            payload["sessions"] = {i: session_path(out, runs[i]).read_text(encoding="utf-8") for i in item.runs}
        item.attempts += 1
        slot.item = item
        inflight[slot.actor.work.remote(payload)] = slot
        state(slot.name, "stepping" if slot.spec == item.spec else "perturbing", item.spec, slot.runs_done)
        slot.spec = item.spec  # held from now on: another idle worker takes another spec

    def requeue(slot: _Slot, error: str) -> None:
        item, slot.item = slot.item, None
        item.errors.append(f"{slot.name}: {error}")
        if item.kind == "runs":  # runs the worker finished before it died stay as they are
            finished = [i for i in item.runs if load_complete(session_path(out, runs[i])) is not None]
            if finished:
                _append(
                    out,
                    [
                        {
                            "kind": "run",
                            "run_id": i,
                            "spec": item.spec,
                            "worker": None,
                            "note": f"finished by {slot.name}, which died before reporting",
                        }
                        for i in finished
                    ],
                )
                for i in finished:
                    result.computed.append(i)
                    hooks.run_finished(runs[i])
            item.runs = [i for i in item.runs if i not in finished]
            if not item.runs:
                return
        if item.attempts >= MAX_ATTEMPTS:
            failed.append(item)
            say = hooks.message
            say(f"Ray: gave up on {len(item.runs) or 1} item(s) of {item.spec} after {item.attempts} attempts: {error}")
        else:
            queues[item.spec].appendleft(item)

    while True:
        for slot in slots:
            if slot.item is None and not slot.dead:
                item = _pick(slot, queues, slots, ready)
                if item is not None:
                    submit(slot, item)
                elif slot.spec is not None or slot.runs_done:
                    state(slot.name, "idle", slot.spec, slot.runs_done)
        if not inflight:
            break
        ready_refs, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
        if hasattr(hooks, "tick"):
            hooks.tick()
        for ref in ready_refs:
            slot = inflight.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, HieruiError):
                    raise HieruiError(str(cause), cause.exit_code) from None
                requeue(slot, error_text(e))  # an error in the worker's code: tried again, elsewhere
                continue
            except ray.exceptions.RayError as e:  # the worker died: Ray restarts it (up to MAX_RESTARTS)
                slot.failures += 1
                slot.spec = None
                requeue(slot, error_text(e))
                slot.dead = slot.failures > MAX_RESTARTS
                state(slot.name, "dead" if slot.dead else "restarting", None, slot.runs_done)
                if all(s.dead for s in slots):
                    raise HieruiError(
                        f"every Ray worker died (last: {error_text(e)}); the runs recorded so far are kept in {out}", 1
                    ) from None
                continue
            _accept(out, slot, answer, runs, hooks, result, atomic_write)
            ready.add(answer["spec"])
            slot.spec = answer["spec"]
    if failed:
        ids = [i for item in failed for i in item.runs] or [f"{item.kind} {item.spec}" for item in failed]
        raise HieruiError(
            f"{len(ids)} run(s) failed {MAX_ATTEMPTS} times on the Ray workers (e.g. {ids[0]}: "
            f"{failed[0].errors[-1]}); the others are recorded in {out}: rerun with --out {out} to retry them",
            1,
        )


def _accept(out: Path, slot: _Slot, answer: dict, runs: dict, hooks, result: SweepResult, atomic_write) -> None:
    """A worker's answer: its files written into OUT (when the driver collects), its lines in workers.jsonl."""
    item, slot.item = slot.item, None
    if answer["worker"] != slot.name:  # restarted by Ray: a new process
        getattr(hooks, "worker_state", lambda *a: None)(slot.name, f"restarted as {answer['worker']}", None, 0)
        slot.name, slot.runs_done = answer["worker"], 0
    for rel, text in answer["files"].items():
        target = (out / rel).resolve()
        if out.resolve() not in target.parents:  # a path out of OUT: never written
            continue
        atomic_write(target, text)
    who = {k: answer[k] for k in ("worker", "host", "pid", "node")}
    lines = []
    if answer["prepared"] is not None:
        lines.append({"kind": "prune", **who, **answer["prepared"]})
    finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for row in answer["runs"]:
        run = runs[row["run_id"]]
        lines.append(
            {
                "kind": "run",
                "run_id": run.run_id,
                "spec": str(run.spec),
                "mode": run.mode,
                **who,
                "seconds": row["seconds"],
                "batch": row["batch"],
                "attempt": item.attempts,
                "finished": finished,
            }
        )
    _append(out, lines)
    for row in answer["runs"]:
        result.computed.append(row["run_id"])
        slot.runs_done += 1
        hooks.run_finished(runs[row["run_id"]])
    getattr(hooks, "worker_state", lambda *a: None)(slot.name, "idle", answer["spec"], slot.runs_done)
