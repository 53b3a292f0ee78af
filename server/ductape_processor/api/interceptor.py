"""The processor's one server interceptor: request id, authentication, tracing, RPC metrics and error mapping.

Everything a call needs around it is done in one wrapper, built once per method and cached, so the per-call cost
is a few attribute reads when telemetry is off. Health checks are public and left unwrapped.
"""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError, Message

from ductape_processor.api.auth import ApiKeyAuthenticator
from ductape_processor.api.calls import Context
from ductape_processor.api.status import error_trailers, internal_trailers
from ductape_processor.errors import InvalidArgument, ProcessorError, ResourceExhausted
from ductape_processor.reasons import Reason
from ductape_processor.telemetry.context import CallInfo, current_call, w3c_propagator
from ductape_processor.telemetry.setup import Telemetry

if TYPE_CHECKING:
    from opentelemetry import trace

log = logging.getLogger(__name__)

PUBLIC_SERVICES = ("/grpc.health.v1.Health/",)
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # gRPC's own default limit, and the server's max_message_bytes
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The interceptor wraps every method, whatever its request and response types: these stay Any.
Behavior = Callable[..., Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only


_WANTED = frozenset({"authorization", "traceparent", "tracestate", "x-request-id"})


def _metadata(context: Context) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in _WANTED and isinstance(value, str):
            found[key] = value
    return found


class RequestIds:
    """Cheap unique request ids: a random per-process prefix and a counter (no system call per call)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._next = itertools.count(1).__next__

    def new(self) -> str:
        """A fresh id."""
        return f"{self._prefix}{self._next():08x}"


class _Undecodable:
    """Stands in for a request that could not be decoded, so the call fails as INVALID_ARGUMENT, not UNKNOWN."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request cannot be decoded: {self.message} (protobuf refuses messages nested more than 100 levels;"
            " a Struct or Value costs up to three levels per JSON level)",
            reason=Reason.REQUEST_UNDECODABLE,
        )


