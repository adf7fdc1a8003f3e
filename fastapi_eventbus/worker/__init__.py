"""Workers: consume the events forwarders sent, and run the same handlers on them.

```python
from fastapi_eventbus.worker import SQSSource, Worker

from myapp.main import app

worker = Worker(app, SQSSource(queue_url), concurrency=10)
```

``async with worker:`` runs it in the background and stops it gracefully at the
end of the block; ``await worker.run()`` runs it until `Worker.stop` is called.

Or from the command line: ``fastapi-eventbus worker myapp.main:app --sqs QUEUE_URL``.
`SQSSource` (extra ``aws``) and `PubSubSource` (extra ``gcp``) import their SDK
only when the worker starts them.
"""

from ._delivery import OnUndecodable, OnUnhandled, WorkerStats
from ._source import Backoff, ReceivedMessage, Source
from ._worker import Worker
from .pubsub import PubSubSource
from .sqs import SQSSource

__all__ = [
    "Backoff",
    "OnUndecodable",
    "OnUnhandled",
    "PubSubSource",
    "ReceivedMessage",
    "SQSSource",
    "Source",
    "Worker",
    "WorkerStats",
]
