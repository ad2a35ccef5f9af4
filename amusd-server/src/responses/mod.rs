//! OpenAI's Responses API (`POST /v1/responses`), what OpenAI's newer clients and agent SDKs call,
//! as vLLM and llama.cpp serve it: a request is read into chat's fields (`to_chat`) and runs as a
//! chat completion would, so every sampling, structured-output and tool feature behaves alike;
//! only the shapes differ ([`render`], [`stream`]). Responses are kept unless a request says
//! `store: false` ([`store`]), so a request can continue one by its `previous_response_id`.

pub mod render;
pub mod retrieve;
pub mod store;
pub mod stream;

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::request::{self, RawRequest};

/// What a response repeats of its request (OpenAI's Response object echoes these).
#[derive(Clone, Debug, PartialEq)]
pub struct Echoed(pub Map<String, Value>);

/// Fields of the request a response echoes, with their defaults.
fn echoed_defaults() -> [(&'static str, Value); 11] {
    [
        ("instructions", Value::Null),
        ("max_output_tokens", Value::Null),
        ("metadata", json!({})),
        ("parallel_tool_calls", json!(true)),
        ("previous_response_id", Value::Null),
        // This server decodes greedily unless asked (OpenAI samples at 1 by default).
        ("temperature", json!(0.0)),
        ("text", json!({"format": {"type": "text"}})),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("top_logprobs", json!(0)),
        ("top_p", json!(1.0)),
    ]
}

/// A Responses request read.
#[derive(Debug)]
pub struct Parsed {
    /// In chat's fields.
    pub raw: RawRequest,
    /// What its response repeats of it.
    pub echoed: Echoed,
    /// Its conversation as input items (a continued response's first), to keep with its
    /// response; None when it is not to be kept (`store: false`, or a server that keeps none).
    pub keep: Option<Vec<Value>>,
}

/// Parses a Responses body into chat's fields, the response it continues read from `store`.
pub fn parse(body: &[u8], store: &store::Store) -> Result<Parsed, ApiError> {
    let mut value = request::json_object(body, "{\"input\": \"...\"}")?;
    let mut echoed = Echoed(
        (echoed_defaults().into_iter())
            .map(|(k, default)| {
                let v = value.get(k).filter(|v| !v.is_null()).cloned();
                (k.to_string(), v.unwrap_or(default))
            })
            .collect(),
    );
    let o = value.as_object_mut().expect("checked to be an object");
    let earlier = previous(o.remove("previous_response_id"), store)?;
    let keep = match o.remove("store") {
        None | Some(Value::Null | Value::Bool(true)) => store.enabled(),
        Some(Value::Bool(false)) => false,
        Some(_) => return Err(ApiError::bad_param("store", "store must be a boolean")),
    };
    echoed.0.insert("store".into(), keep.into());
    let (chat, items) = to_chat(value, earlier)?;
    Ok(Parsed {
        raw: request::typed(chat).map_err(rename)?,
        echoed,
        keep: keep.then_some(items),
    })
}

/// The conversation of the response a request continues (none without `previous_response_id`).
fn previous(id: Option<Value>, store: &store::Store) -> Result<Vec<Value>, ApiError> {
    let id = match id {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(ApiError::bad_param(
                "previous_response_id",
                "previous_response_id must be a response's id",
            ))
        }
    };
    if !store.enabled() {
        return Err(ApiError::bad_param(
            "previous_response_id",
            "previous_response_id: this server keeps no responses (--max-stored-responses 0): send the whole conversation in input",
        ));
    }
    match store.get(&id) {
        Some(stored) => Ok(stored.conversation()),
        None => Err(ApiError {
            param: Some("previous_response_id".into()),
            ..not_found(&id)
        }),
    }
}

/// The 404 of a response the server does not hold (never kept, dropped, or deleted).
pub fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no response with id {id:?}: it was not stored (store: false), was dropped as the oldest kept, was deleted, or the server restarted"),
    )
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

/// A Responses request in chat's fields: `instructions` and `input` (after the `earlier`
/// conversation it continues) as `messages`, `max_output_tokens`, `text.format`, the flat
/// function tools and `tool_choice`, and `top_logprobs`; the other fields (the sampling
/// extensions chat takes) as they are. Also the conversation's items, `earlier`'s first.
fn to_chat(mut value: Value, earlier: Vec<Value>) -> Result<(Value, Vec<Value>), ApiError> {
    let o = value.as_object_mut().expect("checked to be an object");
    refuse(o)?;
    let mut messages = Vec::new();
    if let Some(i) = o.remove("instructions").filter(|v| !v.is_null()) {
        let text = i
            .as_str()
            .ok_or_else(|| ApiError::bad_param("instructions", "instructions must be a string"))?;
        messages.push(json!({"role": "system", "content": text}));
    }
    let first = earlier.len();
    let items: Vec<Value> = earlier
        .into_iter()
        .chain(input(o.remove("input"))?)
        .collect();
    messages.extend(chat_messages(&items, first)?);
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
    Ok((value, items))
}

