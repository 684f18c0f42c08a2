"""A message's MCP servers, as tools its model can call (the official `mcp` SDK).

For each server of the request not disabled by `tool_configuration.enabled: false`, a
`Toolbox` connects (streamable HTTP, else the older SSE transport), sends the server's
`authorization_token` as a bearer token, lists its tools (only `allowed_tools` when given) and
keeps the session open while the message runs, so every call of its tool loop reuses it.

The SDK is built on anyio task groups, which must be entered and left in one task: each server
gets a task of its own that connects, holds the session and closes it. The message's task
sends the calls; when it ends (finished, cancelled, timed out) the owners close their sessions.

Every connection obeys the outbound policy on the addresses it resolves to
(messaging/outbound.py), every step has MESSAGING_MCP_TIMEOUT and every response and result
MESSAGING_MCP_MAX_RESULT_BYTES. Tokens and `tool_context` never go into an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx2
from django.conf import settings

from messaging import outbound
from messaging.serializers import TOOL_NAME

if TYPE_CHECKING:
    from mcp import ClientSession

# The SDK (with pydantic models for the whole protocol) costs a process 0.35 s and 30 MB to
# import: it is imported when a message first names an MCP server, not by every web and worker
# process at start.

logger = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseException)

# Closing a session (a DELETE to the server, tasks unwinding) gets this long, then is cut.
CLOSE_SECONDS = 2.0
# Pages of tools/list followed at most, and tools kept per server: a server's listing is
# untrusted input like any other.
MAX_TOOL_PAGES = 10
MAX_TOOLS_PER_SERVER = 256
# The HTTP statuses with which a server that speaks only the older SSE transport answers a
# streamable HTTP POST (the MCP specification's backwards-compatibility rule).
_OLD_TRANSPORT_STATUSES = (400, 404, 405)


class McpError(Exception):
    """A server could not be used: unreachable, refused the token, could not list its tools,
    or offers a tool whose name another tool already has."""


@dataclass(frozen=True)
class Tool:
    name: str
    server_name: str
    description: str
    input_schema: dict[str, Any]

    def for_model(self) -> dict[str, Any]:
        """The tool as the request's own `tools` are written, for the provider."""
        tool: dict[str, Any] = {"name": self.name, "input_schema": self.input_schema}
        if self.description:
            tool["description"] = self.description
        return tool


def enabled_servers(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        server
        for server in request.get("mcp_servers") or ()
        if (server.get("tool_configuration") or {}).get("enabled", True) is not False
    ]


class Toolbox:
    """The MCP servers of one message, connected while it runs: `async with Toolbox(...)`."""

    def __init__(self, servers: list[dict[str, Any]], *, tool_context: Any = None, own_tools: list[dict[str, Any]] = ()):
        self._servers = [_Server(server) for server in servers]
        self._tool_context = tool_context
        self._own_names = {tool["name"] for tool in own_tools}
        self.tools: dict[str, Tool] = {}

    async def __aenter__(self) -> Toolbox:
        # The first import takes a third of a second: not on the event loop every message shares.
        await asyncio.to_thread(_import_sdk)
        for server in self._servers:
            server.start()
        try:
            await asyncio.gather(*(server.ready() for server in self._servers))
        except BaseException:
            await self.close()
            raise
        for server in self._servers:
            for tool in server.tools:
                if tool.name in self._own_names or tool.name in self.tools:
                    other = "the request's tools" if tool.name in self._own_names else f'MCP server "{self.tools[tool.name].server_name}"'
                    await self.close()
                    raise McpError(
                        f'MCP server "{server.name}" offers a tool named "{tool.name}", as {other} does; '
                        "tool names must be unique (use allowed_tools to pick one)"
                    )
                self.tools[tool.name] = tool
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(server.close() for server in self._servers), return_exceptions=True)

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        """Call a tool: (is_error, content blocks). A failure, a timeout or a result over the
        limit is an error result the model sees, never an exception."""
        tool = self.tools[name]
        server = next(server for server in self._servers if server.name == tool.server_name)
        timeout = settings.MESSAGING_MCP_TIMEOUT
        meta = {"tool_context": self._tool_context} if self._tool_context is not None else None
        server.too_large = False
        try:
            async with asyncio.timeout(timeout):
                result = await server.session().call_tool(name, arguments, read_timeout_seconds=timeout, meta=meta)
        except TimeoutError:
            return True, _text(f"The tool {name} did not answer within {timeout:g} seconds.")
        except Exception as exc:  # an MCP error response, a broken connection, a result too large
            if server.too_large or _found(exc, outbound.ResponseTooLarge):
                return True, _text(_too_large(name))
            return True, _text(f"The tool {name} failed: {_reason(exc)}")
        content = [_block(item) for item in result.content]
        if not content and result.structured_content is not None:
            content = _text(json.dumps(result.structured_content, ensure_ascii=False))
        if len(json.dumps(content)) > settings.MESSAGING_MCP_MAX_RESULT_BYTES:
            return True, _text(_too_large(name))
        return bool(result.is_error), content


