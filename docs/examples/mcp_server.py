"""A tiny MCP server for trying tools on the server (README, "Tools on the server").

One tool, `lookup_order`, over streamable HTTP at http://127.0.0.1:9000/mcp:

    .venv/bin/python docs/examples/mcp_server.py [PORT]

It reads the order number from whatever text it is given, and greets the customer named in
the request's `tool_context`, which the service sends with every call in `_meta`.
"""

from __future__ import annotations

import re
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("orders")
ORDERS = {"42": "shipped on 3 March", "43": "waiting for stock"}


@server.tool()
def lookup_order(order: str, ctx: Context) -> str:
    """The status of an order, by its number."""
    number = re.search(r"\d+", order)
    if number is None:
        return "Which order? Give its number."
    tool_context = (ctx.request_context.meta or {}).get("tool_context") or [{}]
    customer = tool_context[0].get("customer", "customer") if isinstance(tool_context[0], dict) else "customer"
    return f"Dear {customer}, order {number.group()} is {ORDERS.get(number.group(), 'not one we know')}."


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    anyio.run(lambda: server.run_streamable_http_async(host="127.0.0.1", port=port))
