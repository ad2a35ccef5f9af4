//! OpenAI's Responses API (`POST /v1/responses`), what OpenAI's newer clients and agent SDKs call,
//! as vLLM and llama.cpp serve it: a request is read into chat's fields ([`to_chat`]) and runs as a
//! chat completion would, so every sampling, structured-output and tool feature behaves alike;
//! only the shapes differ ([`render`], [`stream`]). The server keeps no responses: a request
//! carries its whole conversation (`previous_response_id` is refused by name).

pub mod render;
pub mod stream;

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::request::{self, RawRequest};

/// What a response repeats of its request (OpenAI's Response object echoes these).
#[derive(Clone, Debug, PartialEq)]
pub struct Echoed(pub Map<String, Value>);

/// Fields of the request a response echoes, with their defaults.
fn echoed_defaults() -> [(&'static str, Value); 10] {
    [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(true)),
        // This server decodes greedily unless asked (OpenAI samples at 1 by default).
        ("temperature", json!(0.0)),
        ("text", json!({"format": {"type": "text"}})),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("top_logprobs", json!(0)),
        ("top_p", json!(1.0)),
    ]
}

/// Parses a Responses body into chat's fields, and what its response echoes.
pub fn parse(body: &[u8]) -> Result<(RawRequest, Echoed), ApiError> {
    let value = request::json_object(body, "{\"input\": \"...\"}")?;
    let echoed = Echoed(
        (echoed_defaults().into_iter())
            .map(|(k, default)| {
                let v = value.get(k).filter(|v| !v.is_null()).cloned();
                (k.to_string(), v.unwrap_or(default))
            })
            .collect(),
    );
    Ok((request::typed(to_chat(value)?).map_err(rename)?, echoed))
}

/// A chat error about a field the Responses request named otherwise, in the request's names.
pub fn rename(mut e: ApiError) -> ApiError {
    const NAMES: [(&str, &str); 5] = [
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format.json_schema", "text.format"),
        ("response_format", "text.format"),
        ("messages", "input"),
    ];
    if let Some((chat, ours)) = NAMES
        .iter()
        .find(|(chat, _)| e.param.as_deref().is_some_and(|p| p.starts_with(chat)))
    {
        e.param = e.param.map(|p| p.replacen(chat, ours, 1));
        e.message = e.message.replace(chat, ours);
    }
    e
}

