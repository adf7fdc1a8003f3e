"""`Retry`: the backoff policy shared by forwarders and in-process handlers."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .exceptions import ConfigurationError


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failed try is tried again: exponential backoff with jitter, for a bounded time.

    Forwarders retry transient failures of a batch with it
    (``SQSForwarder(retry=...)``); in-process handlers retry any failure with it
    (``@bus.on("order.*", retry=Retry(attempts=3))``).

    By default a batch or handler call is tried again until *total_timeout*
    seconds have passed since its first try, however many tries that takes
    (about a dozen in the default 30 s): an outage shorter than *total_timeout*
    loses nothing. Pass *attempts* to stop after that many tries as well. The
    n-th wait is ``min(max_delay, initial_delay * 2**(n-1))``, jittered to
    between half and all of that, and cut short so that the last try starts
    when *total_timeout* is reached rather than never.
    """

    attempts: int | None = None
    """The most tries, the first included; None: as many as *total_timeout* allows."""
    initial_delay: float = 0.1
    """The wait after the first failed try, in seconds, before jitter."""
    max_delay: float = 5.0
    """The longest wait between two tries, in seconds, before jitter."""
    total_timeout: float = 30.0
    """Seconds from the first try after which no further try starts."""

    def __post_init__(self) -> None:
        attempts = self.attempts
        if attempts is not None and (
            isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1
        ):
            raise ConfigurationError(
                f"Retry.attempts must be an int >= 1 or None, got {attempts!r}"
            )
        for name in ("initial_delay", "max_delay", "total_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigurationError(f"Retry.{name} must be a number >= 0, got {value!r}")
        if self.initial_delay > self.max_delay:  # every wait would be the maximum
            raise ConfigurationError(
                f"Retry.initial_delay ({self.initial_delay:g}s) is over max_delay "
                f"({self.max_delay:g}s)"
            )
        if attempts is None and math.isinf(self.total_timeout):
            raise ConfigurationError(
                "Retry needs a bound: pass attempts=, or a finite total_timeout"
            )
        if (
            attempts is None
            and self.total_timeout > 0
            and min(self.initial_delay, self.max_delay) == 0
        ):
            raise ConfigurationError(
                "with attempts=None, Retry.initial_delay and max_delay must be > 0: tries "
                f"would follow each other without a pause for {self.total_timeout:g}s; "
                "pass attempts= for immediate retries"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based), jittered."""
        return jittered(exponential(attempt, self.initial_delay, self.max_delay))

    def longest(self, timeout: float) -> float:
        """The longest all the tries of one call may take, each within *timeout* seconds:
        the last starts by *total_timeout* at the latest, and no more than *attempts* are
        made, each wait at most *max_delay*."""
        longest = self.total_timeout + timeout
        if self.attempts is not None:
            longest = min(longest, self.attempts * timeout + (self.attempts - 1) * self.max_delay)
        return longest

    def next_delay(self, attempt: int, elapsed: float) -> float | None:
        """Seconds to wait before trying again, or None when no further try may start.

        *attempt* is the number of the try that just failed (1-based), *elapsed*
        the seconds since the first try started. The wait is `delay`, shortened
        to what is left of *total_timeout*, so that one last try starts then.
        """
        if self.attempts is not None and attempt >= self.attempts:
            return None
        left = self.total_timeout - elapsed
        if left <= 0:
            return None
        return min(self.delay(attempt), left)


def exponential(attempt: int, initial: float, maximum: float, multiplier: float = 2.0) -> float:
    """The wait after failed attempt number *attempt* (1-based), before jitter:
    ``min(maximum, initial * multiplier**(attempt - 1))``.

    The one exponential backoff of the package: `Retry`, the worker's `Backoff`
    and the spool's rounds use it.
    """
    exponent = min(max(attempt, 1) - 1, 64)  # 2**64 already exceeds any maximum
    return min(maximum, initial * multiplier**exponent)


def jittered(ceiling: float) -> float:
    """A wait between half and all of *ceiling*, at random: clients do not retry in step."""
    return ceiling / 2 + random.uniform(0, ceiling / 2)
