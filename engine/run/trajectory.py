"""The dense side computed once: a recorded dense trajectory, replayed for every other spec of a sweep.

Why it holds. In engine.run.stepper.BatchStepper the dense model runs at a step iff one of its rows has not ended
and is below the token limit (neither depends on the perturbed model), and it is fed its own choice (greedy, or
drawn with the row's seeded noise, which both models share and which is drawn once per step whatever happens), or
the pad token after its end of sequence. So for the same rows (the same prompt ids, settings and batch
composition) the dense outputs after the prefill and after each step are the same whatever the perturbed copy.

What is recorded. What the stepper keeps of each dense forward pass it uses (the prefill's last chunk and every
step's): the hidden states at the last position (B, L+1, H) and the logits (B, V), copied to the host in their own
dtype, so a replay is bit-exact. Cost: B × ((L+1)·H + V) × itemsize bytes per step of a chunk of B prompts, plus
the prefill's one: SmolLM2-135M in float32 (31·576 + 49,152)·4 = 268 kB per prompt and step; a 7B Llama in bfloat16
(33·4,096 + 32,000)·2 = 334 kB. A chunk of 16 prompts × 256 steps of the 7B model: 1.4 GB.

A trajectory (DenseTrajectory) given to a BatchStepper (`dense_trajectory=`) either records (empty: the live dense
forwards add to it, so the first spec pays only the copy) or replays (recorded: the dense model is not run at
all, not even its KV cache made; the stepper takes each (hidden, logits) from the recording, and everything after
it, metrics, sampling, end of sequence, pad feeding and masks, is as it was). A recording replays only into a
stepper of the same rows and settings (its fingerprint); anything else is a bug and raises.

The store (DenseStore) keeps the trajectories of a sweep, one per (chunk of prompts, mode), until the last spec
that steps that chunk has used it (`uses`: how many specs will). It holds them in host memory up to `budget`
bytes; beyond it a trajectory is written to a file in `folder` (torch.save, whole or not at all:
engine.record.paths.atomic_write) and read back with mmap, and a recording that outgrows the budget while it
records writes its steps so far as a part file and goes on. What cannot be written (a full disk, less than
DISK_MARGIN left) is dropped, with a message: the later specs run the dense model for that chunk, as they would
without the store. `close()` removes the folder; the sweep calls it when it ends or is interrupted, and a folder
left by a killed sweep is removed when the next one opens the store.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

DISK_MARGIN = 1 << 30  # spilling leaves at least this much free on the folder's disk (bytes)
DEFAULT_BUDGET = 2 << 30  # host memory a sweep keeps trajectories in, at most (and an eighth of what is available)


def default_budget() -> int:
    """The host memory a sweep's trajectories may take: DEFAULT_BUDGET, or an eighth of the available memory."""
    from engine.run.plan.placing import host_memory

    available, _total = host_memory()
    return min(DEFAULT_BUDGET, available // 8) if available else DEFAULT_BUDGET


def fingerprint(stepper) -> tuple:
    """What the dense trajectory of a BatchStepper depends on: its dense model, its rows (ids, start step), the
    settings that choose and end the dense tokens (the mode, the sampling seed and temperature, the token limit),
    its end-of-sequence ids."""
    s = stepper.settings
    rows = tuple((tuple(row.ids), row.start_step) for row in stepper.rows)
    sampling = (s.seed, s.temperature) if s.sample else None
    return (id(stepper.pair.dense), rows, s.mode, s.sample, sampling, s.max_new_tokens, frozenset(stepper.eos))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DenseTrajectory:
    """The dense outputs of one chunk's stepping: recorded by one stepper, replayed by the next ones.

    Its steps are kept in parts: a part is either a list of (hidden, logits) on the host, or the path of a file
    holding such a list (spilled)."""

    def __init__(self, spill: Callable[[], None] | None = None):
        self.parts: list[list | Path] = []
        self.key: tuple | None = None  # the fingerprint of the stepper that recorded it
        self.complete = False  # recorded by a stepper that ran to its end
        self.dropped = False  # let go by the store (it could not be kept): records nothing more
        self.devices: tuple | None = None  # where the stepper had (hidden, logits)
        self.steps = 0
        self.nbytes = 0  # host memory its parts in memory hold
        self._spill = spill  # the store's: called after each step recorded (spills when over the budget)
        self._cursor: tuple[int, int] | None = None  # (part, index) of the next step to replay
        self._loaded: tuple[int, list] | None = None  # the spilled part read (mmap), by its index

    # ------------------------------------------------------------ the stepper's side

    def start(self, stepper) -> bool:
        """Called by the stepper before its prefill: True when it replays this trajectory (the dense model is not
        run), False when it records into it."""
        key = fingerprint(stepper)
        if self.complete:
            if key != self.key:
                raise ValueError("a dense trajectory replays only into a stepper of the rows and settings it recorded")
            self._cursor = (0, 0)
            return True
        if self.key is not None:
            raise ValueError("a dense trajectory records once")
        self.key = key
        return False

    def add(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the dense outputs of one forward pass the stepper uses (copied to the host, own dtype)."""
        if self.dropped:
            return
        if self.devices is None:
            self.devices = (hidden.device, logits.device)
        step = (hidden.detach().to("cpu", copy=True), logits.detach().to("cpu", copy=True))
        if not self.parts or not isinstance(self.parts[-1], list):
            self.parts.append([])
        self.parts[-1].append(step)
        self.steps += 1
        self.nbytes += _nbytes(step)
        if self._spill is not None:
            self._spill()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next recorded (hidden, logits), on the devices the recording stepper had them on (a copy: the
        recording is never changed by what the stepper does with it)."""
        part, index = self._cursor
        while part < len(self.parts) and index >= len(self._part(part)):
            part, index = part + 1, 0
        if part >= len(self.parts):
            raise ValueError("the dense trajectory has no more steps: it was recorded for other rows or settings")
        hidden, logits = self._part(part)[index]
        self._cursor = (part, index + 1)
        return hidden.to(self.devices[0], copy=True), logits.to(self.devices[1], copy=True)

    def _part(self, n: int) -> list:
        part = self.parts[n]
        if isinstance(part, list):
            return part
        if self._loaded is None or self._loaded[0] != n:
            self._loaded = (n, torch.load(part, mmap=True, weights_only=True))
        return self._loaded[1]

    def rewind(self) -> None:
        """Ready for the next replay (the mapped file let go)."""
        self._cursor = None
        self._loaded = None


class DenseStore:
    """A sweep's dense trajectories by key (its chunk of prompts and mode), kept until their last use.

    `uses`: per key, how many specs will step that chunk; `budget`: host memory for all of them (bytes); `folder`:
    where they spill beyond it (made when first needed, removed by close()); `say`: a message to the user."""

    def __init__(self, folder: str | Path, uses: dict, budget: int | None = None, say: Callable[[str], None] = None):
        self.folder = Path(folder)
        self.uses = dict(uses)
        self.budget = default_budget() if budget is None else int(budget)
        self.say = say or (lambda _text: None)
        self.kept: dict = {}  # key → a complete DenseTrajectory
        self.recording: list[DenseTrajectory] = []
        self._files = 0
        self._warned = False
        shutil.rmtree(self.folder, ignore_errors=True)  # a folder a killed sweep left

    @property
    def nbytes(self) -> int:
        """Host memory the trajectories hold (kept and recording)."""
        return sum(t.nbytes for t in [*self.kept.values(), *self.recording])

    def take(self, key) -> DenseTrajectory | None:
        """The trajectory for the next stepper of `key`: the recorded one to replay, a new one to record when another
        spec will step that chunk too, or None (the last or only use: nothing to keep)."""
        if key in self.kept:
            return self.kept[key]
        if self.uses.get(key, 0) > 1:
            trajectory = DenseTrajectory(spill=self._over_budget)
            self.recording.append(trajectory)
            return trajectory
        return None

    def give_back(self, key, trajectory: DenseTrajectory | None, finished: bool) -> None:
        """The stepper of `key` is done (`finished`: it ran to its end). A recording is kept for the next specs of
        its chunk when complete; a trajectory is dropped after the last spec's use."""
        self.uses[key] = self.uses.get(key, 0) - 1
        if trajectory is None:
            return
        trajectory.rewind()
        if trajectory in self.recording:
            self.recording.remove(trajectory)
            trajectory._spill = None
            if finished and not trajectory.dropped and self.uses[key] > 0:
                trajectory.complete = True
                self.kept[key] = trajectory
                self._over_budget()
            else:
                self._drop(trajectory)
        elif self.uses[key] <= 0 and self.kept.get(key) is trajectory:
            self._drop(trajectory)

    def close(self) -> None:
        """Drop every trajectory and remove the folder (the sweep ended or was interrupted)."""
        for trajectory in [*self.kept.values(), *self.recording]:
            self._drop(trajectory)
        self.recording = []
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------ memory and files

    def _over_budget(self) -> None:
        """Over the budget, every part held in memory goes to a file (so each file is large: a recording that
        outgrows the budget alone fills the next one before it spills again)."""
        if self.nbytes <= self.budget:
            return
        for trajectory in [*self.kept.values(), *self.recording]:
            for n, part in enumerate(trajectory.parts):
                if isinstance(part, list) and part and not trajectory.dropped:
                    self._write(trajectory, n)

    def _write(self, trajectory: DenseTrajectory, n: int) -> None:
        """Part n of `trajectory` to a file read back with mmap; where it cannot be written, the trajectory is
        dropped (its chunk's dense side runs live for the later specs)."""
        from engine.record.paths import WriteFailed, atomic_write

        part = trajectory.parts[n]
        size = _nbytes(t for step in part for t in step)
        self._files += 1
        path = self.folder / f"{self._files:06d}.pt"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self.folder).free < size + DISK_MARGIN:
                raise WriteFailed(path, "the disk is nearly full")
            atomic_write(path, lambda tmp: torch.save(part, tmp))
        except (WriteFailed, OSError) as e:
            if not self._warned:
                self.say(
                    f"the dense side of a chunk of prompts cannot be kept ({e}): the later specs run the dense "
                    "model for it again"
                )
                self._warned = True
            self._drop(trajectory)
            return
        trajectory.parts[n] = path
        trajectory.nbytes -= size

    def _drop(self, trajectory: DenseTrajectory) -> None:
        """Forget a trajectory: its memory released, its files removed; a recording goes on recording nothing."""
        for part in trajectory.parts:
            if isinstance(part, Path):
                part.unlink(missing_ok=True)
        trajectory.parts = []
        trajectory.nbytes = 0
        trajectory.dropped = True
        trajectory.complete = False
        trajectory.rewind()
        for key, kept in list(self.kept.items()):
            if kept is trajectory:
                del self.kept[key]
