"""`SQSForwarder` settings shown in docs/forwarders-sqs.md (built, never sent from)."""

from fastapi_eventbus import Event
from fastapi_eventbus.forwarders import Retry
from fastapi_eventbus.forwarders.sqs import SQSForwarder


# --8<-- [start:fifo]
def customer_of(event: Event) -> str:
    """The message group: one customer's orders keep their order; customers do not wait."""
    return str(event.payload["customer"])


fifo = SQSForwarder(
    "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
    message_group_id=customer_of,  # required for a .fifo queue
)
# --8<-- [end:fifo]

# --8<-- [start:localstack]
local = SQSForwarder(
    "http://localhost:4566/000000000000/orders",
    endpoint_url="http://localhost:4566",
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
# --8<-- [end:localstack]

# --8<-- [start:retry]
patient = SQSForwarder(
    "https://sqs.eu-west-1.amazonaws.com/123456789012/orders",
    retry=Retry(initial_delay=0.5, max_delay=10, total_timeout=120),  # tries for 2 minutes
    max_message_bytes=1_048_576,  # the queue's MaximumMessageSize is 1 MiB
    name="orders-queue",  # in log lines and DeadLetter.forwarder
)
# --8<-- [end:retry]
