"""Checks `amusd serve` through the official `openai` Python client and `/metrics` through the
Prometheus OpenMetrics parser. Run by tests/serve_real.rs with AMUSD_BASE_URL (the server) and
AMUSD_EXPECT (a JSON object: prompts, max_tokens, and the texts `amusd generate --strategy ar` gave).
Exits non-zero on the first failed check."""

import json
import os
import struct
import urllib.request

import openai
from prometheus_client.openmetrics.parser import text_string_to_metric_families

base = os.environ["AMUSD_BASE_URL"]
exp = json.loads(os.environ["AMUSD_EXPECT"])
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
n = exp["max_tokens"]
messages = [{"role": "user", "content": exp["chat_prompt"]}]


def check(what, got, want):
    assert got == want, f"{what}: got {got!r}, want {want!r}"
    print(f"ok: {what}")


def chat_stream(**kw):
    text, usage, finish = "", None, None
    for chunk in client.chat.completions.create(
        model="any", messages=messages, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    return text, usage, finish


whole = client.chat.completions.create(model="any", messages=messages, max_tokens=n, temperature=0)
check("chat = ar", whole.choices[0].message.content, exp["chat"])
text, usage, finish = chat_stream(max_completion_tokens=n)
check("streamed chat = ar", text, exp["chat"])
check("streamed usage = whole usage", usage.completion_tokens, whole.usage.completion_tokens)
check("streamed finish reason", finish, whole.choices[0].finish_reason)

comp = client.completions.create(model="any", prompt=exp["raw_prompt"], max_tokens=n)
check("completion = ar --raw", comp.choices[0].text, exp["raw"])
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model="any", prompt=exp["raw_prompt"], max_tokens=n, stream=True)
    if c.choices
)
check("streamed completion = ar --raw", streamed, exp["raw"])

sampled = [
    client.chat.completions.create(
        model="any", messages=messages, max_tokens=n, temperature=exp["temperature"], seed=exp["seed"]
    ).choices[0].message.content
    for _ in range(2)
]
check("seeded sample, twice", sampled[0], sampled[1])
check("seeded sample = ar's", sampled[0], exp["sampled"])

penalized = client.chat.completions.create(
    model="any", messages=messages, max_tokens=n, temperature=0,
    frequency_penalty=exp["frequency_penalty"], presence_penalty=exp["presence_penalty"],
)
check("penalized = ar's", penalized.choices[0].message.content, exp["penalized"])

biased = client.chat.completions.create(
    model="any", messages=messages, max_tokens=n, temperature=0, logit_bias=exp["logit_bias"],
)
check("biased = ar's", biased.choices[0].message.content, exp["biased"])

two = client.chat.completions.create(
    model="any", messages=messages, max_tokens=n, temperature=exp["temperature"], seed=exp["seed"], n=2
)
check("n=2: two choices", [c.index for c in two.choices], [0, 1])
check("n=2: choice 0 = ar's sample", two.choices[0].message.content, exp["sampled"])
next_seed = client.chat.completions.create(
    model="any", messages=messages, max_tokens=n, temperature=exp["temperature"], seed=exp["seed"] + 1
)
check("n=2: choice 1 = the next seed's", two.choices[1].message.content, next_seed.choices[0].message.content)

