"""What the tool loop adds per tool round, over calling the MCP server directly.

    python bench/bench_mcp.py                    # about 20 s
    python bench/bench_mcp.py --messages 40 --rounds 10

An MCP server written with the `mcp` package's MCPServer (one tool, `lookup`, answering at
once) runs over streamable HTTP on loopback, in a thread of this process. Two ways of calling
it, measured in turn within each round of the benchmark so the machine's noise falls on both:

1. direct: the `mcp` SDK's ClientSession, as an integrator would use it: connect, initialize,
   list the tools, then `--rounds` calls of `lookup` one after the other;
2. the loop: a message run by `messaging.toolloop.stream` with the same server in
   `mcp_servers`, whose model asks for `lookup` at every turn until MESSAGING_MAX_TOOL_ROUNDS
   (`--rounds`) pauses it. The model is a stand-in written here that answers at once (one
   `tool_use` block per turn), so what is measured is the service's own work per round: the
   model's events renumbered and recorded, the call through the outbound policy and the
   result limits, the result block, the next model request built from the conversation so far.

Figures: p50 and p99 of the setup (direct: connect + initialize + list; loop: from the message's
start to its first tool call, which includes the same plus one model turn) and of one round
(direct: one call; loop: from one tool result to the next, a model turn and a call), and the
loop's figures as ratios of direct's. Database writes are not on this path: the runner writes
events in batches beside it (bench_concurrency.py measures those).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("SECRET_KEY", "bench-mcp-" + "x" * 40)
os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="bench-mcp-"))
os.environ["MESSAGING_MCP_ALLOW_PRIVATE"] = "true"  # the server is on loopback

import django  # noqa: E402

django.setup()

import uvicorn  # noqa: E402
from django.conf import settings  # noqa: E402
from mcp import ClientSession  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402

from bench.bench_api import free_port, revision  # noqa: E402
from bench.bench_stream import percentile  # noqa: E402
from messaging import toolloop  # noqa: E402
from messaging.providers.base import ModelSpec, Provider, message_start  # noqa: E402

SPEC = ModelSpec(id="caller", provider="bench", max_tokens=1024, default_max_tokens=256)


class Caller(Provider):
    """A model that calls the first tool it is offered, at every turn, at once."""

    async def stream(self, request: dict, spec: ModelSpec, *, message_id: str) -> AsyncIterator[dict]:
        turn = len(request["messages"])
        yield message_start(message_id, spec.id, input_tokens=10)
        yield {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": f"toolu_{turn}", "name": request["tools"][0]["name"], "input": {}}}
        yield {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"key": "k"}'}}
        yield {"type": "content_block_stop", "index": 0}
        yield {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 5}}
        yield {"type": "message_stop"}


def start_server() -> tuple[str, uvicorn.Server]:
    server = MCPServer("bench")

    @server.tool()
    def lookup(key: str) -> str:
        """Look a key up."""
        return f"the value of {key} is 42"

    port = free_port()
    web = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=web.run, daemon=True).start()
    while not web.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{port}/mcp", web


async def direct(url: str, rounds: int) -> tuple[float, list[float]]:
    started = time.perf_counter()
    async with streamable_http_client(url) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await session.list_tools()
        setup = time.perf_counter() - started
        calls = []
        for _ in range(rounds):
            began = time.perf_counter()
            await session.call_tool("lookup", {"key": "k"})
            calls.append(time.perf_counter() - began)
    return setup, calls


async def loop(url: str, rounds: int) -> tuple[float, list[float]]:
    request: dict[str, Any] = {
        "model": "caller",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "look it up"}]}],
        "mcp_servers": [{"type": "url", "url": url, "name": "bench"}],
    }
    started = time.perf_counter()
    setup = 0.0
    results: list[float] = []
    stop_reason = None
    async for event in toolloop.stream(Caller(), request, SPEC, message_id="msg_bench"):
        if event["type"] == "content_block_start" and event["content_block"]["type"] == "mcp_tool_use" and not setup:
            setup = time.perf_counter() - started
        elif event["type"] == "content_block_start" and event["content_block"]["type"] == "mcp_tool_result":
            assert not event["content_block"]["is_error"], event
            results.append(time.perf_counter())
        elif event["type"] == "message_delta":
            stop_reason = event["delta"]["stop_reason"]
    assert stop_reason == "pause_turn" and len(results) == rounds, (stop_reason, len(results))
    # A round: from one result to the next (the model's turn, then the call).
    return setup, [later - earlier for earlier, later in zip(results, results[1:])]


async def main(args: argparse.Namespace) -> None:
    settings.MESSAGING_MAX_TOOL_ROUNDS = args.rounds
    url, web = start_server()
    figures: dict[str, dict[str, list[float]]] = {"direct": {"setup": [], "round": []}, "loop": {"setup": [], "round": []}}
    try:
        for _ in range(args.warmup):
            await direct(url, args.rounds)
            await loop(url, args.rounds)
        for _ in range(args.messages):
            for name, run in (("direct", direct), ("loop", loop)):
                setup, rounds = await run(url, args.rounds)
                figures[name]["setup"].append(setup)
                figures[name]["round"] += rounds
    finally:
        web.should_exit = True
    print(f"bench_mcp: {args.messages} messages of {args.rounds} rounds each, commit {revision()}, Python {sys.version.split()[0]}")
    print(f"{'':8} {'setup p50':>10} {'setup p99':>10} {'round p50':>10} {'round p99':>10}  (ms)")
    for name, values in figures.items():
        row = [percentile(values[kind], q) * 1000 for kind in ("setup", "round") for q in (0.5, 0.99)]
        print(f"{name:8} " + " ".join(f"{value:10.2f}" for value in row))
    d, lo = figures["direct"], figures["loop"]
    ratios = [percentile(lo[kind], q) / percentile(d[kind], q) for kind in ("setup", "round") for q in (0.5, 0.99)]
    print(f"{'ratio':8} " + " ".join(f"{value:10.2f}" for value in ratios) + "  (loop / direct)")
    added = [(percentile(lo["round"], q) - percentile(d["round"], q)) * 1000 for q in (0.5, 0.99)]
    print(f"the loop adds {added[0]:.2f} ms per round at p50, {added[1]:.2f} ms at p99 (median of direct's: {statistics.median(d['round']) * 1000:.2f} ms per call)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