def _lenient(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    # grpc answers UNKNOWN "Unexpected DecodeError" when the deserializer raises; the behaviour reports it instead.
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return deserialize


async def _decoded(requests: AsyncIterator[Message | _Undecodable]) -> AsyncIterator[Message]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.error()
        yield request


def _too_large(response: object, size: int, limit: int) -> ResourceExhausted:
    """A unary call's answer larger than the server may send: said as such, rather than as gRPC's own "Sent message
    larger than max" with no reason, and with the call's process id when it has one (it ran: its record says how)."""
    process_id = getattr(response, "process_id", "")
    ran = f"; the call itself ran: process id {process_id}" if isinstance(process_id, str) and process_id else ""
    return ResourceExhausted(
        f"the response is {size} bytes, more than the {limit} a response may be (the server's max_message_bytes, "
        f"PROCESSOR_MAX_MESSAGE_BYTES){ran}",
        reason=Reason.RESPONSE_TOO_LARGE,
        metadata={"size": str(size), "limit": str(limit), **({"process_id": process_id} if ran else {})},
    )


def _checked(request: object, streamed: bool) -> object:
    """The request (a stream of them when `streamed`), refusing one that could not be decoded."""
    if streamed:
        return _decoded(cast(AsyncIterator[Message | _Undecodable], request))
    if isinstance(request, _Undecodable):
        raise request.error()
    return request


class _Opened:
    """A call that `_Call.open` started: what `_Call.close` ends (the contextvar, the span and its context), and the
    call's authorization (so `open` returns one object, not a tuple)."""

    __slots__ = ("authorization", "call_token", "info", "otel_token", "span")

    def __init__(
        self,
        info: CallInfo,
        call_token: contextvars.Token[CallInfo | None],
        authorization: str | None,
        span: trace.Span | None = None,
        otel_token: object = None,
    ) -> None:
        self.info = info
        self.call_token = call_token
        self.authorization = authorization
        self.span = span
        self.otel_token = otel_token


class _Call:
    """The per-call part of the interceptor: opens the call, closes it, maps errors."""

    __slots__ = ("attributes", "authenticator", "method", "request_ids", "span_name", "telemetry")

    def __init__(
        self, method: str, authenticator: ApiKeyAuthenticator, telemetry: Telemetry, request_ids: RequestIds
    ) -> None:
        self.method = method
        self.authenticator = authenticator
        self.telemetry = telemetry
        self.request_ids = request_ids
        service, _, name = method.lstrip("/").partition("/")
        self.span_name = f"{service}/{name}"
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    def open(self, context: Context) -> _Opened:
        """Start the call: request id, contextvar, span. Returns what `close` needs, with the authorization."""
        metadata = _metadata(context)
        request_id = metadata.get("x-request-id")
        if request_id is None or not _REQUEST_ID.match(request_id):
            request_id = self.request_ids.new()
        info = CallInfo(self.method, request_id, metadata.get("traceparent"), metadata.get("tracestate"))
        opened = _Opened(info, current_call.set(info), metadata.get("authorization"))
        tracer = self.telemetry.tracer
        if tracer is not None:
            # Imported with the SDK that made the tracer (a processor that exports nothing does not load them).
            from opentelemetry import context as otel_context
            from opentelemetry import trace

            parent = w3c_propagator().extract(metadata) if "traceparent" in metadata else None
            info.traced = True
            opened.span = span = tracer.start_span(
                self.span_name, context=parent, kind=trace.SpanKind.SERVER, attributes=self.attributes
            )
            opened.otel_token = otel_context.attach(trace.set_span_in_context(span))
        return opened

    def authenticate(self, authorization: str | None) -> None:
        """Raise Unauthenticated unless the call carries an accepted API key (when keys are configured)."""
        if self.authenticator.enabled:
            self.authenticator.check(authorization)

    def close(self, opened: _Opened, code: grpc.StatusCode, started: float) -> None:
        span = opened.span
        if span is not None:
            from opentelemetry import context as otel_context
            from opentelemetry import trace

            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()
            otel_context.detach(cast(contextvars.Token[otel_context.Context], opened.otel_token))
        # A streaming handler that gRPC dropped mid-write (a Subscribe stream ended for not being read) is finalised
        # by the garbage collector in another context, where the token cannot be reset; that context dies anyway.
        # try/except rather than contextlib.suppress, which costs an object and two calls on every call.
        try:  # noqa: SIM105
            current_call.reset(opened.call_token)
        except ValueError:
            pass
        histogram = self.telemetry.rpc_duration
        if histogram is not None:
            histogram.record(
                (time.perf_counter() - started) * 1000.0,
                {**self.attributes, "rpc.grpc.status_code": code.value[0]},
            )

    async def ended(self, exc: BaseException, opened: _Opened | None, context: Context, started: float) -> None:
        """The call ended with `exc`: an error is mapped and aborts the call (abort raises); the call is closed. A
        handler's own abort, or a cancellation, is only closed (the caller raises it on)."""
        code = grpc.StatusCode.OK
        try:
            if isinstance(exc, grpc.aio.AbortError):
                code = _aborted_code(context)
            elif isinstance(exc, Exception):
                code = exc.code if isinstance(exc, ProcessorError) else grpc.StatusCode.INTERNAL
                await self.fail(exc, opened, context)
        finally:
            if opened is not None:
                self.close(opened, code, started)

    async def fail(self, exc: Exception, opened: _Opened | None, context: Context) -> NoReturn:
        """Abort the call with the mapped status (abort raises)."""
        request_id = opened.info.request_id if opened is not None else self.request_ids.new()
        if isinstance(exc, ProcessorError):
            code, message, trailers = error_trailers(exc, request_id)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", self.method, message)
        else:
            code, message, trailers = internal_trailers(request_id)
            log.error("unexpected error in %s (correlation id %s)", self.method, request_id, exc_info=exc)
        await context.abort(code, message, trailing_metadata=trailers)


class ProcessorInterceptor(grpc.GenericRpcHandler):
    """Serves the servicers' generic handlers, each non-public method's handler wrapped once and cached.

    Put on the server as its one generic handler (`handlers` holds the servicers'), not as a grpc.aio interceptor:
    with interceptors, grpc.aio runs its interceptor pipeline on every call (an iterator, a `functools.partial`
    and a coroutine per interceptor before the handler is even found), which the cached wrapper does not need.
    """

    def __init__(
        self,
        authenticator: ApiKeyAuthenticator,
        telemetry: Telemetry,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self._authenticator = authenticator
        self._telemetry = telemetry
        self._max_response_bytes = max_response_bytes
        self._request_ids = RequestIds()
        self._inner: list[grpc.GenericRpcHandler] = []
        self._handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Serve `handlers` (the generated `add_*_to_server` functions call this, as on a server)."""
        self._inner.extend(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        """The handler of the call's method, wrapped (once per method) unless the method is public."""
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = None
        for inner in self._inner:
            handler = inner.service(handler_call_details)
            if handler is not None:
                break
        if handler is None or method.startswith(PUBLIC_SERVICES):
            return handler  # an unknown method is not cached: a caller's made-up names would fill the cache
        wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        call = _Call(method, self._authenticator, self._telemetry, self._request_ids)
        deserializer = _lenient(handler.request_deserializer)
        serializer = handler.response_serializer
        # A unary answer is serialized by the wrapper, which checks its size, and handed to gRPC as bytes (no
        # serializer: gRPC sends bytes as they are).
        answer = _Answer(serializer, self._max_response_bytes)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(call, handler.unary_unary, streamed=False, answer=answer), request_deserializer=deserializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _unary(call, handler.stream_unary, streamed=True, answer=answer), request_deserializer=deserializer
            )
        # A stream's responses too, when the handler yields them (an async generator); one that writes them with
        # `context.write` keeps gRPC's serializer.
        streaming = handler.unary_stream or handler.stream_stream
        assert streaming is not None
        yields = inspect.isasyncgenfunction(streaming)
        wrapped = _streaming(call, streaming, streamed=handler.unary_stream is None, answer=answer if yields else None)
        factory = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        return factory(wrapped, request_deserializer=deserializer, response_serializer=None if yields else serializer)


def _aborted_code(context: Context) -> grpc.StatusCode:
    """The code an inner handler aborted with (for telemetry)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


class _Answer:
    """How a unary call's answer goes out: serialized (by the method's own serializer), within the size limit."""

    __slots__ = ("limit", "serializer")

    def __init__(self, serializer: Callable[[Any], bytes] | None, limit: int) -> None:
        self.serializer = serializer
        self.limit = limit


def _unary(call: _Call, inner: Behavior, *, streamed: bool, answer: _Answer | None = None) -> Behavior:
    # One coroutine a call: open and authenticate it, map what it raises, close it. Written out here rather than
    # as an async context manager, whose `__aenter__` and `__aexit__` are two more coroutines a call; the request's
    # check and the authentication written out too (two calls fewer a call).
    if streamed:
        stream_inner = inner

        def inner(requests: object, context: Context) -> Any:  # a client stream's messages checked as they are read
            return stream_inner(_checked(requests, streamed=True), context)

    authenticator = call.authenticator

    async def behavior(request: object, context: Context) -> object:
        started = time.perf_counter()
        opened: _Opened | None = None
        try:
            opened = call.open(context)
            if authenticator.enabled:
                authenticator.check(opened.authorization)
            if isinstance(request, _Undecodable):
                raise request.error()
            response = await inner(request, context)
            if answer is not None and response is not None:
                serializer = answer.serializer
                encoded = response if serializer is None else serializer(response)
                if len(encoded) > answer.limit:
                    raise _too_large(response, len(encoded), answer.limit)
                response = encoded
        except BaseException as exc:
            await call.ended(exc, opened, context, started)
            raise
        call.close(opened, grpc.StatusCode.OK, started)
        return response

    return behavior


def _streaming(call: _Call, inner: Behavior, *, streamed: bool, answer: _Answer | None = None) -> Behavior:
    if inspect.isasyncgenfunction(inner):
        serializer, limit = (answer.serializer, answer.limit) if answer is not None else (None, 0)

        async def generator(request: object, context: Context) -> AsyncIterator[object]:
            started = time.perf_counter()
            opened: _Opened | None = None
            try:
                opened = call.open(context)
                call.authenticate(opened.authorization)
                async for response in inner(_checked(request, streamed), context):
                    if answer is not None:  # each response within the limit, as a unary answer (`_unary`)
                        encoded = response if serializer is None else serializer(response)
                        if len(encoded) > limit:
                            raise _too_large(response, len(encoded), limit)
                        response = encoded
                    yield response
            except BaseException as exc:
                await call.ended(exc, opened, context, started)
                raise
            call.close(opened, grpc.StatusCode.OK, started)

        return generator
    return _unary(call, inner, streamed=streamed)
