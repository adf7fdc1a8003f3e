"""What happens when an endpoint or a handler fails."""

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from fastapi_eventbus import DiscardedEvents, Event, EventBus, HandlerFailure, get_bus

FAILURES: list[HandlerFailure] = []  # stands in for an error tracker
DISCARDED: list[DiscardedEvents] = []  # stands in for a metrics counter
LEDGER: list[int] = []  # amounts booked by update_ledger
INVOICES: list[int] = []  # amounts invoiced by mail_invoice
ROLLED_BACK: list[int] = []  # refunds whose session was rolled back


# --8<-- [start:hooks]
def report_failure(failure: HandlerFailure) -> None:
    FAILURES.append(failure)  # e.g. send failure.exception to your error tracker


async def report_discard(discarded: DiscardedEvents) -> None:
    DISCARDED.append(discarded)  # sync or async, like on_error


bus = EventBus(on_error=report_failure, on_discard=report_discard)
app = FastAPI()
bus.install(app)
# --8<-- [end:hooks]

Bus = Annotated[EventBus, Depends(get_bus)]


# --8<-- [start:endpoint]
class Payment(BaseModel):
    amount: int
    card: str


@app.post("/payments")
async def receive_payment(payment: Payment, bus: Bus) -> dict[str, bool]:
    bus.emit("payment.received", payment.model_dump())
    if payment.card == "declined":
        raise HTTPException(402, "card declined")  # payment.received is discarded
    return {"ok": True}
    # --8<-- [end:endpoint]


# --8<-- [start:handlers]
@bus.on("payment.received")
async def issue_invoice(event: Event, bus: Bus) -> None:
    bus.emit("invoice.issued", {"amount": event.payload["amount"]})
    if event.payload["amount"] > 1000:
        raise ValueError("invoices over 1000 need an approval")  # invoice.issued is discarded


@bus.on("payment.received")
async def update_ledger(event: Event) -> None:
    LEDGER.append(event.payload["amount"])  # runs whether issue_invoice failed or not


@bus.on("invoice.issued")
async def mail_invoice(event: Event) -> None:
    INVOICES.append(event.payload["amount"])
    # --8<-- [end:handlers]


# --8<-- [start:loop]
@bus.on("cat.meow")
async def meow_back(event: Event, bus: Bus) -> None:
    bus.emit("cat.meow")  # a loop: max_chain_depth stops it with EventChainError


@app.post("/meow")
async def meow(bus: Bus) -> None:
    bus.emit("cat.meow")
    # --8<-- [end:loop]


# --8<-- [start:swallowed]
class Session:
    """Stands in for a database session."""

    def __init__(self) -> None:
        self.rows: list[int] = []


def get_session() -> Iterator[Session]:
    session = Session()
    try:
        yield session
    except ValueError:
        ROLLED_BACK.extend(session.rows)  # rolled back, and not raised again


@bus.on("refund.requested")
async def refund(event: Event, session: Annotated[Session, Depends(get_session)]) -> None:
    session.rows.append(event.payload["amount"])
    if event.payload["amount"] > 100:
        raise ValueError("refunds over 100 need an approval")  # still a failure
    # --8<-- [end:swallowed]


# --8<-- [start:silence]
def silence_unmatched_warnings() -> None:
    """For a bus that emits events no handler or forwarder in this process takes, on purpose."""
    logging.getLogger("fastapi_eventbus.unmatched").setLevel(logging.ERROR)
    # --8<-- [end:silence]
