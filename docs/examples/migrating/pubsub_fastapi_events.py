"""fastapi-events: GoogleCloudSimplePubSubHandler publishes every event to one topic.

Not executed by the tests of this repository: it needs google-cloud-pubsub
(``fastapi-events[google]``), which is not installed there. They only check that it parses.
"""

# --8<-- [start:app]
from fastapi import FastAPI
from fastapi_events.dispatcher import dispatch
from fastapi_events.handlers.gcp import GoogleCloudSimplePubSubHandler
from fastapi_events.middleware import EventHandlerASGIMiddleware

app = FastAPI()
app.add_middleware(
    EventHandlerASGIMiddleware,
    handlers=[
        GoogleCloudSimplePubSubHandler(
            project_id="my-shop",
            topic_id="events",
            batch_settings_kwargs={},  # required: 0.12.2 unpacks it with **, its default None fails
        )
    ],
)


@app.post("/orders", status_code=201)
async def place_order() -> dict[str, int]:
    dispatch("order.placed", payload={"order_id": 1})
    return {"id": 1}
    # --8<-- [end:app]