class _Server:
    """One server's session, and the task that owns it."""

    def __init__(self, config: dict[str, Any]):
        self.name: str = config["name"]
        self._url: str = config["url"]
        self._token: str | None = config.get("authorization_token")
        allowed = (config.get("tool_configuration") or {}).get("allowed_tools")
        self._allowed: set[str] | None = set(allowed) if allowed is not None else None
        self.tools: list[Tool] = []
        self._session: ClientSession | None = None
        self._ready: asyncio.Future[None] | None = None
        self._closing = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None
        # What the SDK's errors leave out: the last refusing HTTP status, an oversized response.
        self.refused_status: int | None = None
        self.too_large = False

    def start(self) -> None:
        self._ready = asyncio.get_running_loop().create_future()
        self._owner = asyncio.create_task(self._own(), name=f"mcp:{self.name}")

    async def ready(self) -> None:
        assert self._ready is not None
        timeout = settings.MESSAGING_MCP_TIMEOUT
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise McpError(f'MCP server "{self.name}" did not answer within {timeout:g} seconds') from None

    def session(self) -> ClientSession:
        assert self._session is not None
        return self._session

    async def close(self) -> None:
        self._closing.set()
        owner = self._owner
        if owner is None or owner.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(owner), CLOSE_SECONDS)
        except TimeoutError:
            owner.cancel()
            with contextlib.suppress(BaseException):
                await owner

    async def _own(self) -> None:
        assert self._ready is not None
        try:
            try:
                await self._serve(old_transport=False)
            except BaseException as exc:
                error = _found(exc, McpError)
                if error is None or not getattr(error, "old_transport", False):
                    raise
                self.refused_status = None
                await self._serve(old_transport=True)
        except BaseException as exc:
            if not self._ready.done():
                failure = _found(exc, McpError) or McpError(f'MCP server "{self.name}" could not be used: {_reason(exc)}')
                self._ready.set_exception(failure)
                self._ready.exception()  # retrieved: a message that stopped waiting logs nothing
            if not isinstance(exc, Exception):
                raise

    async def _serve(self, *, old_transport: bool) -> None:
        from mcp import ClientSession
        from mcp.client.sse import sse_client
        from mcp.client.streamable_http import streamable_http_client

        assert self._ready is not None
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        limit = settings.MESSAGING_MCP_MAX_RESULT_BYTES
        timeout = settings.MESSAGING_MCP_TIMEOUT
        async with contextlib.AsyncExitStack() as stack:
            try:
                if old_transport:
                    # The SSE transport's one stream carries every result of the session.
                    factory = self._client_factory(limit * (settings.MESSAGING_MAX_TOOL_ROUNDS + 1) * 4)
                    read, write = await stack.enter_async_context(
                        sse_client(self._url, headers=headers, timeout=timeout, sse_read_timeout=settings.MESSAGING_JOB_TIMEOUT, httpx_client_factory=factory)
                    )
                else:
                    client = await stack.enter_async_context(self._client_factory(limit)(headers=headers))
                    # Each result's size is bounded by the client (which says so), not by the SDK.
                    read, write = await stack.enter_async_context(streamable_http_client(self._url, http_client=client, max_sse_event_size=None))
                session = await stack.enter_async_context(ClientSession(read, write, read_timeout_seconds=timeout))
                await session.initialize()
                self.tools = await self._list_tools(session)
            except Exception as exc:
                raise self._connect_error(exc, old_transport) from None
            self._session = session
            self._ready.set_result(None)
            await self._closing.wait()

    async def _list_tools(self, session: ClientSession) -> list[Tool]:
        import mcp_types

        tools: list[Tool] = []
        cursor = None
        for _ in range(MAX_TOOL_PAGES):
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            listing = await session.list_tools(params=params)
            for tool in listing.tools:
                if self._allowed is not None and tool.name not in self._allowed:
                    continue
                if not TOOL_NAME.match(tool.name):
                    # Every provider refuses such a name: offering it would fail the message.
                    logger.warning("MCP server %r offers a tool whose name no model accepts (%r); it is not offered", self.name, tool.name[:80])
                    continue
                tools.append(Tool(tool.name, self.name, tool.description or "", dict(tool.input_schema)))
            cursor = listing.next_cursor
            if not cursor or len(tools) > MAX_TOOLS_PER_SERVER:
                break
        return tools[:MAX_TOOLS_PER_SERVER]

    def _client_factory(self, limit: int) -> Any:
        def factory(headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None) -> httpx2.AsyncClient:
            return outbound.http_client(
                headers=headers,
                timeout=settings.MESSAGING_MCP_TIMEOUT,
                read_timeout=settings.MESSAGING_JOB_TIMEOUT,
                max_response_bytes=limit,
                on_response=self._saw_response,
                on_too_large=self._saw_too_large,
            )

        return factory

    async def _saw_response(self, response: httpx2.Response) -> None:
        if response.status_code >= 400:
            self.refused_status = response.status_code

    def _saw_too_large(self) -> None:
        self.too_large = True

    def _connect_error(self, exc: BaseException, old_transport: bool) -> McpError:
        status = self.refused_status
        if status in (401, 403):
            error = McpError(f'MCP server "{self.name}" refused the authorization (HTTP {status})')
        elif status is not None:
            error = McpError(f'MCP server "{self.name}" answered HTTP {status}')
        else:
            error = McpError(f'MCP server "{self.name}" could not be used: {_reason(exc)}')
        error.old_transport = not old_transport and status in _OLD_TRANSPORT_STATUSES  # type: ignore[attr-defined]
        return error


