"""What the providers that call a model server over HTTP share (openai.py, anthropic.py).

They talk plain HTTP through httpx and read the event stream with httpx-sse rather than through
the vendors' SDKs: an SDK retries on its own schedule (which would hide attempts from our shared
policy in retry.py), validates responses against its own models and brings pydantic along,
while the wire formats are small and stable and the servers we aim at add fields that are
easiest to handle as plain JSON.

A subclass of `HTTPProvider` says where its API is (`path`, `default_base_url`), its own headers
(`headers`), the request body (`body`) and how to read one attempt's event stream (`answer`);
the attempts are shared:

- Before the model starts answering (connection refused, a timeout before the response, 429,
  500/502/503/504, 529) the request is retried as retry.py says, honouring Retry-After; any
  other status fails at once, not retryable, with the server's own error message.
- A stream cut in the middle (a reset, `read_timeout` of silence, the stream ending before the
  model said why it stopped, an in-stream error the `Answer` raises as `StreamCut`) is retried
  FROM SCRATCH within the same attempts and deadline: the open content block is closed and a
  new `message_start` follows, which the rest of the service reads as "start over"
  (events.MessageBuilder, and Anthropic's SDKs reset their message there). Failing with the
  partial answer instead would turn every proxy hiccup during a long answer into a failed
  message; the cost of a restart is the tokens already generated, bounded by `max_attempts`.
  The abandoned attempt gets no `message_delta` or `message_stop`, so no client takes it for
  the answer.
- A malformed event, or an in-stream error that is the request's own fault, fails the message
  (`failed`) with what was produced kept, its open block closed: a server that sends garbage is
  not likely to stop on a retry.
- When every attempt is used, or the next wait would end past the deadline, the message fails
  with a retryable ProviderError that says how many attempts were made.

What an upstream says is told naming the provider and the model, never the upstream's address
(a failure is stored, streamed to clients and logged, and the base URL is the operator's: an
internal host, a port, credentials of its own), and never the key: every text that leaves here
from the upstream is scrubbed of both.

Connections: each event loop keeps its own clients per upstream (`pools_for`), made inside the
running loop on first use (django-q2 forks its workers: nothing is opened at import), so
consecutive messages reuse kept-alive connections instead of a handshake each. There is no
connection limit unless the model sets `max_connections`: the runner bounds how many messages
are in flight, and a second, hidden bound here (httpx's default is 100) would queue calls. The
connections are spread over several small pools rather than one large one: httpcore looks at
every connection of a pool whenever a request starts or ends, so one pool of hundreds costs
time quadratic in them (measured: half of a busy worker's CPU with 250 messages in flight).
`close_clients()` closes the running loop's clients.

Cancellation is asyncio's: cancelling the task that iterates a stream, or closing the stream,
raises at its current `await`, even while the upstream is silent; the `async with` around the
response then closes it and its connection, so the server stops generating. A retry's wait is
an `await` too, cut short the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import orjson
from httpx_sse import EventSource, ServerSentEvent

from messaging import metrics
from messaging.headers import header_value

from .base import ModelSpec, Provider, ProviderError
from .retry import RETRYABLE_STATUSES, Attempts, RetryPolicy, retry_after_seconds

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 60.0
# Requests one pool serves at once before the next request goes to another pool (see above);
# each pool also keeps this many idle connections for the next messages.
_POOL_SIZE = 16
# What follows a stream's end marker is normally only the end of the body, already on its way.
_END_OF_BODY_WAIT = 1.0
# Enough for any error message; a server that answers an error with megabytes gets cut short.
_MAX_ERROR_BODY = 64 * 1024
_MAX_ERROR_MESSAGE = 1000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class Answer(Protocol):
    """How one attempt reads its event stream (openai's `_Translation`, anthropic's `_Relay`)."""

    @property
    def started(self) -> bool: ...  # it has sent message_start: a failure from here on restarts the answer

    @property
    def ended(self) -> bool: ...  # the stream's own end marker has been read

    @property
    def complete(self) -> bool: ...  # the model said why it stopped: only the tail can be lost

    def begin(self) -> list[dict[str, Any]]: ...
    def feed(self, sse: ServerSentEvent, upstream: Upstream) -> list[dict[str, Any]]: ...
    def finish(self) -> list[dict[str, Any]]: ...
    def abandon(self) -> list[dict[str, Any]]: ...


class StreamCut(Exception):
    """The stream broke in a way a new attempt may fix."""

    def __init__(self, message: str, error_type: str = "api_error"):
        super().__init__(message)
        self.message = message
        self.error_type = error_type


class HTTPProvider(Provider):
    """A provider whose model streams its answer over HTTP; subclasses say how to call it."""

    path: str  # the endpoint, after the base URL
    default_base_url = ""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        # `sleep` is how a retry waits; tests record the waits instead.
        self._clock = clock
        self._sleep = sleep
        self._rand = rand

    @abstractmethod
    def headers(self, key: str | None) -> dict[str, str]:
        """The provider's own headers: its key, its API version."""

    @abstractmethod
    def body(self, request: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
        """Our request as the upstream's request body."""

    @abstractmethod
    def answer(self, request: Mapping[str, Any], spec: ModelSpec, message_id: str) -> Answer:
        """A reader for one attempt's event stream."""

    async def stream(self, request: dict, spec: ModelSpec, *, message_id: str) -> AsyncIterator[dict]:
        options = spec.options
        key = api_key(spec)
        upstream = Upstream(options.get("base_url") or self.default_base_url, self.path, key, spec)
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json", **self.headers(key)}
        if request.get("correlation_id"):
            headers["X-Correlation-ID"] = header_value(request["correlation_id"])
        body = orjson.dumps(self.body(request, spec))
        timeout = _timeout(options)
        pools = pools_for(upstream.base_url, options)
        attempts = Attempts(RetryPolicy.from_options(options), clock=self._clock, rand=self._rand)

        def said(event: str, **fields: Any) -> dict[str, Any]:
            # `extra=` for this attempt's lines: the provider and model, never the address.
            return {"event": event, "message_id": message_id, "provider": spec.provider, "model": spec.id, "upstream_attempt": attempt, **fields}

        def outcome(kind: str, error_type: str | None = None) -> dict[str, Any]:
            duration_ms = round((self._clock() - started) * 1000, 1)
            errors = {"error_type": error_type} if error_type else {}
            return said("upstream_outcome", outcome=kind, upstream_status=status, duration_ms=duration_ms, **errors)

        def failed(error: ProviderError) -> None:
            logger.warning("message %s: %s", message_id, error.message, extra=outcome("failed", error.error_type))

        while True:
            attempt = attempts.start()
            metrics.upstream_attempt(spec.provider, spec.id)
            answer: Answer | None = None
            retry_after: float | None = None
            started, status = self._clock(), None
            logger.info("message %s: calling %s, attempt %s", message_id, upstream.name, attempt, extra=said("upstream_attempt"))
            try:
                async with pools.client() as client, client.stream("POST", upstream.url, content=body, headers=headers, timeout=timeout) as response:
                    status = response.status_code
                    if response.status_code != 200:
                        retry_after = _retry_after(response)
                        raise await upstream.status_error(response, attempt)
                    content_type = response.headers.get("content-type", "").partition(";")[0].strip()
                    if content_type != "text/event-stream":
                        raise ProviderError(f"{capitalized(upstream.name)} answered with {content_type or 'no content type'} instead of an event stream.")
                    answer = self.answer(request, spec, message_id)
                    for event in answer.begin():
                        yield event
                    async with contextlib.aclosing(EventSource(response).aiter_sse()) as sse_stream:
                        async for sse in sse_stream:
                            events = answer.feed(sse, upstream)
                            if answer.ended:
                                # Before the last events: a consumer may stop at message_stop,
                                # and the connection only goes back to the pool once read to its end.
                                await _read_to_end(sse_stream)
                            for event in events:
                                yield event
                            if answer.ended:
                                break
                    for event in answer.finish():
                        yield event
                    logger.info("message %s: %s answered, attempt %s", message_id, upstream.name, attempt, extra=outcome("ok"))
                    return
            except ProviderError as error:
                metrics.upstream_error(spec.provider, spec.id, error.error_type)
                if answer is None and error.retryable:
                    # An error status: the response is closed before the wait.
                    delay = attempts.delay_before_retry(retry_after)
                    if delay is None:
                        failed(error)
                        raise
                    logger.warning("message %s: %s; trying again", message_id, error.message, extra=outcome("retry", error.error_type))
                    await self._sleep(delay)
                    continue
                # A malformed or failed stream: keep what was produced, with its blocks closed.
                if answer is not None:
                    for event in answer.abandon():
                        yield event
                failed(error)
                raise
            except StreamCut as cut:
                problem, error_type = upstream.scrub(cut.message), cut.error_type
            except httpx.TimeoutException as exc:
                problem, error_type = f"{upstream.name} did not answer within its timeout ({type(exc).__name__})", "timeout_error"
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
                metrics.upstream_error(spec.provider, spec.id, "api_error")
                # The exception's text quotes the URL.
                unusable = ProviderError(f"Cannot call {upstream.name}: its base_url cannot be used ({type(exc).__name__}).")
                failed(unusable)
                raise unusable from None
            except httpx.RequestError as exc:
                problem = f"the connection to {upstream.name} failed: {upstream.scrub(str(exc)) or type(exc).__name__}"
                error_type = "api_error"

            # A failure that another attempt may fix.
            metrics.upstream_error(spec.provider, spec.id, error_type)
            if answer is not None and answer.complete:
                # The answer was complete: only its usage or the end marker were lost.
                for event in answer.finish():
                    yield event
                logger.info("message %s: %s answered, but its end was lost; attempt %s", message_id, upstream.name, attempt, extra=outcome("ok", error_type))
                return
            if answer is not None and answer.started:
                for event in answer.abandon():
                    yield event
                problem = f"{problem}, after the model started answering"
            delay = attempts.delay_before_retry()
            if delay is None:
                plural = "attempt" if attempt == 1 else "attempts"
                exhausted = ProviderError(f"{capitalized(problem)} ({attempt} {plural}).", error_type=error_type, retryable=True)
                failed(exhausted)
                raise exhausted
            logger.warning("message %s: %s (attempt %s); trying again", message_id, problem, attempt, extra=outcome("retry", error_type))
            await self._sleep(delay)


async def _read_to_end(sse_stream: AsyncIterator[ServerSentEvent]) -> None:
    """The rest of a finished stream, so that its connection can serve the next message; a
    server that keeps the stream open loses the connection instead of holding the message."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(_END_OF_BODY_WAIT):
            async for _ in sse_stream:
                pass


# --- connections -------------------------------------------------------------------------------

class Pools:
    """The running loop's clients for one upstream: a request goes to the least busy, and a new
    client opens when every one serves _POOL_SIZE requests (unless `max_connections` caps the
    upstream: then one client, with that limit)."""

    def __init__(self, max_connections: int | None):
        self.max_connections = max_connections
        self.clients: list[httpx.AsyncClient] = []
        self.busy: list[int] = []

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        index = min(range(len(self.clients)), key=self.busy.__getitem__, default=None)
        if index is None or (self.max_connections is None and self.busy[index] >= _POOL_SIZE):
            keepalive = min(_POOL_SIZE, self.max_connections or _POOL_SIZE)
            limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=keepalive)
            self.clients.append(httpx.AsyncClient(limits=limits))
            self.busy.append(0)
            index = len(self.clients) - 1
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1


_pools: dict[tuple[asyncio.AbstractEventLoop, str, int | None], Pools] = {}
# Loops in several threads (tests, a server's) may share the table.
_pools_lock = threading.Lock()


def pools_for(base_url: str, options: Mapping[str, Any]) -> Pools:
    """The running loop's clients for the upstream at `base_url`, made on first use."""
    loop = asyncio.get_running_loop()
    max_connections = options.get("max_connections")
    key = (loop, _origin(base_url), max_connections)
    with _pools_lock:
        pools = _pools.get(key)
        if pools is None:
            # Clients of a loop that ended without close_clients() go, with their sockets.
            for stale in [entry for entry in _pools if entry[0].is_closed()]:
                del _pools[stale]
            pools = _pools[key] = Pools(max_connections)
        return pools


async def close_clients() -> None:
    """Close the running loop's clients and their connections: the runner's last step."""
    loop = asyncio.get_running_loop()
    with _pools_lock:
        mine = [_pools.pop(entry) for entry in list(_pools) if entry[0] is loop]
    for pools in mine:
        for client in pools.clients:
            await client.aclose()


def _origin(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    return f"{parts.scheme}://{parts.netloc}"


def _timeout(options: Mapping[str, Any]) -> httpx.Timeout:
    return httpx.Timeout(
        connect=float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
        read=float(options.get("read_timeout", DEFAULT_READ_TIMEOUT)),
        write=float(options.get("read_timeout", DEFAULT_READ_TIMEOUT)),
        pool=float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT)),
    )


