"""Sends one Login trace across three services with the real OpenTelemetry Python SDK.

gateway (OTLP/gRPC) -> auth (OTLP/HTTP protobuf) -> users (OTLP/gRPC). Context crosses the
"network" as W3C traceparent + baggage headers in a dict; the gateway names the business
transaction and puts it in baggage, and a BaggageSpanProcessor copies it onto downstream spans.
The users service's cache call fails. Prints {"trace_id": ...} as JSON.

Usage: three_services.py GRPC_ENDPOINT HTTP_ENDPOINT   (e.g. 127.0.0.1:4317 http://127.0.0.1:4318)
"""

import json
import sys
import time

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.processor.baggage import ALLOW_ALL_BAGGAGE_KEYS, BaggageSpanProcessor
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

grpc_endpoint, http_endpoint = sys.argv[1], sys.argv[2]
propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()]))


def provider(name, version, exporter):
    p = TracerProvider(resource=Resource.create({
        "service.name": name, "service.version": version, "service.instance.id": f"{name}-1"}))
    p.add_span_processor(BaggageSpanProcessor(ALLOW_ALL_BAGGAGE_KEYS))
    p.add_span_processor(BatchSpanProcessor(exporter))
    return p


gateway = provider("gateway", "1.0.0", GrpcExporter(endpoint=grpc_endpoint, insecure=True))
auth = provider("auth", "2.1.0", HttpExporter(endpoint=f"{http_endpoint}/v1/traces"))
users = provider("users", "0.9.0", GrpcExporter(endpoint=grpc_endpoint, insecure=True))


def users_service(headers):
    ctx = propagate.extract(headers)
    tracer = users.get_tracer("users")
    with tracer.start_as_current_span("Users/Get", context=ctx, kind=SpanKind.SERVER, attributes={
            "rpc.system": "grpc", "rpc.service": "Users", "rpc.method": "Get"}) as server:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT, attributes={
                "db.system": "redis", "db.operation.name": "GET"}) as cache:
            error = TimeoutError("cache timeout after 5 ms")
            cache.record_exception(error)
            cache.set_status(Status(StatusCode.ERROR, str(error)))
        server.set_status(Status(StatusCode.ERROR, "cache unavailable"))


def auth_service(headers):
    ctx = propagate.extract(headers)
    token = context.attach(ctx)
    try:
        tracer = auth.get_tracer("auth")
        with tracer.start_as_current_span("POST /authenticate", kind=SpanKind.SERVER, attributes={
                "http.request.method": "POST", "http.route": "/authenticate",
                "http.response.status_code": 200}):
            with tracer.start_as_current_span("SELECT users", kind=SpanKind.CLIENT, attributes={
                    "db.system": "postgresql", "db.namespace": "users",
                    "db.query.text": "SELECT id, hash FROM users WHERE login = $1"}):
                time.sleep(0.06)  # the slow stage a duration search must find
            with tracer.start_as_current_span("Users/Get", kind=SpanKind.CLIENT, attributes={
                    "rpc.system": "grpc", "rpc.service": "Users", "rpc.method": "Get",
                    "peer.service": "users"}):
                outgoing = {}
                propagate.inject(outgoing)
                users_service(outgoing)
    finally:
        context.detach(token)


tracer = gateway.get_tracer("gateway")
token = context.attach(baggage.set_baggage("bt", "Login"))
with tracer.start_as_current_span("POST /login", kind=SpanKind.SERVER, attributes={
        "http.request.method": "POST", "http.route": "/login", "sightline.bt": "Login",
        "http.response.status_code": 200}) as root:
    trace_id = format(root.get_span_context().trace_id, "032x")
    with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT, attributes={
            "http.request.method": "POST", "peer.service": "auth", "server.address": "auth.internal"}):
        outgoing = {}
        propagate.inject(outgoing)
        auth_service(outgoing)
context.detach(token)

for p in (gateway, auth, users):
    if not p.force_flush(10_000):
        sys.exit("export did not finish")
    p.shutdown()
print(json.dumps({"trace_id": trace_id}))
