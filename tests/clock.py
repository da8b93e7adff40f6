"""A clock tests move by hand: `clock.t += 5` is five seconds later, for code that takes `clock=`."""

from __future__ import annotations


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