/// A Responses request in chat's fields: `instructions` and `input` as `messages`,
/// `max_output_tokens`, `text.format`, the flat function tools and `tool_choice`, and
/// `top_logprobs`; the other fields (the sampling extensions chat takes) as they are.
fn to_chat(mut value: Value) -> Result<Value, ApiError> {
    let o = value.as_object_mut().expect("checked to be an object");
    refuse(o)?;
    let mut messages = Vec::new();
    if let Some(i) = o.remove("instructions").filter(|v| !v.is_null()) {
        let text = i
            .as_str()
            .ok_or_else(|| ApiError::bad_param("instructions", "instructions must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    messages.extend(input(o.remove("input"))?);
    // Chat's own names, if a client sent them here, would read as a second request.
    for key in [
        "messages",
        "prompt",
        "n",
        "echo",
        "best_of",
        "logprobs",
        "response_format",
    ] {
        o.remove(key);
    }
    o.insert("messages".into(), Value::Array(messages));
    if let Some(n) = o.remove("max_output_tokens") {
        o.insert("max_completion_tokens".into(), n);
    }
    if let Some(format) = o.remove("text").map(|t| t["format"].clone()) {
        o.insert("response_format".into(), response_format(format)?);
    }
    if let Some(tools) = o.remove("tools") {
        o.insert("tools".into(), chat_tools(tools)?);
    }
    if let Some(choice) = o.remove("tool_choice") {
        let choice = match choice["name"].as_str() {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => choice,
        };
        o.insert("tool_choice".into(), choice);
    }
    let wants_logprobs = (o.get("include").and_then(Value::as_array))
        .is_some_and(|i| i.iter().any(|v| v == "message.output_text.logprobs"));
    if wants_logprobs || o.get("top_logprobs").is_some_and(|k| k.as_u64() > Some(0)) {
        o.insert("logprobs".into(), json!(true));
    }
    Ok(value)
}

/// Refuses what would need state or tools the server does not have.
fn refuse(o: &Map<String, Value>) -> Result<(), ApiError> {
    let stateful =
        "the server keeps no responses or conversations: send the whole conversation in input";
    let set = |key: &str| o.get(key).is_some_and(|v| !v.is_null() && v != false);
    // A stored prompt is an object (a string `prompt` is completions' field, dropped below).
    let stored_prompt = o.get("prompt").is_some_and(Value::is_object);
    for (on, key, why) in [
        (
            set("previous_response_id"),
            "previous_response_id",
            stateful,
        ),
        (set("conversation"), "conversation", stateful),
        (
            set("background"),
            "background",
            "background responses are not implemented: omit background",
        ),
        (
            stored_prompt,
            "prompt",
            "stored prompts are not implemented: send instructions and input",
        ),
    ] {
        if on {
            return Err(ApiError::bad_param(key, format!("{key}: {why}")));
        }
    }
    Ok(())
}

/// `input` as chat messages: a string is one user message; a list holds messages (`role`,
/// `content` as a string or input/output text parts), function calls and their outputs.
fn input(v: Option<Value>) -> Result<Vec<Value>, ApiError> {
    let items =
        match v {
            Some(Value::String(s)) => return Ok(vec![json!({"role": "user", "content": s})]),
            Some(Value::Array(items)) if !items.is_empty() => items,
            _ => return Err(ApiError::bad_param(
                "input",
                "input must be a string or a non-empty list of messages and function call items",
            )),
        };
    let mut messages: Vec<Value> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let param = format!("input[{i}]");
        let kind = item["type"].as_str().unwrap_or("message");
        match kind {
            "message" => messages.push(message(&item, &param)?),
            "function_call" => {
                if !item["name"].is_string() || !item["call_id"].is_string() {
                    return Err(ApiError::bad_param(
                        &param,
                        format!("{param}: a function_call needs a call_id and a name"),
                    ));
                }
                let call = json!({"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}});
                // Calls in a row are one assistant turn, as chat has them.
                match messages.last_mut() {
                    Some(m) if m["role"] == "assistant" && m["tool_calls"].is_array() => {
                        m["tool_calls"].as_array_mut().expect("checked").push(call)
                    }
                    _ => messages.push(
                        json!({"role": "assistant", "content": null, "tool_calls": [call]}),
                    ),
                }
            }
            "function_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                messages.push(
                    json!({"role": "tool", "tool_call_id": item["call_id"], "content": output}),
                );
            }
            // Reasoning the client hands back: this server's models write none to read.
            "reasoning" => {}
            other => {
                return Err(ApiError::bad_param(
                    &format!("{param}.type"),
                    format!("{param}.type {other:?} is not supported: send messages, function_call and function_call_output items"),
                ))
            }
        }
    }
    Ok(messages)
}

/// One message item: its role and its text (the parts' joined).
fn message(item: &Value, param: &str) -> Result<Value, ApiError> {
    let text = match &item["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("input_text" | "output_text" | "text"), Some(t)) => Ok(t),
                _ => Err(ApiError::bad_param(
                    &format!("{param}.content"),
                    format!(
                        "{param}.content: only text parts (input_text, output_text) are supported"
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
            .concat(),
        _ => {
            return Err(ApiError::bad_param(
                &format!("{param}.content"),
                format!("{param}.content must be a string or a list of text parts"),
            ))
        }
    };
    let role = match item["role"].as_str() {
        Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
        _ => {
            return Err(ApiError::bad_param(
                &format!("{param}.role"),
                format!("{param}.role must be user, assistant, system or developer"),
            ))
        }
    };
    Ok(json!({"role": role, "content": text}))
}

/// `text.format` as chat's `response_format` (the schema's fields one level up in Responses).
fn response_format(format: Value) -> Result<Value, ApiError> {
    Ok(match format["type"].as_str() {
        None if format.is_null() => json!({"type": "text"}),
        Some("text" | "json_object") => format,
        Some("json_schema") => {
            let mut schema = format.clone();
            schema.as_object_mut().map(|s| s.remove("type"));
            json!({"type": "json_schema", "json_schema": schema})
        }
        _ => {
            return Err(ApiError::bad_param(
                "text.format",
                "text.format.type must be text, json_object or json_schema",
            ))
        }
    })
}

/// The flat function tools (`{"type": "function", "name", "parameters", ...}`) as chat's.
fn chat_tools(tools: Value) -> Result<Value, ApiError> {
    let Value::Array(list) = tools else {
        return Ok(tools);
    };
    (list.into_iter().enumerate())
        .map(|(i, t)| match t["type"].as_str() {
            Some("function") => {
                let mut f = t.clone();
                f.as_object_mut().map(|f| f.remove("type"));
                Ok(json!({"type": "function", "function": f}))
            }
            other => Err(ApiError::bad_param(
                &format!("tools[{i}].type"),
                format!("tools[{i}].type {other:?}: only function tools are supported (no built-in tools)"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, ApiError> {
        to_chat(body)
    }

    #[test]
    fn a_string_input_with_instructions_is_a_conversation() {
        let c = chat(
            json!({"model": "m", "instructions": "Be brief.", "input": "Hi",
            "max_output_tokens": 9, "temperature": 0.5, "top_k": 3}),
        )
        .unwrap();
        assert_eq!(
            c["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
        );
        assert_eq!(c["max_completion_tokens"], 9);
        assert_eq!(
            (c["temperature"].as_f64(), c["top_k"].as_u64()),
            (Some(0.5), Some(3))
        );
        assert!(c.get("max_output_tokens").is_none());
    }

    #[test]
    fn items_become_messages_calls_and_results() {
        let c = chat(json!({"input": [
            {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
            {"type": "message", "role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{\"city\":\"A\"}"},
            {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{\"city\":\"B\"}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "reasoning", "summary": []},
            {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        ]}))
        .unwrap();
        let m = c["messages"].as_array().unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0], json!({"role": "developer", "content": "Use tools."}));
        assert_eq!(m[2]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(
            m[2]["tool_calls"][1]["function"]["arguments"],
            "{\"city\":\"B\"}"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        );
        assert_eq!(m[4]["content"], "It is sunny.");
    }

    #[test]
    fn formats_tools_and_logprobs_take_chat_names() {
        let c = chat(json!({"input": "x",
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"}, "top_logprobs": 2}))
        .unwrap();
        assert_eq!(
            c["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}})
        );
        assert_eq!(c["tools"][0]["function"]["name"], "f");
        assert_eq!(c["tool_choice"]["function"]["name"], "f");
        assert_eq!(
            (c["logprobs"].as_bool(), c["top_logprobs"].as_u64()),
            (Some(true), Some(2))
        );
        let c = chat(json!({"input": "x", "include": ["message.output_text.logprobs"]})).unwrap();
        assert_eq!(c["logprobs"], true);
    }

    #[test]
    fn what_needs_state_or_other_tools_is_refused_by_name() {
        for (body, param) in [
            (
                json!({"input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "background": true}), "background"),
            (json!({"input": "x", "prompt": {"id": "p"}}), "prompt"),
            (json!({"input": []}), "input"),
            (json!({"input": 3}), "input"),
            (json!({"input": [{"type": "input_image"}]}), "input[0].type"),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input[0].content",
            ),
            (json!({"input": [{"content": "x"}]}), "input[0].role"),
            (
                json!({"input": [{"role": "tool", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f"}]}),
                "input[0]",
            ),
            (
                json!({"input": "x", "tools": [{"type": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "xml"}}}),
                "text.format",
            ),
        ] {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    #[test]
    fn chat_errors_are_renamed_and_the_request_echoed() {
        let e = rename(ApiError::bad_param("max_tokens", "max_tokens is 0"));
        assert_eq!(
            (e.param.as_deref(), e.message.as_str()),
            (Some("max_output_tokens"), "max_output_tokens is 0")
        );
        let e = rename(ApiError::bad_param("messages", "messages is empty"));
        assert_eq!(e.param.as_deref(), Some("input"));
        let (raw, echoed) = parse(br#"{"input": "x", "temperature": 0.25}"#).unwrap();
        assert_eq!(raw.temperature, Some(0.25));
        assert_eq!(echoed.0["temperature"], 0.25);
        assert_eq!(echoed.0["tool_choice"], "auto");
        assert_eq!(echoed.0["text"]["format"]["type"], "text");
    }
}
