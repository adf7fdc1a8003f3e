"""Serverless entry points: the app's handlers run by a cloud function, not a `Worker`.

```python
from fastapi_eventbus.serverless import lambda_sqs_handler

from myapp.main import app

handler = lambda_sqs_handler(app)  # the Lambda function's handler: myapp.lambda_main.handler
```

`lambda_sqs_handler` makes an AWS Lambda handler for an SQS event source mapping:
each record of a batch is decoded and handled like a worker's message, and the
records that failed are reported in ``batchItemFailures``.
"""

from ._lambda import SQSBatchHandler, lambda_sqs_handler

__all__ = ["SQSBatchHandler", "lambda_sqs_handler"]
