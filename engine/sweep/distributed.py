"""Sweeps on a Ray cluster (`hierui batch --ray`): the runs of engine.sweep.runner handed to pair workers, one per GPU.

connect   `--ray auto` joins the cluster started on this machine with `ray start --head`, or starts a
          local one when none runs (and stops it at the end); `--ray ADDRESS` joins that cluster. Ray
          is imported lazily: without it, one line says how to install it (engine.sweep.cluster).
place     one PairWorker (a Ray actor, engine.sweep.worker) per `gpus` GPUs (several: one placement-group bundle,
          so a pair's GPUs are reserved together on one node and both models get the same device map), or per
          `cpus` CPUs on a cluster without GPUs (or with --device cpu); never more than there is work.
work      the driver computes the missing runs exactly as the local resume does (engine.sweep.runner's
          complete_runs, choices_complete, attribution_complete), cuts them into the local batches
          (engine.sweep.runner.chunks_of: the same chunks for every spec, grouped by spec) and hands the items
          out one at a time per worker
          (a ray.wait loop): a worker keeps the spec it holds while that spec has work, an idle one
          takes a spec nobody holds, and only then shares a spec another worker has already pruned
          (from the shared cache under HIERUI_HOME when the workers share it). Each worker loads the
          dense model once, builds each calibration once and holds one perturbed pair at a time; an item
          says how many specs have yet to step its chunk (`dense_uses`), and a worker keeps the chunk's dense
          trajectory for those it steps itself (engine.sweep.worker, engine.run.trajectory).
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

import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import HieruiError
from engine.sweep.cluster import (
    MAX_ATTEMPTS,
    MAX_RESTARTS,
    actor_options,
    connect,
    error_text,
    import_ray,
    plan_workers,
    release,
)
from engine.sweep.ray_options import RayOptions
from engine.sweep.sweeps import Sweep, SweepHooks, SweepResult
from engine.sweep.worker import PROBE, PairWorker

WORKERS_FILE = "workers.jsonl"


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


def _append(out: Path, lines: list[dict]) -> None:
    """Append lines to OUT/workers.jsonl, flushed to the disk (a driver killed later loses none of them)."""
    if not lines:
        return
    from engine.record.paths import append_whole

    append_whole(
        out / WORKERS_FILE, "".join(json.dumps(x, ensure_ascii=False, separators=(",", ":")) + "\n" for x in lines)
    )


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
    from engine.sweep.runner import chunks_of, finish, pending

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
                chunks = chunks_of(sweep, spec, todo, size)
                items += [Item("runs", str(spec), [r.run_id for r in chunk]) for chunk in chunks]
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
        _close(ray, slots)
        release(ray, [slot.actor for slot in slots], groups, started_here)
        (out / PROBE).unlink(missing_ok=True)


def _close(ray, slots: list[_Slot]) -> None:
    """Each live worker drops its dense trajectories and removes their folder (engine.sweep.worker.PairWorker.close)
    before it is stopped; a worker that does not answer within seconds is stopped anyway."""
    refs = []
    for slot in slots:
        try:
            refs.append(slot.actor.close.remote())
        except Exception:
            pass
    if refs:
        try:
            ray.wait(refs, num_returns=len(refs), timeout=10)
        except Exception:
            pass


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
    """Hand the items out to the workers until every one is done or has failed MAX_ATTEMPTS times."""
    _Dispatch(ray, sweep, out, slots, items, hooks, result, state).run()


class _Dispatch:
    """The driver's ray.wait loop: an item to each idle worker (_pick), the answers accepted as they come, the item
    of a worker that failed or died handed out again."""

    def __init__(self, ray, sweep: Sweep, out: Path, slots, items, hooks, result: SweepResult, state):
        self.ray, self.out, self.slots, self.hooks, self.result, self.state = ray, out, slots, hooks, result, state
        self.runs = {r.run_id: r for r in sweep.runs()}
        self.queues: dict[str, deque] = {}
        for item in items:
            self.queues.setdefault(item.spec, deque()).append(item)
        self.ready: set[str] = set()  # the specs some worker has perturbed (in the cache: others may share them)
        self.inflight: dict = {}  # object ref → the slot working on it
        self.failed: list[Item] = []

    def run(self) -> None:
        from engine.record.paths import atomic_write

        ray = self.ray
        while True:
            for slot in self.slots:
                if slot.item is None and not slot.dead:
                    item = _pick(slot, self.queues, self.slots, self.ready)
                    if item is not None:
                        self.submit(slot, item)
                    elif slot.spec is not None or slot.runs_done:
                        self.state(slot.name, "idle", slot.spec, slot.runs_done)
            if not self.inflight:
                break
            ready_refs, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            if hasattr(self.hooks, "tick"):
                self.hooks.tick()
            for ref in ready_refs:
                slot = self.inflight.pop(ref)
                answer = self.answer(ref, slot)
                if answer is None:
                    continue
                _accept(self.out, slot, answer, self.runs, self.hooks, self.result, atomic_write)
                self.ready.add(answer["spec"])
                slot.spec = answer["spec"]
        if self.failed:
            failed = self.failed
            ids = [i for item in failed for i in item.runs] or [f"{item.kind} {item.spec}" for item in failed]
            raise HieruiError(
                f"{len(ids)} run(s) failed {MAX_ATTEMPTS} times on the Ray workers (e.g. {ids[0]}: "
                f"{failed[0].errors[-1]}); the others are recorded in {self.out}: rerun with --out {self.out} to "
                "retry them",
                1,
            )

    def answer(self, ref, slot: _Slot) -> dict | None:
        """A worker's answer; None when it failed (its item handed out again, or given up). A HieruiError raised in
        the worker ends the sweep with that line, and so does the death of every worker."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, HieruiError):
                raise HieruiError(str(cause), cause.exit_code) from None
            self.requeue(slot, error_text(e))  # an error in the worker's code: tried again, elsewhere
            return None
        except ray.exceptions.RayError as e:  # the worker died: Ray restarts it (up to MAX_RESTARTS)
            slot.failures += 1
            slot.spec = None
            self.requeue(slot, error_text(e))
            slot.dead = slot.failures > MAX_RESTARTS
            self.state(slot.name, "dead" if slot.dead else "restarting", None, slot.runs_done)
            if all(s.dead for s in self.slots):
                raise HieruiError(
                    f"every Ray worker died (last: {error_text(e)}); the runs recorded so far are kept in {self.out}",
                    1,
                ) from None
            return None

    def submit(self, slot: _Slot, item: Item) -> None:
        from engine.sweep.folder import session_path

        payload = item.to_dict()
        if item.kind == "runs":  # this item and those of other specs waiting with the same chunk
            key = self.dense_key(item)
            waiting = [i for q in self.queues.values() for i in q if i.kind == "runs" and self.dense_key(i) == key]
            payload["dense_uses"] = 1 + len(waiting)
        if item.kind == "attribute":  # a worker that does not see OUT gets the sessions it attributes
            payload["sessions"] = {
                i: session_path(self.out, self.runs[i]).read_text(encoding="utf-8") for i in item.runs
            }
        item.attempts += 1
        slot.item = item
        self.inflight[slot.actor.work.remote(payload)] = slot
        self.state(slot.name, "stepping" if slot.spec == item.spec else "perturbing", item.spec, slot.runs_done)
        slot.spec = item.spec  # held from now on: another idle worker takes another spec

    def dense_key(self, item: Item) -> str:
        """The key of an item's chunk (engine.sweep.runner.dense_key): what its dense side depends on."""
        from engine.sweep.runner import dense_key

        return dense_key([self.runs[i] for i in item.runs])

    def requeue(self, slot: _Slot, error: str) -> None:
        """The item of a worker that failed back in its spec's queue, less the runs it recorded before it died;
        given up after MAX_ATTEMPTS."""
        item, slot.item = slot.item, None
        item.errors.append(f"{slot.name}: {error}")
        if item.kind == "runs":  # runs the worker finished before it died stay as they are
            self.keep_finished(slot, item)
            if not item.runs:
                return
        if item.attempts >= MAX_ATTEMPTS:
            self.failed.append(item)
            say = self.hooks.message
            say(f"Ray: gave up on {len(item.runs) or 1} item(s) of {item.spec} after {item.attempts} attempts: {error}")
        else:
            self.queues[item.spec].appendleft(item)

    def keep_finished(self, slot: _Slot, item: Item) -> None:
        """The runs of `item` complete in OUT though their worker died before reporting them: counted as done (a
        line each in workers.jsonl, with no worker), and taken out of the item."""
        from engine.sweep.folder import load_complete, session_path

        finished = [i for i in item.runs if load_complete(session_path(self.out, self.runs[i])) is not None]
        if finished:
            _append(
                self.out,
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
                self.result.computed.append(i)
                self.hooks.run_finished(self.runs[i])
        item.runs = [i for i in item.runs if i not in finished]


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