/// Refuses what would need state or tools the server does not have.
fn refuse(o: &Map<String, Value>) -> Result<(), ApiError> {
    let set = |key: &str| o.get(key).is_some_and(|v| !v.is_null() && v != false);
    // A stored prompt is an object (a string `prompt` is completions' field, dropped below).
    let stored_prompt = o.get("prompt").is_some_and(Value::is_object);
    for (on, key, why) in [
        (
            set("conversation"),
            "conversation",
            "the Conversations API is not implemented: continue a response with previous_response_id, or send the whole conversation in input",
        ),
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

/// `input` as a list of items: a string is one user message.
fn input(v: Option<Value>) -> Result<Vec<Value>, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(vec![
            json!({"type": "message", "role": "user", "content": s}),
        ]),
        Some(Value::Array(items)) if !items.is_empty() => Ok(items),
        _ => Err(ApiError::bad_param(
            "input",
            "input must be a string or a non-empty list of messages and function call items",
        )),
    }
}

/// Input items as chat messages: messages (`role`, `content` as a string or input/output text
/// parts), function calls and their outputs. Items from `first` on are the request's `input`
/// (errors name them there); those before, the conversation it continues.
fn chat_messages(items: &[Value], first: usize) -> Result<Vec<Value>, ApiError> {
    let mut messages: Vec<Value> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let param = match i.checked_sub(first) {
            Some(i) => format!("input[{i}]"),
            None => "previous_response_id".to_string(),
        };
        let kind = item["type"].as_str().unwrap_or("message");
        match kind {
            "message" => messages.push(message(item, &param)?),
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
        .map(|(i, t)| match &t["type"] {
            kind if kind == "function" => {
                let mut f = t.clone();
                f.as_object_mut().map(|f| f.remove("type"));
                Ok(json!({"type": "function", "function": f}))
            }
            // As JSON, as the client wrote it (`"web_search"`, or `null` when missing).
            kind => Err(ApiError::bad_param(
                &format!("tools[{i}].type"),
                format!(
                    "tools[{i}].type {kind}: only function tools are supported (no built-in tools)"
                ),
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Value, ApiError> {
        to_chat(body, Vec::new()).map(|(chat, _)| chat)
    }

    fn parsed(body: Value, store: &store::Store) -> Result<Parsed, ApiError> {
        parse(body.to_string().as_bytes(), store)
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
                json!({"input": "x", "conversation": "conv_1"}),
                "conversation",
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

    /// A built-in tool's type is said as the client sent it, not as Rust's debug form.
    #[test]
    fn a_built_in_tool_is_refused_in_the_clients_words() {
        for (tool, said) in [
            (
                json!({"type": "web_search"}),
                r#"tools[0].type "web_search": "#,
            ),
            (json!({"name": "f"}), "tools[0].type null: "),
        ] {
            let e = chat(json!({"input": "x", "tools": [tool]})).unwrap_err();
            assert!(e.message.starts_with(said), "{e:?}");
            assert!(!e.message.contains("Some("), "{e:?}");
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
        let p = parsed(
            json!({"input": "x", "temperature": 0.25}),
            &store::Store::new(1),
        )
        .unwrap();
        assert_eq!(p.raw.temperature, Some(0.25));
        let echoed = &p.echoed.0;
        assert_eq!(echoed["temperature"], 0.25);
        assert_eq!(echoed["tool_choice"], "auto");
        assert_eq!(echoed["text"]["format"]["type"], "text");
        assert_eq!(
            (&echoed["store"], &echoed["previous_response_id"]),
            (&json!(true), &Value::Null)
        );
    }

    #[test]
    fn a_continued_response_brings_its_conversation_but_not_its_instructions() {
        let store = store::Store::new(4);
        let first = parsed(json!({"instructions": "Be brief.", "input": "Hi"}), &store).unwrap();
        let keep = first.keep.unwrap();
        assert_eq!(
            keep,
            vec![json!({"type": "message", "role": "user", "content": "Hi"})]
        );
        let output = json!([{"type": "message", "id": "msg_1", "status": "completed",
            "role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]}]);
        let response = json!({"id": "resp_1", "output": output});
        store.put(
            "resp_1".into(),
            store::Stored {
                response,
                input: keep,
            },
        );
        let next = json!({"previous_response_id": "resp_1", "input": "Bye",
            "instructions": "Be kind."});
        let p = parsed(next, &store).unwrap();
        let roles_and_texts: Vec<(String, String)> = (p.raw.messages.unwrap().iter())
            .map(|m| {
                (
                    m.role.clone(),
                    m.content.as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let expected = [
            ("system", "Be kind."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "Bye"),
        ];
        assert_eq!(
            roles_and_texts,
            expected.map(|(r, t)| (r.to_string(), t.to_string()))
        );
        assert_eq!(p.keep.unwrap().len(), 3);
        assert_eq!(p.echoed.0["previous_response_id"], "resp_1");
    }

    #[test]
    fn an_unknown_previous_response_is_a_404_and_store_false_keeps_nothing() {
        let store = store::Store::new(4);
        let e = parsed(
            json!({"previous_response_id": "resp_x", "input": "x"}),
            &store,
        )
        .unwrap_err();
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::NOT_FOUND, Some("previous_response_id"))
        );
        let p = parsed(json!({"input": "x", "store": false}), &store).unwrap();
        assert!(p.keep.is_none());
        assert_eq!(p.echoed.0["store"], false);
        let none = store::Store::new(0);
        assert!(parsed(json!({"input": "x"}), &none).unwrap().keep.is_none());
        let e = parsed(
            json!({"previous_response_id": "resp_x", "input": "x"}),
            &none,
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = parsed(json!({"input": "x", "store": "yes"}), &store).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("store"));
    }
}
