"""Cost accounting: every model and scorer reports positions, calls, FLOPs and wall time.

``positions`` counts every token position a forward processes (rows x length, left padding and
rejected speculative positions included: that is the compute spent). FLOPs are estimated as
2 x parameters x positions, enough to carry CPU ratios over to GPUs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ..models.loading import clock


@dataclass
class ModelCost:
    params: int = 0
    positions: int = 0
    calls: int = 0
    wall_s: float = 0.0

    @property
    def flops(self) -> float:
        return 2.0 * self.params * self.positions

    @contextmanager
    def forward(self, positions: int):
        start = clock()
        try:
            yield
        finally:
            self.positions += int(positions)
            self.calls += 1
            self.wall_s += clock() - start

    def add(self, other: "ModelCost") -> None:
        self.params = self.params or other.params
        self.positions += other.positions
        self.calls += other.calls
        self.wall_s += other.wall_s

    def as_dict(self) -> dict:
        return {"positions": self.positions, "calls": self.calls, "flops": self.flops,
                "wall_s": round(self.wall_s, 4), "params": self.params}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
