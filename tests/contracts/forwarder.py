"""`ForwarderContract`: what every `Forwarder` must do, as tests to subclass per broker.

```python
class TestMyForwarder(ForwarderContract):
    @pytest.fixture
    def make_forwarder(self, queue: str) -> MakeForwarder:
        return lambda: MyForwarder(queue)

    @pytest.fixture
    def received_ids(self, queue: str) -> ReceivedIds:
        return lambda count: read_ids_from(queue, count)
```

`make_failing_forwarder` is optional: a forwarder that cannot deliver (a missing
queue), for the dead-letter test; without it that test is skipped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from fastapi_eventbus import Event, InvalidEventError
from fastapi_eventbus.forwarders import DeadLetter, Forwarder, Retry

MakeForwarder = Callable[[], Forwarder]
"""A new forwarder to this test's destination, not started."""
ReceivedIds = Callable[[int], Awaitable[list[str]]]
"""The event ids that reached this test's destination, waiting (a while) for *count*."""

QUICK = Retry(attempts=2, initial_delay=0.01, max_delay=0.02, total_timeout=5)


def orders(count: int) -> list[Event]:
    """*count* events, the first with a trace context."""
    traced = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    return [
        Event(name="order.placed", payload={"n": n}, trace_context=traced if n == 0 else {})
        for n in range(count)
    ]


@pytest.mark.anyio
class ForwarderContract:
    """The checklist of a `Forwarder`: subclass it and provide the fixtures."""

    @pytest.fixture
    def make_forwarder(self) -> MakeForwarder:
        """Forwarders to a fresh destination of this test."""
        raise NotImplementedError

    @pytest.fixture
    def received_ids(self) -> ReceivedIds:
        """What arrived at the destination of `make_forwarder`'s forwarders."""
        raise NotImplementedError

    @pytest.fixture
    def make_failing_forwarder(self) -> MakeForwarder:
        """A forwarder that fails to deliver for good (override; the default skips)."""
        pytest.skip("no failing forwarder for this implementation")

    async def test_a_batch_is_delivered_every_id_once(
        self, make_forwarder: MakeForwarder, received_ids: ReceivedIds
    ) -> None:
        events = orders(12)  # over SQS's batch of 10
        async with make_forwarder() as forwarder:
            outcome = await forwarder.deliver(events)
        assert outcome.lost == 0, outcome
        assert Counter(await received_ids(len(events))) == Counter(e.id for e in events)

    async def test_what_cannot_be_delivered_is_dead_lettered(
        self, make_failing_forwarder: MakeForwarder
    ) -> None:
        dead: list[DeadLetter] = []
        forwarder = make_failing_forwarder()
        forwarder.retry, forwarder.dead_letter = QUICK, dead.append
        events = orders(3)
        async with forwarder:
            outcome = await forwarder.deliver(events)  # never raises
        assert outcome.lost == len(events)
        assert sorted(id_ for letter in dead for id_ in letter.ids) == sorted(e.id for e in events)
        assert {letter.forwarder for letter in dead} == {forwarder.name}
        assert all(letter.reason for letter in dead)

    async def test_check_refuses_an_oversized_event_at_emit(
        self, make_forwarder: MakeForwarder
    ) -> None:
        forwarder = make_forwarder()
        event = orders(1)[0]
        size = forwarder.encoded_size(event)
        assert size > len(str(event.payload))
        forwarder.max_message_bytes = size
        forwarder.check(event)
        forwarder.max_message_bytes = size - 1
        with pytest.raises(InvalidEventError, match="limit"):
            forwarder.check(event)

    async def test_start_and_close_are_idempotent_and_it_starts_again(
        self, make_forwarder: MakeForwarder, received_ids: ReceivedIds
    ) -> None:
        forwarder = make_forwarder()
        await forwarder.ensure_started()
        await forwarder.ensure_started()
        first = orders(1)
        assert (await forwarder.deliver(first)).lost == 0
        await forwarder.aclose()
        await forwarder.aclose()
        second = orders(1)
        assert (await forwarder.deliver(second)).lost == 0  # started again
        await forwarder.aclose()
        assert sorted(await received_ids(2)) == sorted(e.id for e in first + second)

    async def test_verify_passes_for_a_working_destination(
        self, make_forwarder: MakeForwarder
    ) -> None:
        forwarder = make_forwarder()
        try:
            await forwarder.start_checked()
        finally:
            await forwarder.aclose()

    def test_it_names_itself_and_its_destination(self, make_forwarder: MakeForwarder) -> None:
        forwarder = make_forwarder()
        assert forwarder.name
        assert isinstance(forwarder.name, str)
        assert forwarder.destination
        assert isinstance(forwarder.destination, str)
        assert forwarder.name in repr(forwarder)
