"""Workers: consume the events forwarders sent, and run the same handlers on them.

```python
from fastapi_eventbus.worker import SQSSource, Worker

from myapp.main import app

async def main() -> None:
    async with Worker(app, SQSSource(queue_url), concurrency=10):
        ...  # runs in the background; stops gracefully at the end of the block
```

Or from the command line: ``fastapi-eventbus worker myapp.main:app --sqs QUEUE_URL``.
`SQSSource` (extra ``aws``) and `PubSubSource` (extra ``gcp``) import their SDK
only when the worker starts them.
"""

from ._source import Backoff, ReceivedMessage, Source
from ._worker import OnUndecodable, Worker, WorkerStats
from .pubsub import PubSubSource
from .sqs import SQSSource

__all__ = [
    "Backoff",
    "OnUndecodable",
    "PubSubSource",
    "ReceivedMessage",
    "SQSSource",
    "Source",
    "Worker",
    "WorkerStats",
]
