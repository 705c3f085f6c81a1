"""One span per check, child of the request's trace (W3C or B3), with ids and facts."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.errors import ConfigError
from extauthz.keys import generate_key
from extauthz.model import CheckInput, TenantTier
from extauthz.telemetry.tracing import CheckTracer, make_provider
from extauthz.tenants import TenantManager
from extauthz.testing import CountingStore, ManualClock

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def traced(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> tuple[Authorizer, InMemorySpanExporter, str, str]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    authorizer = Authorizer(resolver, tracer=CheckTracer(provider))
    TenantManager(store, clock).create_tenant("t", TenantTier.FREE, tenant_id="t")
    key_id, key = APIKeyManager(store, resolver.pepper, clock).create_key("t")
    return authorizer, exporter, key_id, key


@pytest.mark.parametrize(
    "parent",
    [
        {"traceparent": f"00-{TRACE}-{PARENT}-01"},
        {"x-b3-traceid": TRACE, "x-b3-spanid": PARENT, "x-b3-sampled": "1"},
        {"b3": f"{TRACE}-{PARENT}-1"},
    ],
    ids=["w3c", "b3-multi", "b3-single"],
)
def test_the_check_span_is_a_child_of_the_requests_trace(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver, parent: dict[str, str]
) -> None:
    authorizer, exporter, key_id, key = traced(store, clock, resolver)
    authorizer.check(CheckInput("GET", "/v1", {"x-api-key": key, **parent}))
    (span,) = exporter.get_finished_spans()
    assert span.name == "extauthz.check"
    assert format(span.context.trace_id, "032x") == TRACE
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    assert span.attributes is not None
    assert span.attributes["extauthz.tenant_id"] == "t"
    assert span.attributes["extauthz.key_id"] == key_id
    assert span.attributes["extauthz.decision"] == "allow"
    assert key not in str(span.to_json())


def test_a_deny_is_recorded_and_a_root_span_starts_without_parent(
    store: CountingStore, clock: ManualClock, resolver: KeyResolver
) -> None:
    authorizer, exporter, _, _ = traced(store, clock, resolver)
    junk = generate_key()
    authorizer.check(CheckInput("GET", "/v1", {"x-api-key": junk}))
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert span.attributes is not None
    assert (span.attributes["extauthz.decision"], span.attributes["extauthz.reason"]) == (
        "deny",
        "unknown_key",
    )
    assert junk not in str(span.to_json())


def test_exporter_setting() -> None:
    """none builds no tracer at all; console builds one; otlp without the extra says how
    to get it."""
    assert make_provider("none", 1.0) is None
    provider = make_provider("console", 0.01)
    assert provider is not None
    provider.shutdown()
    try:
        import opentelemetry.exporter.otlp  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="otlp extra"):
            make_provider("otlp", 1.0)


def test_the_seed_trace_decorator_and_manual_spans_are_otel_spans() -> None:
    """`@trace_function("name")` wraps calls in spans of OTel's own tracer, nested under
    the current span, and records an exception; manual spans are plain OTel."""
    from extauthz.telemetry.tracing import trace_function

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    @trace_function("function_name", tracer=tracer)
    def my_function() -> str:
        return "result"

    @trace_function(tracer=tracer)
    def failing() -> None:
        raise ValueError("boom")

    with tracer.start_as_current_span("operation_name") as span:
        span.set_attribute("user_id", "user123")
        assert my_function() == "result"
    with pytest.raises(ValueError, match="boom"):
        failing()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["function_name"].parent is not None
    assert spans["function_name"].parent.span_id == spans["operation_name"].context.span_id
    assert spans["operation_name"].attributes == {"user_id": "user123"}
    failed = spans["test_the_seed_trace_decorator_and_manual_spans_are_otel_spans.<locals>.failing"]
    assert failed.status.status_code.name == "ERROR"
