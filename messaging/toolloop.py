"""Tools that run on the server: one message, several model calls, one stream of events.

Without MCP servers a message is one model call and this module only passes its events on.
With them (messaging/mcp_client.py), the model is offered the servers' tools beside the
request's own; when it calls one, the service calls it, hands the result back and calls the
model again, until the model ends its turn, at most MESSAGING_MAX_TOOL_ROUNDS rounds (then
`stop_reason: "pause_turn"`). A call to one of the request's own `tools` still ends the message
with `stop_reason: "tool_use"`, for the client to run.

What the client sees is one message, Anthropic's MCP connector's shapes: each MCP call is an
`mcp_tool_use` block and its answer an `mcp_tool_result` block, in order with the model's own
blocks, one `message_start` and one final `message_delta` whose usage adds up every model call.

Each model call is sent the conversation so far in the providers' plain shape
(`provider_messages`): an assistant message's `mcp_tool_use` blocks become `tool_use` blocks,
and its `mcp_tool_result` blocks a user message of `tool_result` blocks, so every provider runs
the loop. A client continuing a paused message sends those blocks back the same way.

A message rescued after its worker died resumes from what its last attempt recorded: its
blocks up to the last recorded tool result are replayed (not made again), the calls of that
round that have no recorded result are made, and the model continues from there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings

from messaging.events import MessageBuilder
from messaging.mcp_client import Toolbox, enabled_servers
from messaging.providers.base import ModelSpec, Provider, ProviderError, message_start

MCP_BLOCK_TYPES = ("mcp_tool_use", "mcp_tool_result")


async def stream(provider: Provider, request: dict[str, Any], spec: ModelSpec, *, message_id: str, recorded: dict[str, Any] | None = None) -> AsyncIterator[dict[str, Any]]:
    """The message's events. `recorded`: what an earlier attempt of it recorded, if any."""
    servers = enabled_servers(request)
    if not servers:
        async with contextlib.aclosing(provider.stream(model_request(request), spec, message_id=message_id)) as events:
            async for event in events:
                yield event
        return
    async with Toolbox(servers, tool_context=request.get("tool_context"), own_tools=request.get("tools") or []) as toolbox:
        _check_named_tools(request, toolbox)
        async with contextlib.aclosing(_Loop(provider, request, spec, message_id, toolbox).run(recorded)) as events:
            async for event in events:
                yield event


def _check_named_tools(request: dict[str, Any], toolbox: Toolbox) -> None:
    """A tool named by `tool_choice` or `response_format` could only be checked at validation
    against the request's own tools; now the servers' are known too."""
    names = {tool["name"] for tool in request.get("tools") or ()} | set(toolbox.tools)
    for field in ("tool_choice", "response_format"):
        name = (request.get(field) or {}).get("name")
        if name is not None and name not in names:
            raise ProviderError(f'{field}.name "{name}" is none of the tools of the request or its MCP servers.', error_type="invalid_request_error")


