"""The tracing tests' recorder: a real SDK `TracerProvider` with the in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from opentelemetry.context import Context
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind, StatusCode


@dataclass
class Spans:
    """A provider whose finished spans can be read back (the global provider is never set)."""

    sampler: Sampler | None = None
    exporter: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    provider: TracerProvider = field(init=False)

    def __post_init__(self) -> None:
        self.provider = TracerProvider(sampler=self.sampler)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def all(self) -> list[ReadableSpan]:
        """Every finished span, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        """The finished spans called *name*."""
        return [span for span in self.all if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        """The only finished span called *name*."""
        (span,) = self.named(name)
        return span

    def by_id(self, span_id: int) -> ReadableSpan:
        """The finished span with *span_id*."""
        (span,) = [span for span in self.all if span.context is not None and sid(span) == span_id]
        return span

    def children(self, parent: ReadableSpan) -> list[ReadableSpan]:
        """The finished spans whose parent is *parent*."""
        return [span for span in self.all if span.parent and span.parent.span_id == sid(parent)]


def sid(span: ReadableSpan) -> int:
    """The span id of a finished span."""
    assert span.context is not None
    return int(span.context.span_id)


def tid(span: ReadableSpan) -> int:
    """The trace id of a finished span."""
    assert span.context is not None
    return int(span.context.trace_id)


def parent_id(span: ReadableSpan) -> int | None:
    """The span id of *span*'s parent, or None for a root span."""
    return span.parent.span_id if span.parent is not None else None


def linked_ids(span: ReadableSpan) -> list[int]:
    """The span ids *span* links to."""
    return [link.context.span_id for link in span.links]


def traceparent(span: ReadableSpan) -> str:
    """The W3C ``traceparent`` of *span*'s context."""
    assert span.context is not None
    return f"00-{tid(span):032x}-{sid(span):016x}-{span.context.trace_flags:02x}"


def is_error(span: ReadableSpan) -> bool:
    """Whether *span* has ERROR status."""
    return span.status.status_code is StatusCode.ERROR


def kinds(spans: Sequence[ReadableSpan]) -> set[SpanKind]:
    """The kinds of *spans*."""
    return {span.kind for span in spans}


@contextmanager
def instrumented(app: FastAPI, spans: Spans) -> Iterator[FastAPI]:
    """*app* traced by ``FastAPIInstrumentor`` into *spans*, uninstrumented afterwards.

    The instrumentor also patches Starlette's ``BackgroundTask`` for the whole
    process; only ``uninstrument_app`` undoes that, so later tests start clean.
    """
    FastAPIInstrumentor.instrument_app(app, tracer_provider=spans.provider)
    try:
        yield app
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


class Breaking(SpanProcessor):
    """A span processor (an exporter, a vendor's SDK) that raises for spans named *prefix*:
    the SDK calls processors without catching what they raise."""

    def __init__(self, prefix: str, at: str) -> None:
        self.prefix, self.at = prefix, at

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.at == "start" and span.name.startswith(self.prefix):
            raise RuntimeError(f"span processor broke starting {span.name!r}")

    def on_end(self, span: ReadableSpan) -> None:
        if self.at == "end" and span.name.startswith(self.prefix):
            raise RuntimeError(f"span processor broke ending {span.name!r}")