with_logprobs = client.chat.completions.create(
    model="any", messages=messages, max_tokens=n, temperature=0, logprobs=True, top_logprobs=2
)
content = with_logprobs.choices[0].logprobs.content
# Compared as the f32s they are (a JSON decimal may round-trip an f64 a last digit off).
as_f32 = lambda xs: [struct.unpack("f", struct.pack("f", x))[0] for x in xs]
check("logprobs = ar's", as_f32([t.logprob for t in content]), as_f32(exp["logprobs"]))
check("two alternatives each", {len(t.top_logprobs) for t in content}, {2})
streamed_logprobs = [
    t.logprob
    for chunk in client.chat.completions.create(
        model="any", messages=messages, max_tokens=n, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
    for t in chunk.choices[0].logprobs.content
]
check("streamed logprobs = whole", streamed_logprobs, [t.logprob for t in content])

echoed = client.completions.create(
    model="any", prompt=exp["raw_prompt"], max_tokens=n, temperature=0, echo=True, logprobs=1
)
check("echo: the prompt, then ar's answer", echoed.choices[0].text, exp["raw_prompt"] + exp["raw"])
check("echo: the first prompt token has no logprob", echoed.choices[0].logprobs.token_logprobs[0], None)

structured = client.chat.completions.create(
    model="any", messages=messages, max_tokens=exp["structured_max_tokens"], temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "country", "schema": exp["schema"]}},
)
check("response_format json_schema = ar's", structured.choices[0].message.content, exp["structured"])
check("structured output parses", sorted(json.loads(structured.choices[0].message.content)), ["capital", "country"])

# Tool calling: a required call comes back as OpenAI's tool_calls, whole and streamed alike; the
# call and its result go back in the next turn.
weather = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
tool_kw = dict(model="any", tools=weather, tool_choice="required", parallel_tool_calls=False, max_tokens=40,
               temperature=0)
called = client.chat.completions.create(messages=ask, **tool_kw).choices[0]
check("tool call: finish reason", called.finish_reason, "tool_calls")
check("tool call: no content", called.message.content, None)
call = called.message.tool_calls[0]
check("tool call: the tool", (call.type, call.function.name), ("function", "get_weather"))
check("tool call: arguments fit the schema", list(json.loads(call.function.arguments)), ["city"])
parts, finish = {}, None
for chunk in client.chat.completions.create(messages=ask, stream=True, **tool_kw):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        p = parts.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        p["id"] += d.id or ""
        p["name"] += d.function.name or ""
        p["arguments"] += d.function.arguments or ""
    if chunk.choices:
        finish = chunk.choices[0].finish_reason or finish
check("streamed tool call = whole", (parts[0]["name"], parts[0]["arguments"], finish),
      (call.function.name, call.function.arguments, "tool_calls"))