def model_request(request: dict[str, Any], *, after: list[dict[str, Any]] = (), tools: list[dict[str, Any]] | None = None, tool_choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a provider is sent: the conversation (plus `after`, what this message has said so
    far) in plain blocks; never the MCP servers or the tool context."""
    sent = {key: value for key, value in request.items() if key not in ("mcp_servers", "tool_context")}
    messages = list(request["messages"])
    if after:
        messages.append({"role": "assistant", "content": list(after)})
    sent["messages"] = provider_messages(messages)
    if tools is not None:
        sent["tools"] = tools
    if tool_choice is not None:
        sent["tool_choice"] = tool_choice
    return sent


def provider_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`mcp_tool_use` as `tool_use` in the assistant's turn, `mcp_tool_result` as a user turn of
    `tool_result` blocks; messages without MCP blocks are left as they are."""
    if not any(block.get("type") in MCP_BLOCK_TYPES for message in messages for block in message["content"]):
        return messages
    plain: list[dict[str, Any]] = []
    for message in messages:
        for block in message["content"]:
            role, block = _plain(message["role"], block)
            if plain and plain[-1]["role"] == role:
                plain[-1]["content"].append(block)
            else:
                plain.append({"role": role, "content": [block]})
    return plain


def _plain(role: str, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = block.get("type")
    if kind == "mcp_tool_use":
        return "assistant", {"type": "tool_use", "id": block["id"], "name": block["name"], "input": block.get("input") or {}}
    if kind == "mcp_tool_result":
        result = {"type": "tool_result", "tool_use_id": block["tool_use_id"], "content": block.get("content") or []}
        if block.get("is_error"):
            result["is_error"] = True
        return "user", result
    return role, block


def resumable(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What of a rescued attempt's blocks stands: up to its last recorded tool result (a model
    turn after that, cut short, is made again)."""
    last = max((index for index, block in enumerate(content) if block.get("type") == "mcp_tool_result"), default=-1)
    return content[: last + 1]


def _rounds(content: list[dict[str, Any]]) -> int:
    """Model turns that ended in MCP calls: each left one run of tool results."""
    return sum(
        1
        for index, block in enumerate(content)
        if block.get("type") == "mcp_tool_result" and (index == 0 or content[index - 1].get("type") != "mcp_tool_result")
    )


def _last_round(content: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The blocks of the last model turn (and its results): after the previous run of results."""
    start = 0
    for index in range(len(content) - 1, 0, -1):
        if content[index - 1].get("type") == "mcp_tool_result" and content[index].get("type") != "mcp_tool_result":
            start = index
            break
    return content[start:]


class _Loop:
    def __init__(self, provider: Provider, request: dict[str, Any], spec: ModelSpec, message_id: str, toolbox: Toolbox):
        self.provider = provider
        self.request = request
        self.spec = spec
        self.message_id = message_id
        self.toolbox = toolbox
        self.tools = list(request.get("tools") or []) + [tool.for_model() for tool in toolbox.tools.values()]
        self.output = MessageBuilder()  # the message as the client sees it
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.started = False

    @property
    def content(self) -> list[dict[str, Any]]:
        """The blocks so far, whole (a copy: once per model turn)."""
        result = self.output.result()
        return result["content"] if result else []

    def _block_count(self) -> int:
        return len(self.output.message["content"]) if self.output.message else 0

    def emit(self, event: dict[str, Any]) -> dict[str, Any]:
        self.output.apply(event)
        return event

    async def run(self, recorded: dict[str, Any] | None) -> AsyncIterator[dict[str, Any]]:
        kept = resumable(recorded["content"]) if recorded else []
        rounds = _rounds(kept)
        if kept:
            assert recorded is not None
            for key in self.usage:
                self.usage[key] = int((recorded.get("usage") or {}).get(key) or 0)
            for event in self._replay(kept):
                yield event
            async for event in self._finish_round(_last_round(kept)):
                yield event
            stop = self._after_round(rounds)
        else:
            stop = None
        while stop is None:
            turn_start = self._block_count()
            stop_reason, stop_sequence = None, None
            choice = self._tool_choice(rounds)
            model_request_ = model_request(self.request, after=self.content, tools=self.tools, tool_choice=choice)
            # A call's usage is its start's, updated by its end's (which may repeat it, as
            # Anthropic's does, or carry it alone, as OpenAI's last chunk does).
            call_usage: dict[str, Any] = {}
            async with contextlib.aclosing(self.provider.stream(model_request_, self.spec, message_id=self.message_id)) as events:
                async for event in events:
                    kind = event["type"]
                    if kind == "message_start":
                        call_usage.update(event["message"].get("usage") or {})
                        if not self.started:
                            self.started = True
                            yield self.emit(event)
                    elif kind == "message_delta":
                        stop_reason = (event.get("delta") or {}).get("stop_reason")
                        stop_sequence = (event.get("delta") or {}).get("stop_sequence")
                        call_usage.update({key: value for key, value in (event.get("usage") or {}).items() if value is not None})
                    elif kind.startswith("content_block_"):
                        yield self.emit(self._renumbered(event, turn_start))
            self._count(call_usage)
            turn = self.content[turn_start:]
            if stop_reason != "tool_use" or not any(block["type"] == "mcp_tool_use" for block in turn):
                stop = (stop_reason, stop_sequence)
                break
            async for event in self._finish_round(turn):
                yield event
            rounds += 1
            stop = self._after_round(rounds)
        stop_reason, stop_sequence = stop
        yield self.emit({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}, "usage": dict(self.usage)})
        yield self.emit({"type": "message_stop"})

    def _tool_choice(self, rounds: int) -> dict[str, Any] | None:
        """The request's choice for the first model call; after a round, a forced choice becomes
        `auto` (or every answer would be another call: the loop would only ever pause)."""
        choice = self.request.get("tool_choice")
        if rounds and choice and choice["type"] in ("any", "tool"):
            return {key: value for key, value in choice.items() if key == "disable_parallel_tool_use"} | {"type": "auto"}
        return choice

    def _after_round(self, rounds: int) -> tuple[str, None] | None:
        """How the message ends after a round of tool calls, or None to call the model again."""
        if any(block["type"] == "tool_use" for block in _last_round(self.content)):
            return "tool_use", None  # the client runs its own tools, then sends the results back
        if rounds >= settings.MESSAGING_MAX_TOOL_ROUNDS:
            return "pause_turn", None
        return None

    def _count(self, usage: dict[str, Any] | None) -> None:
        for key, value in (usage or {}).items():
            if key in self.usage and isinstance(value, int):
                self.usage[key] += value

    def _renumbered(self, event: dict[str, Any], offset: int) -> dict[str, Any]:
        """A model call's block event as a block of the whole message: indices continue after
        the blocks before this call, and a call to an MCP tool is an `mcp_tool_use` block."""
        event = {**event, "index": event["index"] + offset}
        block = event.get("content_block")
        if event["type"] == "content_block_start" and block.get("type") == "tool_use" and block.get("name") in self.toolbox.tools:
            tool = self.toolbox.tools[block["name"]]
            event["content_block"] = {"type": "mcp_tool_use", "id": block["id"], "name": block["name"], "server_name": tool.server_name, "input": block.get("input") or {}}
        return event

    def _replay(self, blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A rescued attempt's recorded blocks, as this attempt's events: whole, not re-made."""
        events = [self.emit(message_start(self.message_id, self.spec.id, **self.usage))]
        self.started = True
        for index, block in enumerate(blocks):
            events.append(self.emit({"type": "content_block_start", "index": index, "content_block": block}))
            events.append(self.emit({"type": "content_block_stop", "index": index}))
        return events

    async def _finish_round(self, turn: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        """Call the turn's MCP tools that have no result yet, all at once; each result is a block
        as soon as it is in."""
        answered = {block["tool_use_id"] for block in turn if block["type"] == "mcp_tool_result"}
        calls = [block for block in turn if block["type"] == "mcp_tool_use" and block["id"] not in answered]
        if not calls:
            return
        tasks = {asyncio.ensure_future(self._call(block)): block for block in calls}
        try:
            for next_done in asyncio.as_completed(list(tasks)):
                block, is_error, content = await next_done
                index = self._block_count()
                result = {"type": "mcp_tool_result", "tool_use_id": block["id"], "is_error": is_error, "content": content}
                yield self.emit({"type": "content_block_start", "index": index, "content_block": result})
                yield self.emit({"type": "content_block_stop", "index": index})
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _call(self, block: dict[str, Any]) -> tuple[dict[str, Any], bool, list[dict[str, Any]]]:
        arguments = block.get("input")
        if not isinstance(arguments, dict) or "_unparsed" in arguments:
            return block, True, [{"type": "text", "text": f"The input for {block['name']} was not a JSON object."}]
        is_error, content = await self.toolbox.call(block["name"], arguments)
        return block, is_error, content
