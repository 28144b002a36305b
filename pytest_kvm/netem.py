"""What ``kvm_vlan.impair`` and ``kvm_vlan.partition`` decide, without sockets or clocks.

An impairment sits on the cable from a guest to the switch, like Linux netem on the
guest's NIC (``tc qdisc add dev eth1 root netem ...``): it acts on the frames the guest
*sends*. ``Impairment.plan`` says when each copy of such a frame reaches the switch (no
copy: lost; two: duplicated); the switch keeps the copies in a ``Schedule`` (a timer
heap) and forwards each when it is due, so a delayed frame never holds up another.
``Partitions`` says which frames the switch must not deliver.

Random draws come from one ``random.Random`` per port, seeded from the segment's seed
and the port's number (its order of attachment): the same seed and the same frames in
the same order give the same losses, duplicates and jitter.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import KvmConfigError

T = TypeVar("T")


def _number(where: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise KvmConfigError(f"{where}: {name}={value!r} is not a finite number")
    return float(value)


@dataclass(frozen=True)
class Impairment:
    """Delay and jitter in milliseconds, loss and duplicate as probabilities (0 to 1)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0

    @classmethod
    def checked(
        cls, where: str, delay_ms: object, jitter_ms: object, loss: object, duplicate: object
    ) -> Impairment:
        """Validated values; a bad one is a one-line ``KvmConfigError`` naming it."""
        delay, jitter = _number(where, "delay_ms", delay_ms), _number(where, "jitter_ms", jitter_ms)
        lost, dup = _number(where, "loss", loss), _number(where, "duplicate", duplicate)
        for name, value in (("delay_ms", delay), ("jitter_ms", jitter)):
            if value < 0:
                raise KvmConfigError(f"{where}: {name}={value:g} is negative")
        for name, value in (("loss", lost), ("duplicate", dup)):
            if not 0.0 <= value <= 1.0:
                raise KvmConfigError(f"{where}: {name}={value:g} is not between 0 and 1")
        return cls(delay, jitter, lost, dup)

    @property
    def is_none(self) -> bool:
        return not (self.delay_ms or self.jitter_ms or self.loss or self.duplicate)

    def plan(self, rng: random.Random, now: float) -> list[float]:
        """When each copy of a frame sent at ``now`` (seconds) reaches the switch: [] when
        it is lost, two times when it is duplicated. Jitter is uniform in
        ±``jitter_ms`` around the delay (never below 0), so frames may overtake each
        other, as with netem; each copy gets its own."""
        if self.loss and rng.random() < self.loss:
            return []
        copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
        return [now + self._delay(rng) for _ in range(copies)]

    def _delay(self, rng: random.Random) -> float:
        ms = self.delay_ms
        if self.jitter_ms:
            ms += rng.uniform(-self.jitter_ms, self.jitter_ms)
        return max(0.0, ms) / 1000.0

    def __str__(self) -> str:
        parts = [
            f"delay {self.delay_ms:g} ms" if self.delay_ms else "",
            f"jitter {self.jitter_ms:g} ms" if self.jitter_ms else "",
            f"loss {self.loss:g}" if self.loss else "",
            f"duplicate {self.duplicate:g}" if self.duplicate else "",
        ]
        return ", ".join(p for p in parts if p) or "none"


def port_rng(seed: object, port_number: int) -> random.Random:
    """The random stream of one port: the same for the same seed and port number."""
    return random.Random(f"{seed}:{port_number}")


@dataclass
class Schedule(Generic[T]):
    """A timer heap: items pushed with the time they are due, popped in that order
    (items due at the same time in the order they were pushed)."""

    _heap: list[tuple[float, int, T]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._order), item))

    def pop_due(self, now: float) -> list[T]:
        """Every item due at or before ``now``, in order."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def timeout(self, now: float) -> float | None:
        """Seconds until the next item is due (0 if one is); None when there is none."""
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)


class Partitions:
    """Pairs of port groups between which no frame is delivered, either way."""

    def __init__(self) -> None:
        self._pairs: list[tuple[frozenset[str], frozenset[str]]] = []

    def add(self, a: Iterable[str], b: Iterable[str]) -> None:
        self._pairs.append((frozenset(a), frozenset(b)))

    def blocks(self, src: str, dst: str) -> bool:
        return any((src in a and dst in b) or (src in b and dst in a) for a, b in self._pairs)

    def clear(self) -> None:
        self._pairs.clear()

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)
