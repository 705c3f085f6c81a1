"""OpenTelemetry traces: one span per check, a child of the request's trace.

The parent comes from the headers Envoy forwards: W3C ``traceparent`` first, else B3
(``b3`` or ``x-b3-*``), so our span sits inside Envoy's (or the client's) trace. The
exporter is a setting: ``none`` (no tracer at all: the hot path pays nothing),
``console`` (JSON on stderr, for trying it out) or ``otlp`` (the ``otlp`` extra). A
sampling ratio applies to root spans; a sampled parent decides for its children.

Only ids and facts go on a span: tenant id, key id, decision, reason. Never the key.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

from extauthz.errors import ConfigError
from extauthz.model import CheckInput, Decision

EXPORTERS = ("none", "console", "otlp")
P = ParamSpec("P")
R = TypeVar("R")
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), B3MultiFormat()])


class _Headers(Getter[Mapping[str, Any]]):
    """The getter the propagators use: our header mapping, repeated values kept apart."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        if value is None:
            return None
        return list(value) if isinstance(value, tuple) else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier.keys())


_GETTER = _Headers()


def make_provider(exporter: str, ratio: float) -> TracerProvider | None:
    """A tracer provider for the setting, or None for ``none``."""
    if exporter == "none":
        return None
    provider = TracerProvider(
        resource=Resource.create({"service.name": "extauthz"}),
        sampler=ParentBased(TraceIdRatioBased(ratio)),
    )
    if exporter == "console":
        span_exporter: Any = ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "EXTAUTHZ_TRACE_EXPORTER=otlp needs the otlp extra: pip install 'extauthz[otlp]'"
            ) from None
        span_exporter = OTLPSpanExporter()  # endpoint from OTEL_EXPORTER_OTLP_ENDPOINT
    else:
        raise ConfigError(f"trace exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    provider.add_span_processor(BatchSpanProcessor(span_exporter, schedule_delay_millis=500))
    return provider


_TRACE_HEADERS = ("traceparent", "b3", "x-b3-traceid")


class CheckTracer:
    def __init__(self, provider: TracerProvider, ratio: float = 1.0) -> None:
        self.provider = provider
        self.ratio = ratio
        self.tracer = provider.get_tracer("extauthz")

    def parent(self, request: CheckInput) -> Context:
        return _PROPAGATOR.extract(request.headers, getter=_GETTER)

    def wants(self, request: CheckInput) -> bool:
        """False for a root span the sampler would drop anyway: then the check costs
        nothing extra (no context extraction, no span). The same ratio decision
        ParentBased(TraceIdRatioBased) makes, taken first; requests with a parent always
        go to the sampler, which follows the parent's choice."""
        if self.ratio >= 1.0:
            return True
        headers = request.headers
        if any(h in headers for h in _TRACE_HEADERS):
            return True
        return random.random() < self.ratio  # noqa: S311 - sampling

    @contextmanager
    def span(self, request: CheckInput) -> Iterator[trace.Span]:
        with self.tracer.start_as_current_span(
            "extauthz.check",
            context=self.parent(request),
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method},
        ) as span:
            yield span

    @staticmethod
    def finish(span: trace.Span, decision: Decision) -> None:
        if not span.is_recording():
            return
        principal = decision.principal
        if principal is not None:
            span.set_attribute("extauthz.tenant_id", principal.tenant_id)
            span.set_attribute("extauthz.key_id", principal.key_id)
        span.set_attribute("extauthz.decision", "allow" if decision.allowed else "deny")
        span.set_attribute("extauthz.reason", decision.reason)
        span.set_attribute("http.response.status_code", decision.status)
        if decision.status >= 500:
            span.set_status(Status(StatusCode.ERROR, decision.reason))

    def shutdown(self) -> None:
        self.provider.shutdown()


def trace_function(
    name: str | None = None, tracer: trace.Tracer | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The seed's ``@trace("name")`` decorator on OpenTelemetry's own tracer: each call
    is a span (a child of the current one); an exception is recorded and re-raised.
    The seed's manual spans need nothing of ours: ``with
    trace.get_tracer("app").start_as_current_span("op") as span: span.set_attribute(...)``.
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        span_name = name or fn.__qualname__

        @functools.wraps(fn)
        def traced(*args: P.args, **kwargs: P.kwargs) -> R:
            active = tracer or trace.get_tracer("extauthz")
            with active.start_as_current_span(span_name):
                return fn(*args, **kwargs)

        return traced

    return wrap


# `extract` is re-exported for callers that carry context another way.
__all__ = ["EXPORTERS", "CheckTracer", "extract", "make_provider", "trace_function"]
