"""What `hierui plan` answers: the Plan (its items, the peak by stage, the placement and whether it fits), with
the line a run prints at its start and the summary a session header and batch.json record."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import HieruiError
from engine.run.plan.units import GiB, MiB, gib

STAGES = ("load", "calibrate", "prune", "step")


@dataclass(frozen=True)
class Item:
    """One line of the estimate: what, how many bytes, in which stages it is resident, and how it was counted."""

    name: str
    nbytes: int
    stages: tuple[str, ...]
    note: str = ""
    on_device: bool = True  # False: host memory whatever the device (the process baseline)


@dataclass
class Plan:
    """The estimate for one model, dtype, device and set of specs, and the placement hierui would use."""

    model: str
    display: str
    dtype: str
    device: str  # "cpu", "cuda:0", …
    gpus: int
    specs: list[str]
    batch_size: int
    max_new_tokens: int
    prompt_tokens: int
    calibration: tuple[int, int] | None  # (samples, length) when a spec calibrates
    items: list[Item] = field(default_factory=list)
    stages: dict[str, int] = field(default_factory=dict)  # stage → bytes resident at its peak
    peak: int = 0
    peak_stage: str = ""
    capacity: int | None = None  # bytes available per device
    capacity_source: str = ""
    host_available: int | None = None
    placement: str = "one device"  # one device | several GPUs | streamed
    placement_note: str = ""
    fits: bool = True
    implemented: bool = True
    streamed_device: int = 0  # what streaming keeps on the device
    per_gpu: int = 0  # what several GPUs each hold
    device_map: dict | None = None  # several GPUs: {module name: GPU index}, the load's (engine.place.placement)
    device_peak: int | None = None  # the peak less what is not on the device (a CPU's process baseline)
    # several GPUs: index → (its modules, e.g. 'embed_tokens, layers 0–12'; dense weight bytes; predicted peak)
    gpu_loads: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What a session header and batch.json record (key `plan`)."""
        return {
            "peak_bytes": int(self.peak),
            "peak_stage": self.peak_stage,
            "placement": self.placement,
            "fits": bool(self.fits),
            "device": self.device,
            "dtype": self.dtype,
            "capacity_bytes": None if self.capacity is None else int(self.capacity),
            **({"device_map": dict(self.device_map)} if self.device_map else {}),
        }

    def line(self) -> str:
        """One line for the start of explore / batch / prune."""
        where = f"{self.capacity_source} {gib(self.capacity)}" if self.capacity is not None else "capacity unknown"
        verdict = "fits" if self.fits else "does not fit"
        peak = f"{gib(self.peak)} ({self.peak_stage})"
        if self.device_peak is not None and self.device_peak < self.peak:  # --gpu-mem simulated on a CPU
            part = gib(self.device_peak) if self.device_peak >= GiB else f"{self.device_peak / MiB:.1f} MiB"
            peak = f"{gib(self.peak)} ({self.peak_stage}; {part} of it in the device's budget)"
        on = f"{len(self.gpu_loads)} GPUs in all" if len(self.gpu_loads) > 1 else self.device
        where = where.replace("--gpu-mem", "--gpu-mem per GPU") if len(self.gpu_loads) > 1 else where
        out = f"plan: predicted peak {peak} on {on}, {where}: {verdict}"
        out += f" · placement: {self.placement}"
        if self.placement_note:
            out += f" ({self.placement_note})"
        return out


class DoesNotFit(HieruiError):
    """The pair cannot fit even streamed (exit 2); `plan`: the estimate, its items and peak by stage, that says so
    (`hierui plan` prints it before the line)."""

    def __init__(self, message: str, plan: Plan):
        super().__init__(message, 2)
        plan.fits = False
        self.plan = plan


def stage_total(items: list[Item], stage: str, device_only: bool = False) -> int:
    return sum(i.nbytes for i in items if stage in i.stages and (i.on_device or not device_only))