def api_key(spec: ModelSpec) -> str | None:
    """The model's key, read from the environment variable `api_key_env` names when it is
    needed, never stored; None when the model names no variable."""
    name = spec.options.get("api_key_env")
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ProviderError(f"The environment variable {name} that should hold the API key is not set.", error_type="authentication_error")
    return key


# --- what the upstream says --------------------------------------------------------------------


class Upstream:
    """Where one model's calls go, and how what comes back is told without where or the key."""

    def __init__(self, base_url: str, path: str, key: str | None, spec: ModelSpec):
        self.base_url = base_url
        self.url = base_url.rstrip("/") + path
        self.name = f'the {spec.provider} provider for model "{spec.id}"'
        self.key = key
        self._places = _places(base_url)

    def scrub(self, text: str) -> str:
        """Upstream text without our key or the upstream's address (its own messages repeat it)."""
        if self.key:
            text = text.replace(self.key, "[redacted]")
        for place in self._places:
            text = text.replace(place, "[model server]")
        return text

    async def status_error(self, response: httpx.Response, attempt: int) -> ProviderError:
        status = response.status_code
        detail = self.scrub(await _error_message(response))
        retryable = status in RETRYABLE_STATUSES
        where = f" ({attempt} {'attempt' if attempt == 1 else 'attempts'})" if retryable else ""
        message = f"{capitalized(self.name)} answered {status}{where}: {detail}" if detail else f"{capitalized(self.name)} answered {status}{where}."
        return ProviderError(message, error_type=_ERROR_TYPES.get(status, "api_error"), retryable=retryable)


