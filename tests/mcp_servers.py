"""Real MCP servers for the tests, written with the `mcp` package's own `MCPServer` and served
over HTTP by uvicorn on loopback, each in a thread of the test process (so a test reads what a
server saw directly, while the worker that calls it is another process).

`tools` (streamable HTTP): `lookup(key)` answers "the value of KEY is 42"; `context()` answers
with a digest of the `_meta.tool_context` it received; `slow()` waits; `fail()` raises; `big()` answers a
long text; one more tool has a name no model accepts. Every call is counted. `guarded` is the same server behind a bearer
token. `legacy` speaks only the older SSE transport.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from mcp.server.mcpserver import Context, MCPServer

from tests.processes import free_port, wait_until

TOKEN = "mcp-token-canary-7f3a"


@dataclass
class Seen:
    """What a server saw (calls per tool, the tool contexts and authorization headers sent),
    and how its tools behave."""

    calls: Counter[str] = field(default_factory=Counter)
    # `lookup`: words added to its answer (a long answer keeps echo-slow busy afterwards).
    lookup_padding: str = ""
    tool_contexts: list[Any] = field(default_factory=list)
    authorizations: list[str] = field(default_factory=list)
    # `slow`: how long it sleeps, and how many calls were in it at once at the most.
    slow_seconds: float = 30.0
    slow_in_flight: int = 0
    slow_peak: int = 0
    slow_cancelled: int = 0
    # `big`: how many characters it answers.
    big_size: int = 2_000_000


def context_digest(tool_context: Any) -> str:
    return hashlib.sha256(json.dumps(tool_context, sort_keys=True).encode()).hexdigest()[:16]


def tools_server(seen: Seen, name: str = "tools") -> MCPServer:
    server = MCPServer(name)

    @server.tool()
    def lookup(key: str) -> str:
        """Look a key up."""
        seen.calls["lookup"] += 1
        return f"the value of {key} is 42{seen.lookup_padding}"

    @server.tool()
    def context(ctx: Context) -> str:
        """Answer with a digest of the tool context this call carried (so the test can tell it
        arrived whole, while the context itself appears nowhere)."""
        seen.calls["context"] += 1
        meta = ctx.request_context.meta or {}
        tool_context = meta.get("tool_context")
        seen.tool_contexts.append(tool_context)
        return "tool_context digest: " + context_digest(tool_context)

    @server.tool()
    async def slow() -> str:
        """Take a while (`slow_seconds`), or until two calls have been in it at once."""
        seen.calls["slow"] += 1
        seen.slow_in_flight += 1
        seen.slow_peak = max(seen.slow_peak, seen.slow_in_flight)
        try:
            deadline = asyncio.get_running_loop().time() + seen.slow_seconds
            while asyncio.get_running_loop().time() < deadline and seen.slow_peak < 2:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            seen.slow_cancelled += 1
            raise
        finally:
            seen.slow_in_flight -= 1
        return f"slow answered with {seen.slow_peak} call(s) at once"

    @server.tool()
    def fail() -> str:
        """Always fails."""
        seen.calls["fail"] += 1
        raise RuntimeError("the fail tool failed, as it always does")

    @server.tool()
    def big() -> str:
        """Answer with `big_size` characters."""
        seen.calls["big"] += 1
        return "x" * seen.big_size

    @server.tool(name="a name no model accepts")
    def badly_named() -> str:
        """Never offered to a model: its name breaks every provider's rule."""
        seen.calls["badly_named"] += 1
        return "unreachable"

    return server


class _Guard:
    """ASGI middleware: 401 without the right bearer token; records what was sent."""

    def __init__(self, app: Any, seen: Seen):
        self.app = app
        self.seen = seen

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode()
            self.seen.authorizations.append(authorization)
            if authorization != f"Bearer {TOKEN}":
                await send({"type": "http.response.start", "status": 401, "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": b'{"error": "invalid_token"}'})
                return
        await self.app(scope, receive, send)


@dataclass
class McpServer:
    name: str
    url: str
    seen: Seen
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve(app: Any, name: str, path: str, seen: Seen) -> McpServer:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name=f"mcp-{name}", daemon=True)
    thread.start()
    wait_until(lambda: server.started, what=f"the {name} MCP server to start")
    return McpServer(name, f"http://127.0.0.1:{port}{path}", seen, server, thread)


@pytest.fixture
def mcp_tools() -> Iterator[McpServer]:
    seen = Seen()
    server = serve(tools_server(seen).streamable_http_app(), "tools", "/mcp", seen)
    yield server
    server.stop()


@pytest.fixture
def mcp_guarded() -> Iterator[McpServer]:
    seen = Seen()
    server = serve(_Guard(tools_server(seen, "guarded").streamable_http_app(), seen), "guarded", "/mcp", seen)
    yield server
    server.stop()


@pytest.fixture
def mcp_legacy() -> Iterator[McpServer]:
    seen = Seen()
    server = serve(tools_server(seen, "legacy").sse_app(), "legacy", "/sse", seen)
    yield server
    server.stop()