turns = ask + [
    {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
    {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
]
after = client.chat.completions.create(messages=turns, **{**tool_kw, "tool_choice": "auto"}).choices[0]
check("after a tool result: a reply", after.finish_reason in ("stop", "length", "tool_calls"), True)
try:
    client.chat.completions.create(messages=ask, response_format={"type": "json_object"}, **tool_kw)
    raise AssertionError("tools with response_format: no error")
except openai.BadRequestError as e:
    check("400 names response_format beside tools", e.body.get("param"), "response_format")

# The Responses API: chat's answers in its shapes, whole and streamed, with text.format and tools.
resp = client.responses.create(model="any", input=exp["chat_prompt"], max_output_tokens=n, temperature=0)
check("responses = ar", resp.output_text, exp["chat"])
check("responses usage = chat's", resp.usage.output_tokens, whole.usage.completion_tokens)
deltas, final, seqs = "", None, []
for ev in client.responses.create(
    model="any", input=exp["chat_prompt"], max_output_tokens=n, temperature=0, stream=True
):
    seqs.append(ev.sequence_number)
    if ev.type == "response.output_text.delta":
        deltas += ev.delta
    if ev.type in ("response.completed", "response.incomplete"):
        final = ev.response
check("streamed responses = ar", deltas, exp["chat"])
check("streamed responses: numbered events", seqs, list(range(len(seqs))))
check("streamed responses: the final response", final.output_text, exp["chat"])
shaped = client.responses.create(
    model="any", input=exp["chat_prompt"], max_output_tokens=exp["structured_max_tokens"], temperature=0,
    text={"format": {"type": "json_schema", "name": "country", "schema": exp["schema"]}},
)
check("responses text.format = ar's", shaped.output_text, exp["structured"])
flat_tools = [{"type": "function", **weather[0]["function"]}]
r_called = client.responses.create(
    model="any", input="What is the weather in Paris?", tools=flat_tools, tool_choice="required",
    parallel_tool_calls=False, max_output_tokens=40, temperature=0,
)
fc = [o for o in r_called.output if o.type == "function_call"][0]
check("responses tool call = chat's", (fc.name, fc.arguments), (call.function.name, call.function.arguments))
args_deltas, done_args = "", None
for ev in client.responses.create(
    model="any", input="What is the weather in Paris?", tools=flat_tools, tool_choice="required",
    parallel_tool_calls=False, max_output_tokens=40, temperature=0, stream=True,
):
    if ev.type == "response.function_call_arguments.delta":
        args_deltas += ev.delta
    if ev.type == "response.function_call_arguments.done":
        done_args = ev.arguments
check("responses streamed tool call = whole", (args_deltas, done_args), (fc.arguments, fc.arguments))
r_after = client.responses.create(
    model="any", tools=flat_tools, max_output_tokens=40, temperature=0,
    input=[{"role": "user", "content": "What is the weather in Paris?"},
           {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
           {"type": "function_call_output", "call_id": fc.call_id, "output": "18 C and sunny"}],
)
check("responses after a tool result: a reply", r_after.status in ("completed", "incomplete"), True)
# Kept responses: the tool's result sent alone after the call's response (the Agents SDK's way)
# is the conversation sent whole; read back, listed, deleted.
r_next = client.responses.create(
    model="any", tools=flat_tools, max_output_tokens=40, temperature=0, previous_response_id=r_called.id,
    input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "18 C and sunny"}],
)
check("continued by previous_response_id = sent whole", (r_next.output_text, r_next.usage.input_tokens),
      (r_after.output_text, r_after.usage.input_tokens))
check("retrieved = answered", client.responses.retrieve(resp.id).output_text, exp["chat"])
listed = client.responses.input_items.list(r_next.id, order="asc")
check("input items: the user's, the call, its output", [i.type for i in listed.data],
      ["message", "function_call", "function_call_output"])
client.responses.delete(resp.id)
try:
    client.responses.retrieve(resp.id)
    raise AssertionError("a deleted response: no error")
except openai.NotFoundError as e:
    check("a deleted response is a 404", e.status_code, 404)

for kw, name in [({"n": 17}, "n"), ({"top_logprobs": 3}, "top_logprobs"), ({"max_tokens": 10**9}, "max_tokens")]:
    try:
        client.chat.completions.create(model="any", messages=messages, **{"max_tokens": n, **kw})
        raise AssertionError(f"{name}: no error")
    except openai.BadRequestError as e:
        check(f"400 names {name}", e.body.get("param"), name)

models = client.models.list()
check("one model listed", len(models.data), 1)

with urllib.request.urlopen(base + "/metrics") as r:
    families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
ok = sum(
    s.value
    for s in families["amusd_http_requests"].samples
    if s.labels.get("endpoint") == "/v1/chat/completions" and s.labels.get("status") == "200"
)
assert ok >= 5, f"chat 200s counted: {ok}"
for name in [
    "amusd_prompt_tokens", "amusd_completion_tokens", "amusd_time_to_first_token_seconds",
    "amusd_time_per_output_token_seconds", "amusd_draft_tokens_proposed", "amusd_draft_tokens_accepted",
    "amusd_rollbacks", "amusd_worker_restarts", "amusd_queue_depth",
]:
    assert name in families, f"{name} missing from /metrics"
def total(name):
    return sum(s.value for s in families[name].samples if s.name == name + "_total")


# How many draft tokens get accepted depends on timing (the verify worker steps alone when the draft
# is late, as on a loaded machine), so only the counters' consistency is checked.
assert total("amusd_draft_tokens_accepted") <= total("amusd_draft_tokens_proposed")
assert total("amusd_completion_tokens") > 0, "completion tokens counted"
print("ok: /metrics parsed")
print("openai client: all checks passed")
