"""How a sweep uses Ray (`hierui batch --ray`, `hierui kld --ray`): the cluster, one worker's resources, where the
sessions are written; checked before anything starts."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import HieruiError

COLLECT = ("auto", "shared", "driver")


@dataclass(frozen=True)
class RayOptions:
    """How a sweep uses Ray: the cluster (`auto` or an address), the resources of one pair worker, where the
    sessions are written, and at most how many workers (None: as many as the cluster fits)."""

    address: str = "auto"
    cpus: int = 1
    gpus: int = 1
    collect: str = "auto"
    workers: int | None = None

    def validate(self) -> RayOptions:
        if not self.address or not str(self.address).strip():
            raise HieruiError("--ray needs auto or the address of a Ray cluster (host:port or ray://host:port)")
        if self.cpus < 1:
            raise HieruiError(f"--ray-cpus must be at least 1, got {self.cpus}")
        if self.gpus < 1:
            raise HieruiError(f"--ray-gpus must be at least 1, got {self.gpus}")
        if self.collect not in COLLECT:
            raise HieruiError(f"unknown --ray-collect '{self.collect}': use {', '.join(COLLECT)}")
        if self.workers is not None and self.workers < 1:
            raise HieruiError(f"at least one Ray worker is needed, got {self.workers}")
        return self
