"""``examples/tracing.py``: one request, one trace, and the tree the docs show."""

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from examples.tracing import create_app, create_native_app, span_tree, tracing_to_memory

ROOT = Path(__file__).resolve().parent.parent
HAS_NATIVE_TELEMETRY = importlib.util.find_spec("fastapi.telemetry") is not None
ORDER = {"item": "book", "price": 12.5}

# The bus's part of the tree, as `span_tree` prints it (runs of spaces squeezed).
BUS_TREE = [
    "  POST /orders SERVER UNSET",
    "    emit order.placed PRODUCER UNSET",
    "      process order.placed CONSUMER UNSET reserve_stock",
    "      process order.placed CONSUMER ERROR notify_warehouse",
    "    emit order.paid PRODUCER UNSET",
    "      process order.paid CONSUMER UNSET send_receipt",
    "        emit receipt.sent PRODUCER UNSET",
    "          process receipt.sent CONSUMER UNSET file_receipt",
]
HANDLERS = {
    "order.placed": ["reserve_stock", "notify_warehouse"],
    "order.paid": ["send_receipt"],
    "receipt.sent": ["file_receipt"],
}


def traced(create: Callable[[TracerProvider], FastAPI], requests: int = 1) -> list[ReadableSpan]:
    """Build the example's app with *create*, post *requests* orders, return the finished spans."""
    provider, exporter = tracing_to_memory()
    app = create(provider)
    try:
        with TestClient(app) as client:
            for _ in range(requests):
                assert client.post("/orders", json=ORDER).status_code == 201
    finally:
        if getattr(app, "_is_instrumented_by_opentelemetry", False):
            # The instrumentor patches Starlette's BackgroundTask for the whole process.
            FastAPIInstrumentor.uninstrument_app(app)
    return list(exporter.get_finished_spans())


@pytest.fixture
def spans() -> list[ReadableSpan]:
    return traced(create_app)


def sid(span: ReadableSpan | None) -> int:
    assert span is not None
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def tid(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    if span.parent is None:
        return None
    (parent,) = [other for other in spans if sid(other) == span.parent.span_id]
    return parent


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def handler(span: ReadableSpan) -> str:
    return str((span.attributes or {})["code.function.name"]).rsplit(".", 1)[-1]


def handler_span(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name.startswith("process ") and handler(s) == name]
    return span


def squeezed(tree: str) -> list[str]:
    """The tree's lines with runs of spaces after the indentation squeezed to one."""
    return [re.sub(r"(?<=\S) +", " ", line) for line in tree.splitlines()]


def check_handlers_hang_off_their_emits(spans: list[ReadableSpan]) -> None:
    for event, handlers in HANDLERS.items():
        (emit,) = named(spans, f"emit {event}")
        assert emit.kind is SpanKind.PRODUCER
        processes = named(spans, f"process {event}")
        assert [handler(span) for span in processes] == handlers
        for span in processes:
            assert span.kind is SpanKind.CONSUMER
            assert parent_of(span, spans) is emit
            assert [link.context.span_id for link in span.links] == [sid(emit)]


def test_the_request_is_one_trace(spans: list[ReadableSpan]) -> None:
    assert len(spans) >= len(BUS_TREE)
    assert len({tid(span) for span in spans}) == 1
    (root,) = [span for span in spans if span.parent is None]
    assert root.name == "POST /orders"
    assert root.kind is SpanKind.SERVER
    for event in ("order.placed", "order.paid"):
        (emit,) = named(spans, f"emit {event}")
        assert parent_of(emit, spans) is root


def test_handler_spans_are_children_of_their_emit_spans(spans: list[ReadableSpan]) -> None:
    check_handlers_hang_off_their_emits(spans)


def test_the_failing_handler_has_error_status(spans: list[ReadableSpan]) -> None:
    failed = handler_span(spans, "notify_warehouse")
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.status.description == "ConnectionError: warehouse unreachable"
    assert (failed.attributes or {})["error.type"] == "ConnectionError"
    others = [span for span in spans if span is not failed]
    assert all(span.status.status_code is StatusCode.UNSET for span in others)


def test_the_chained_emit_is_a_child_of_its_handler(spans: list[ReadableSpan]) -> None:
    (chained,) = named(spans, "emit receipt.sent")
    assert parent_of(chained, spans) is handler_span(spans, "send_receipt")


def test_span_tree_draws_the_trace(spans: list[ReadableSpan]) -> None:
    header, *lines = squeezed(span_tree(spans))
    assert header == f"trace {tid(spans[0]):032x}"
    # Newer FastAPIInstrumentors also trace the bus's flush: "BackgroundTask _flush".
    assert [line for line in lines if "BackgroundTask" not in line] == BUS_TREE


def test_span_tree_draws_one_tree_per_trace() -> None:
    spans = traced(create_app, requests=2)
    tree = span_tree(spans)
    headers = re.findall(r"^trace ([0-9a-f]{32})$", tree, re.M)
    assert len(headers) == 2
    assert set(headers) == {f"{tid(span):032x}" for span in spans}
    assert tree.count("POST /orders") == 2


@pytest.mark.skipif(not HAS_NATIVE_TELEMETRY, reason="this FastAPI has no built-in telemetry")
def test_with_fastapis_built_in_telemetry_handlers_still_hang_off_their_emits() -> None:
    spans = traced(create_native_app)
    assert len({tid(span) for span in spans}) == 1
    check_handlers_hang_off_their_emits(spans)
    (endpoint,) = named(spans, "fastapi.endpoint")
    assert parent_of(named(spans, "emit order.placed")[0], spans) is endpoint
    (background,) = named(spans, "fastapi.background_task")  # the bus's flush
    assert not [span for span in spans if parent_of(span, spans) is background]


def test_the_example_runs_as_a_script() -> None:
    result = subprocess.run(
        [sys.executable, "examples/tracing.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    first, header, *lines = squeezed(result.stdout)
    assert first == "POST /orders -> 201 {'id': 1}"
    assert re.fullmatch(r"trace [0-9a-f]{32}", header)
    assert [line for line in lines if "BackgroundTask" not in line] == BUS_TREE
    assert "ConnectionError: warehouse unreachable" in result.stderr  # the bus logs it too
