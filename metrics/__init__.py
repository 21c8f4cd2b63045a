"""Metrics: small pure functions on arrays, one module per task family.

Each metric is registered as a :class:`MetricSpec` that declares its direction and range, so the
results table and the leaderboard never guess whether larger is better.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """A metric: ``fn`` maps arrays to a float, or to ``{subgroup: float}`` when ``per_subgroup``."""

    id: str
    fn: Callable[..., Any]
    higher_is_better: bool
    range: tuple[float, float]
    description: str
    per_subgroup: bool = False
    group: str = ""  # e.g. "bio" / "batch" for integration metrics; "" when the family has one group
