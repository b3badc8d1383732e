"""The ramp's controller: the offered rate that finds and then holds the sustained maximum."""

from __future__ import annotations

from dataclasses import dataclass

RAMP_CAP = 1.5
"""The ramp never offers more than this times the rate the publishers got PUBACKed."""
RAMP_FLOOR = 2000.0
"""... nor caps the offer below this (readings/s): the start of the ramp."""


@dataclass
class Ramp:
    """Called every 0.5 s with what the pipeline did; returns the rate to offer (readings/s).

    It holds the start rate until the pipeline finishes readings at half of it (the rule
    workers take a few seconds to join their groups: read as an overload, that start sank an
    earlier version to 2.5k/s), then raises it x1.25 a step while the backlog stays under
    ~0.5 s of traffic. Past the limit (the backlog grows) it offers 0.95 x what the pipeline
    finished, and from then on holds near the limit: -5 % a step while the backlog grows, +3 %
    while it stays under ~0.25 s of traffic. Jumping between +25 % and the done rate for the
    whole phase, as before, measured the overshoots more than the pipeline.
    """

    target: float = RAMP_FLOOR
    warm: bool = False
    """The pipeline has finished readings at half the offered rate once."""
    found: bool = False
    """The ramp has gone past the pipeline's limit once."""
    last_backlog: float = 0.0

    def step(self, backlog: float, done_rate: float, acked_rate: float) -> float:
        """The next offered rate.

        Args:
            backlog: readings PUBACKed but not yet stored and evaluated.
            done_rate: readings stored and evaluated per second, over the last ~1.5 s (the
                writer stores in bursts: 0.5 s is noisy).
            acked_rate: readings PUBACKed per second over the same span.
        """
        behind = backlog >= max(0.5 * self.target, 5000)
        growing = behind and backlog > self.last_backlog
        self.last_backlog = backlog
        if not self.warm:
            self.warm = done_rate >= 0.5 * self.target
        elif not self.found and growing:
            self.found = True
            self.target = max(RAMP_FLOOR / 2, 0.95 * min(self.target, done_rate))
        elif growing:
            self.target = max(RAMP_FLOOR / 2, 0.95 * self.target)
        elif not self.found and not behind:
            self.target *= 1.25
        elif self.found and backlog < max(0.25 * self.target, 5000):
            self.target *= 1.03
        # Never offer far more than the publishers get PUBACKed: an offered rate the load
        # generator cannot reach only measures the publishers, and the next step would jump
        # from there.
        self.target = min(self.target, max(RAMP_FLOOR, RAMP_CAP * acked_rate))
        return self.target