def _places(url: str) -> list[str]:
    """The ways text may name the upstream: its URL, host and port, host; longest first."""
    try:
        parts = urlsplit(url)
        places = [url.rstrip("/"), f"{parts.scheme}://{parts.netloc}", parts.netloc, parts.hostname or ""]
    except ValueError:
        places = [url]
    return sorted({place for place in places if len(place) > 3}, key=len, reverse=True)


async def _error_message(response: httpx.Response) -> str:
    raw = b""
    async for piece in response.aiter_bytes():
        raw += piece
        if len(raw) >= _MAX_ERROR_BODY:
            break
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:_MAX_ERROR_MESSAGE]
    return message_in(data)[:_MAX_ERROR_MESSAGE]


def message_in(data: Any) -> str:
    """The message of an error object, in the shapes servers send."""
    # OpenAI: {"error": {"message"}}; Anthropic: {"type": "error", "error": {"type", "message"}};
    # vLLM: {"object": "error", "message"}; some proxies: {"error": "text"} or {"detail": ...}.
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for name in ("message", "detail"):
            if data.get(name):
                return data[name] if isinstance(data[name], str) else json.dumps(data[name])
    return json.dumps(data)[:_MAX_ERROR_MESSAGE]


def _retry_after(response: httpx.Response) -> float | None:
    milliseconds = response.headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    return retry_after_seconds(response.headers.get("retry-after"))


def capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]
