"""Admission: a bound on the requests in flight (running or queued at an engine).

Past the bound a request is refused at once with 503 `overloaded` and a Retry-After, rather
than queued without limit: a client can back off or go to another replica, and the server's
memory (decoded images wait in the queue) stays bounded.
"""

from __future__ import annotations

from oculo.errors import Overloaded


class Ticket:
    """One admitted request; `release` is idempotent so every exit path may call it."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._in_flight -= 1
            self._admission = None


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self) -> Ticket:
        if self._in_flight >= self.max_in_flight:
            raise Overloaded(
                f"The server is at its limit of {self.max_in_flight} requests in flight; "
                "retry shortly.",
                retry_after=1,
            )
        self._in_flight += 1
        return Ticket(self)
