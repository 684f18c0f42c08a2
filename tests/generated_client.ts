// A TypeScript client as an integrator writes one: openapi-fetch over the types openapi-typescript
// generates from /v1/schema (`./schema.d.ts`, written beside this file by
// tests/test_generated_clients.py). `tsc --noEmit --strict` must accept it: every operation is
// called with a typed body and typed answers, and the `@ts-expect-error` lines prove the types
// are real (an `unknown` or `any` would let them compile, and tsc would then fail on them).

import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

type Schemas = components["schemas"];
type ChatRequest = Schemas["ChatRequest"];
type MessageStatus = Schemas["MessageStatusEnum"];

const client = createClient<paths>({ baseUrl: "http://127.0.0.1:8000", headers: { "x-api-key": "KEY" } });

// Every content block shape, in the union the body's `content` takes.
export const body: ChatRequest = {
    model: "echo",
    system: [{ type: "text", text: "You are terse." }],
    messages: [
        { role: "user", content: "What is the weather in Paris?" },
        {
            role: "assistant",
            content: [
                { type: "thinking", thinking: "The user wants the weather.", signature: "sig" },
                { type: "tool_use", id: "toolu_1", name: "get_weather", input: { city: "Paris" } },
            ],
        },
        {
            role: "user",
            content: [
                { type: "tool_result", tool_use_id: "toolu_1", content: [{ type: "text", text: "Sunny" }] },
                { type: "image", source: { type: "url", url: "https://example.com/paris.png" } },
            ],
        },
        {
            role: "assistant",
            content: [
                { type: "mcp_tool_use", id: "mcptoolu_1", name: "forecast", server_name: "weather", input: { days: 2 } },
                { type: "mcp_tool_result", tool_use_id: "mcptoolu_1", content: "Rain tomorrow", is_error: false },
            ],
        },
        { role: "user", content: "And tomorrow?" },
    ],
    tools: [{ name: "get_weather", input_schema: { type: "object", properties: { city: { type: "string" } } } }],
    tool_choice: { type: "auto" },
    priority: 8,
    correlation_id: "order-42",
};

export async function everyOperation(): Promise<MessageStatus[]> {
    const seen: MessageStatus[] = [];

    const models = await client.GET("/v1/models");
    const modelIds: string[] = (models.data?.data ?? []).map((model) => model.id);

    const validated = await client.POST("/v1/messages/validate", { body });
    if (validated.data) {
        const errors: string[] = validated.data.errors;
        const estimated: number = validated.data.request_summary.estimated_input_tokens;
        console.log(validated.data.valid, errors, estimated, modelIds);
    }

    const accepted = await client.POST("/v1/messages/async", { body, params: { query: { message_id: "order-42-try-1" } } });
    if (accepted.error) {
        const problems: string[] | undefined = accepted.error.error.errors;
        console.log(accepted.error.error.type, problems);
        return seen;
    }
    const messageId: string = accepted.data.message_id;
    seen.push(accepted.data.status);

    const state = await client.GET("/v1/messages/{message_id}", { params: { path: { message_id: messageId } } });
    if (state.data) {
        seen.push(state.data.status);
        const outputTokens: number | undefined = state.data.result?.usage.output_tokens;
        const errorType: string | undefined = state.data.error?.type;
        console.log(outputTokens, errorType);
    }

    const page = await client.GET("/v1/messages", { params: { query: { status: "completed", correlation_id: "order-42", limit: 10 } } });
    const listed: string[] = (page.data?.data ?? []).map((item) => item.message_id);
    console.log(listed, page.data?.has_more);

    const stream = await client.GET("/v1/messages/{message_id}/stream", {
        params: { path: { message_id: messageId }, query: { starting_after: 0 } },
        parseAs: "text",
    });
    console.log(stream.data);

    const cancelled = await client.POST("/v1/messages/{message_id}/cancel", { params: { path: { message_id: messageId } } });
    if (cancelled.data) {
        seen.push(cancelled.data.status);
    }

    // 200 is the message (JSON) or, with `stream: true`, its events: the type says both.
    const ran = await client.POST("/v1/messages", { body: { ...body, stream: false } });
    if (ran.data && typeof ran.data === "object" && "stop_reason" in ran.data) {
        const stopReason: string | null = ran.data.stop_reason;
        console.log(stopReason, ran.data.usage.input_tokens);
    }
    return seen;
}

// @ts-expect-error: no content block has the type "video"
export const unknownBlock: ChatRequest = { messages: [{ role: "user", content: [{ type: "video", url: "x" }] }] };

// @ts-expect-error: a tool_use block needs its id, name and input
export const incompleteBlock: ChatRequest = { messages: [{ role: "assistant", content: [{ type: "tool_use" }] }] };

// @ts-expect-error: messages is required
export const noMessages: ChatRequest = { model: "echo" };

// @ts-expect-error: "system" is not a role
export const systemRole: ChatRequest = { messages: [{ role: "system", content: "Hi" }] };

export async function wrongCalls(): Promise<void> {
    // @ts-expect-error: "done" is not a status
    await client.GET("/v1/messages", { params: { query: { status: "done" } } });
    // @ts-expect-error: the path needs its message_id
    await client.GET("/v1/messages/{message_id}", {});
    // @ts-expect-error: validate takes a chat request, not a list of messages
    await client.POST("/v1/messages/validate", { body: [{ role: "user", content: "Hi" }] });
}
