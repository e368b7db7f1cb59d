"""Network coordinates: Vivaldi, as Consul's (serf's `coordinate` package).

Each node holds a point in an 8-dimensional space plus a height (the latency
of its own access link) and an adjustment; the distance between two nodes'
coordinates estimates the round-trip time between them, in seconds. A node
moves its coordinate after every measured round trip to a peer whose
coordinate it knows: towards the peer when the estimate was too long, away
when too short, by an amount weighted by how sure each side is (`error`).
The constants and update rules are serf's defaults, so coordinates mean what
they mean in Consul (`consul rtt` compares any two).

Django-free: agents run a `Client` for their own coordinate; the control
plane runs one for its node and compares stored coordinates.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

DIMENSIONALITY = 8
ERROR_MAX = 1.5
CE = 0.25
CC = 0.25
ADJUSTMENT_WINDOW = 20
HEIGHT_MIN = 10.0e-6
LATENCY_FILTER = 3
GRAVITY_RHO = 150.0
ZERO = 1.0e-6
MAX_RTT = 10.0  # seconds: a sample beyond this is refused (serf's sanity bound)


@dataclass
class Coordinate:
    vec: list[float] = field(default_factory=lambda: [0.0] * DIMENSIONALITY)
    error: float = ERROR_MAX
    adjustment: float = 0.0
    height: float = HEIGHT_MIN

    def to_json(self) -> dict:
        """Consul's `Coord` shape."""
        return {
            "Vec": list(self.vec),
            "Error": self.error,
            "Adjustment": self.adjustment,
            "Height": self.height,
        }

    @classmethod
    def from_json(cls, data: dict) -> Coordinate:
        """A coordinate from Consul's shape; `ValueError` if it is not a valid one."""
        try:
            vec = [float(x) for x in data["Vec"]]
            coord = cls(vec, float(data["Error"]), float(data["Adjustment"]), float(data["Height"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a coordinate: {exc}") from None
        if not coord.valid():
            raise ValueError("not a coordinate: wrong dimensionality or a non-finite value")
        return coord

    def valid(self) -> bool:
        values = [*self.vec, self.error, self.adjustment, self.height]
        return len(self.vec) == DIMENSIONALITY and all(math.isfinite(v) for v in values)

    def raw_distance(self, other: Coordinate) -> float:
        return _magnitude(_diff(self.vec, other.vec)) + self.height + other.height

    def distance(self, other: Coordinate) -> float:
        """The estimated round trip to `other`, in seconds."""
        dist = self.raw_distance(other)
        adjusted = dist + self.adjustment + other.adjustment
        return adjusted if adjusted > 0.0 else dist

    def apply_force(self, force: float, other: Coordinate, rng: random.Random) -> Coordinate:
        unit, mag = _unit_vector_at(self.vec, other.vec, rng)
        out = Coordinate(
            [v + u * force for v, u in zip(self.vec, unit, strict=True)],
            self.error,
            self.adjustment,
            self.height,
        )
        if mag > ZERO:
            out.height = max((out.height + other.height) * force / mag + out.height, HEIGHT_MIN)
        return out


def _diff(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _magnitude(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def _unit_vector_at(
    a: list[float], b: list[float], rng: random.Random
) -> tuple[list[float], float]:
    d = _diff(a, b)
    mag = _magnitude(d)
    if mag > ZERO:
        return [x / mag for x in d], mag
    # The same place: push in a random direction.
    d = [rng.random() - 0.5 for _ in a]
    mag = _magnitude(d)
    if mag > ZERO:
        return [x / mag for x in d], 0.0
    return [1.0] + [0.0] * (len(a) - 1), 0.0


class Client:
    """One node's coordinate, moved by each measured round trip (serf's `Client.Update`)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.coord = Coordinate()
        self.origin = Coordinate()
        self._rng = rng or random.Random()
        self._adjustments = [0.0] * ADJUSTMENT_WINDOW
        self._adjust_at = 0
        self._samples: dict[str, list[float]] = {}

    def forget(self, node: str) -> None:
        self._samples.pop(node, None)

    def update(self, node: str, other: Coordinate, rtt_seconds: float) -> Coordinate:
        """Take one measured round trip to `node` (whose coordinate is `other`)."""
        if not other.valid():
            raise ValueError("the peer's coordinate is not valid")
        if not 0 <= rtt_seconds <= MAX_RTT or not math.isfinite(rtt_seconds):
            raise ValueError(f"round-trip time {rtt_seconds!r} s is out of range")
        rtt = self._latency_filter(node, rtt_seconds)
        self._update_vivaldi(other, rtt)
        self._update_adjustment(other, rtt)
        self._update_gravity()
        if not self.coord.valid():  # numeric trouble: start again rather than spread it
            self.coord = Coordinate()
        return self.coord

    def _latency_filter(self, node: str, rtt: float) -> float:
        samples = self._samples.setdefault(node, [])
        samples.append(rtt)
        if len(samples) > LATENCY_FILTER:
            del samples[0]
        return sorted(samples)[len(samples) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt: float) -> None:
        rtt = max(rtt, ZERO)
        dist = self.coord.distance(other)
        wrongness = abs(dist - rtt) / rtt
        total = max(self.coord.error + other.error, ZERO)
        weight = self.coord.error / total
        self.coord.error = min(
            CE * weight * wrongness + self.coord.error * (1.0 - CE * weight), ERROR_MAX
        )
        force = CC * weight * (rtt - dist)
        self.coord = self.coord.apply_force(force, other, self._rng)

    def _update_adjustment(self, other: Coordinate, rtt: float) -> None:
        self._adjustments[self._adjust_at] = rtt - self.coord.raw_distance(other)
        self._adjust_at = (self._adjust_at + 1) % ADJUSTMENT_WINDOW
        self.coord.adjustment = sum(self._adjustments) / (2.0 * ADJUSTMENT_WINDOW)

    def _update_gravity(self) -> None:
        dist = self.origin.distance(self.coord)
        force = -1.0 * (dist / GRAVITY_RHO) ** 2
        self.coord = self.coord.apply_force(force, self.origin, self._rng)