def _import_sdk() -> None:
    import mcp.client.sse
    import mcp.client.streamable_http  # noqa: F401


def _found(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` in an exception, looking into exception groups (anyio's task groups
    wrap what fails inside them)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _found(inner, kind)) is not None:
                return found
    return None


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line, for an error message (never headers: no token)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _too_large(name: str) -> str:
    return f"The result of {name} was larger than {settings.MESSAGING_MCP_MAX_RESULT_BYTES} bytes (MESSAGING_MCP_MAX_RESULT_BYTES)."


def _text(text: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}]


def _block(item: Any) -> dict[str, Any]:
    """An MCP content item as a content block of ours (text or image; the rest as text)."""
    import mcp_types

    if isinstance(item, mcp_types.TextContent):
        return {"type": "text", "text": item.text}
    if isinstance(item, mcp_types.ImageContent):
        return {"type": "image", "source": {"type": "base64", "media_type": item.mime_type, "data": item.data}}
    if isinstance(item, mcp_types.EmbeddedResource):
        resource = item.resource
        if isinstance(resource, mcp_types.TextResourceContents):
            return {"type": "text", "text": resource.text}
        return {"type": "text", "text": f"[binary resource {resource.uri}, {resource.mime_type or 'unknown type'}]"}
    if isinstance(item, mcp_types.ResourceLink):
        return {"type": "text", "text": f"[resource {item.name}: {item.uri}]"}
    if isinstance(item, mcp_types.AudioContent):
        return {"type": "text", "text": f"[audio, {item.mime_type}, not shown to the model]"}
    return {"type": "text", "text": f"[{getattr(item, 'type', 'unknown')} content]"}
