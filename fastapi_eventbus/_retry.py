"""`Retry`: the backoff policy shared by forwarders and in-process handlers."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .exceptions import ConfigurationError


@dataclass(frozen=True, slots=True)
class Retry:
    """How a failed try is tried again: exponential backoff with jitter.

    Forwarders retry transient failures of a batch with it
    (``SQSForwarder(retry=...)``); in-process handlers retry any failure with it
    (``@bus.on("order.*", retry=Retry(attempts=3))``). A batch or handler call is
    tried at most *attempts* times and for at most *total_timeout* seconds; the
    n-th wait is ``min(max_delay, initial_delay * 2**(n-1))``, jittered to
    between half and all of that.
    """

    attempts: int = 5
    """The most tries, the first included."""
    initial_delay: float = 0.1
    """The wait after the first failed try, in seconds, before jitter."""
    max_delay: float = 5.0
    """The longest wait between two tries, in seconds, before jitter."""
    total_timeout: float = 30.0
    """Seconds from the first try after which no further try starts."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(f"Retry.attempts must be >= 1, got {self.attempts}")
        if min(self.initial_delay, self.max_delay, self.total_timeout) < 0:
            raise ConfigurationError("Retry delays and total_timeout must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number *attempt* (1-based)."""
        ceiling = min(self.max_delay, self.initial_delay * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)
