"""Forwarders: send events to remote brokers on the same flush path as local handlers.

```python
from fastapi_eventbus.forwarders.sqs import SQSForwarder

bus.forward("order.*", SQSForwarder(queue_url))
```

`Forwarder` is the base class for your own. `SQSForwarder`, `SNSForwarder` and
`EventBridgeForwarder` (extra ``aws``) and `PubSubForwarder` (extra ``gcp``) import
their SDK only when created.
"""

from typing import TYPE_CHECKING, Any

from fastapi_eventbus._retry import Retry

from ._base import (
    DeadLetter,
    Delivery,
    DeliveryOutcome,
    EchoForwarder,
    Forwarder,
    OnDeadLetter,
)

if TYPE_CHECKING:
    from .eventbridge import EventBridgeForwarder
    from .pubsub import PubSubForwarder
    from .sns import SNSForwarder
    from .sqs import SQSForwarder

__all__ = [
    "DeadLetter",
    "Delivery",
    "DeliveryOutcome",
    "EchoForwarder",
    "EventBridgeForwarder",
    "Forwarder",
    "OnDeadLetter",
    "PubSubForwarder",
    "Retry",
    "SNSForwarder",
    "SQSForwarder",
]


def __getattr__(name: str) -> Any:
    if name == "SQSForwarder":
        from .sqs import SQSForwarder

        return SQSForwarder
    if name == "SNSForwarder":
        from .sns import SNSForwarder

        return SNSForwarder
    if name == "EventBridgeForwarder":
        from .eventbridge import EventBridgeForwarder

        return EventBridgeForwarder
    if name == "PubSubForwarder":
        from .pubsub import PubSubForwarder

        return PubSubForwarder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
