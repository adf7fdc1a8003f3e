"""Private: the WARNING lines of a forwarder's retries, a few per outage (`RetryLog`)."""

from __future__ import annotations

import time

from fastapi_eventbus._hooks import logger


class RetryLog:
    """The WARNING lines of one forwarder's retries: a few per outage, not one per batch.

    During an outage every flush is a batch of its own that fails and is retried:
    logging each batch's attempts would print a line per retry per request. A
    line is logged only for an attempt number no batch has reached yet in the
    current run of retries (from the first failure until no batch is being
    retried any more), and it says how many events of other batches wait too.
    """

    def __init__(self) -> None:
        self.batches = 0
        """Batches being retried now (between their first failure and their end)."""
        self.waiting = 0
        """Events of batches sleeping before their next attempt."""
        self.logged = 0
        """The highest attempt number logged in the current run of retries."""
        self.failures = 0
        """Failed attempts in the current run of retries, logged or not."""
        self.since = 0.0
        """When the current run of retries began (``time.monotonic``)."""

    def begin(self) -> None:
        """A batch failed for the first time: it is being retried now."""
        if self.batches == 0:
            self.logged = self.failures = 0
            self.since = time.monotonic()
        self.batches += 1

    def failed(
        self, name: str, attempt: int, count: int, error: BaseException | None, wait: float | None
    ) -> None:
        """Attempt *attempt* failed for *count* events: log it if no batch got that far yet."""
        self.failures += 1
        if attempt <= self.logged:
            return
        self.logged = attempt
        then = "the spool sends them again later" if wait is None else f"retrying in {wait:.2f}s"
        others = f"; {self.waiting} event(s) of other batches wait too" if self.waiting else ""
        logger.warning(
            "forwarder %s: attempt %d failed for %d event(s) (%r); %s%s",
            name,
            attempt,
            count,
            error,
            then,
            others,
        )

    def end(self, name: str, *, delivered: bool) -> None:
        """A batch that was retried is done; the last one ends the run of retries."""
        self.batches -= 1
        if self.batches == 0 and delivered and self.logged:
            logger.info(
                "forwarder %s: sending again after %.1fs of failures (%d failed attempt(s))",
                name,
                time.monotonic() - self.since,
                self.failures,
            )
