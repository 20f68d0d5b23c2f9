"""The wall-time budget of ``HessianMonitor``: its own time as a fraction of the training time."""

from __future__ import annotations

import time


class OverheadBudget:
    """Decide whether one more evaluation keeps the monitor within ``max_overhead`` of training time.

    Training time is the wall time since :meth:`start` minus the monitor's own time. An evaluation
    runs when the time spent so far plus the expected cost of one evaluation stays within
    ``max_overhead`` times the training time; the expected cost is the last evaluation's, or before
    the first one the estimate given to :meth:`expect`. ``max_overhead=None`` allows every evaluation.

    Example::

        budget = OverheadBudget(0.1)
        budget.start()
        budget.expect(0.3)          # e.g. from a trial product
        if budget.allows():
            ...  # evaluate
            budget.spend(seconds)
        budget.overhead()   # monitor time / training time
    """

    def __init__(self, max_overhead: float | None) -> None:
        self.max_overhead = max_overhead
        self.started: float | None = None
        self.spent = 0.0
        self.last_cost: float | None = None
        self.evaluations = 0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.spent = 0.0
        self.last_cost = None
        self.evaluations = 0

    def training_seconds(self) -> float:
        if self.started is None:
            return 0.0
        return max(time.perf_counter() - self.started - self.spent, 0.0)

    def allows(self) -> bool:
        if self.max_overhead is None or self.last_cost is None:
            return True
        return self.spent + self.last_cost <= self.max_overhead * self.training_seconds()

    def expect(self, seconds: float) -> None:
        """The estimated cost of one evaluation, until a real one has been measured."""
        if self.evaluations == 0:
            self.last_cost = seconds

    def spend(self, seconds: float, evaluation: bool = True) -> None:
        """Count ``seconds`` of monitor time; ``evaluation=True`` also makes it the expected cost."""
        self.spent += seconds
        if evaluation:
            self.last_cost = seconds
            self.evaluations += 1

    def overhead(self) -> float:
        """Monitor time as a fraction of training time so far."""
        training = self.training_seconds()
        return self.spent / training if training > 0 else 0.0
