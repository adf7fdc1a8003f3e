"""Serverless entry points: the app's handlers run by a cloud function, not a `Worker`.

```python
from fastapi_eventbus.serverless import lambda_sqs_handler

from myapp.main import app

handler = lambda_sqs_handler(app)  # the Lambda function's handler: myapp.lambda_main.handler
```

`lambda_sqs_handler` makes an AWS Lambda handler for an SQS event source mapping:
each record of a batch is decoded and handled like a worker's message, and the
records that failed are reported in ``batchItemFailures``.

`push_router` makes the endpoints a Pub/Sub push subscription or an Eventarc
trigger calls on Cloud Run (``app.include_router(push_router())``): each request's
message is handled like a worker's, and answered 2xx only once its handlers
succeeded. `GoogleOIDC` checks the OIDC token those requests carry.
"""

from ._lambda import SQSBatchHandler, lambda_sqs_handler
from ._oidc import GOOGLE_CERTS_URL, GoogleOIDC
from ._push import push_router

__all__ = ["GOOGLE_CERTS_URL", "GoogleOIDC", "SQSBatchHandler", "lambda_sqs_handler", "push_router"]
