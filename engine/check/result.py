"""What `hierui check` reports: a CheckResult per check of each spec, and the SelfCheckReport of them all."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from engine.check.tolerance import tolerance_rule


@dataclass
class CheckResult:
    """One check of one spec. `value` is the measured deviation (None where nothing was measured),
    `tolerance` the most it may be, `measure` what the value is (a metric's name, "logits", "62.1% shared"),
    `reason` why it failed or does not apply (or what it compared)."""

    spec: str
    check: str
    status: str  # "pass" | "fail" | "n/a"
    value: float | None = None
    tolerance: float | None = None
    reason: str = ""
    measure: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("value", "tolerance"):  # JSON has no inf or nan: null, and the reason says why
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
        return out


@dataclass
class SelfCheckReport:
    """Every check of every spec, and what they ran on."""

    model: str
    display: str
    device: str
    dtype: str
    architecture: dict
    steps: int
    calibration: dict
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    spec_seconds: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(r.status == "fail" for r in self.results)

    @property
    def specs(self) -> list[str]:
        return list(dict.fromkeys(r.spec for r in self.results))

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "display": self.display,
            "device": self.device,
            "dtype": self.dtype,
            "architecture": self.architecture,
            "steps": self.steps,
            "calibration": self.calibration,
            "tolerance_rule": tolerance_rule(self.dtype),
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "results": [r.to_dict() for r in self.results],
        }
