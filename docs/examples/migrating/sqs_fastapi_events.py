"""fastapi-events: SQSForwardHandler sends every event to an SQS queue, with boto3.

The queue URL comes from ``EVENTS_QUEUE_URL``; boto3 reads the rest from its usual
environment (credentials, ``AWS_ENDPOINT_URL_SQS`` for LocalStack or moto).
"""

# --8<-- [start:app]
import os

from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.aws import SQSForwardHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware

app = FastAPI()
app.add_middleware(
    EventHandlerASGIMiddleware,
    handlers=[SQSForwardHandler(queue_url=os.environ["EVENTS_QUEUE_URL"], region_name="us-east-1")],
)


@app.post("/orders", status_code=201)
async def place_order() -> dict[str, int]:
    dispatch("order.placed", payload={"order_id": 1})
    return {"id": 1}
    # --8<-- [end:app]
