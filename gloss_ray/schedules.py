"""Schedules for sigma, lambda and k over training progress, as plain serialisable objects.

A schedule maps training progress ``p`` in [0, 1] (step / total steps) to a value::

    constant       value
    linear_warmup  start -> value linearly over the first ``warmup`` fraction, then value
    cosine         start -> value along a half cosine over the whole run
    step           value * factor ** (number of milestones <= p)

Dict / YAML form: ``{"kind": "cosine", "value": 0.8, "start": 0.1}``; a bare number means constant;
a bare kind name (``"cosine"``) ramps from 10% of the parameter's value to the value (``"step"``
halves it at 50% and 75% of training).
For sigma the schedule multiplies the base sigma of the chosen strategy (so ``value: 1.0`` keeps it);
for k the value is rounded to an int (``None`` = dense is only available as a constant).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

KINDS = ("constant", "linear_warmup", "cosine", "step")


@dataclass
class Schedule:
    kind: str = "constant"
    value: float = 1.0
    start: float = 0.0
    warmup: float = 0.1
    milestones: list[float] = field(default_factory=list)
    factor: float = 0.5

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"schedule kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.warmup <= 1.0:
            raise ConfigError(f"schedule warmup must be a fraction in [0, 1], got {self.warmup}")
        if any(not 0.0 <= m <= 1.0 for m in self.milestones):
            raise ConfigError(f"schedule milestones must be fractions in [0, 1], got {self.milestones}")

    def __call__(self, progress: float) -> float:
        p = min(max(float(progress), 0.0), 1.0)
        if self.kind == "constant":
            return self.value
        if self.kind == "linear_warmup":
            if self.warmup == 0 or p >= self.warmup:
                return self.value
            return self.start + (self.value - self.start) * p / self.warmup
        if self.kind == "cosine":
            return self.value + (self.start - self.value) * 0.5 * (1 + math.cos(math.pi * p))
        return self.value * self.factor ** sum(p >= m for m in self.milestones)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec, default_value: float = 1.0) -> "Schedule":
        """From a Schedule, a number (constant), a kind name (with ``default_value``) or a dict."""
        if isinstance(spec, Schedule):
            return spec
        if spec is None:
            return cls(value=default_value)
        if isinstance(spec, (int, float)):
            return cls(value=float(spec))
        if isinstance(spec, str):
            # Shortcuts: ramps start at 10% of the target; "step" halves at 50% and 75% of training.
            milestones = [0.5, 0.75] if spec == "step" else []
            return cls(kind=spec, value=default_value, start=0.1 * default_value, milestones=milestones)
        if isinstance(spec, dict):
            unknown = set(spec) - set(cls.__dataclass_fields__)
            if unknown:
                raise ConfigError(f"unknown schedule key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
            return cls(**{"value": default_value, **spec})
        raise ConfigError(f"cannot read a schedule from {spec!r}")


def int_schedule_value(schedule: Schedule, progress: float) -> int:
    return max(1, int(round(schedule(progress))))
