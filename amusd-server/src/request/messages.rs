//! A chat request's messages and template options, checked: roles, content parts, tool calls and
//! results, in the chat template's tool syntax.

use serde_json::Value;

use super::RawMessage;
use crate::error::ApiError;
use crate::generator::{ChatMessage, ChatOptions};
use crate::tools::{self, Syntax, ToolUse};

/// The conversation, an assistant's calls and the tools' results written in the generic format.
pub(crate) fn messages(raw: Option<Vec<RawMessage>>) -> Result<Vec<ChatMessage>, ApiError> {
    messages_in(raw, Syntax::Generic)
}

/// The conversation for a template of `syntax`: a native one takes an assistant's calls and the
/// `tool` turns as they are; the generic format writes them as text.
pub(super) fn messages_in(
    raw: Option<Vec<RawMessage>>,
    syntax: Syntax,
) -> Result<Vec<ChatMessage>, ApiError> {
    let raw = raw.ok_or_else(|| {
        ApiError::bad_param(
            "messages",
            "messages is missing: pass a list of {role, content}",
        )
    })?;
    if raw.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages is empty: pass at least one message",
        ));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, m)| {
            let calls = match &m.tool_calls {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                _ => true,
            };
            if syntax.native() && ((calls && m.role == "assistant") || m.role == "tool") {
                return native_turn(m, i);
            }
            let (role, content) = match m.role.as_str() {
                "system" | "developer" => ("system", content(&m.content, i)?),
                "user" => ("user", content(&m.content, i)?),
                "assistant" if calls => {
                    let text = match &m.content {
                        Value::Null => String::new(),
                        c => content(c, i)? + "\n",
                    };
                    let param = format!("messages[{i}].tool_calls");
                    ("assistant", text + &tools::calls_as_text(&m.tool_calls, &param)?)
                }
                "assistant" => ("assistant", content(&m.content, i)?),
                "tool" => {
                    let c = content(&m.content, i)?;
                    ("user", tools::result_as_text(&c, m.tool_call_id.as_deref()))
                }
                other => {
                    return Err(ApiError::bad_param(
                        &format!("messages[{i}].role"),
                        format!("messages[{i}].role {other:?} is not supported: use system, developer, user, assistant or tool"),
                    ))
                }
            };
            Ok(ChatMessage::text(role, content))
        })
        .collect()
}

/// An assistant's calls or a tool's result, for a template that writes them itself.
fn native_turn(m: RawMessage, i: usize) -> Result<ChatMessage, ApiError> {
    let text = match &m.content {
        Value::Null => String::new(),
        c => content(c, i)?,
    };
    let mut turn = ChatMessage::text(m.role.as_str(), text);
    if m.role == "tool" {
        turn.tool_call_id = m.tool_call_id;
        return Ok(turn);
    }
    let param = format!("messages[{i}].tool_calls");
    turn.tool_calls = Some(tools::syntax::calls_for_template(&m.tool_calls, &param)?);
    Ok(turn)
}

/// How a conversation is rendered. A last message holding an assistant's text is continued
/// (llama.cpp's assistant prefill; not by default with tools, whose replies are whole JSON)
/// unless the request asks for a new turn: `add_generation_prompt: true` or
/// `continue_final_message: false` (vLLM's names, which may also ask for it explicitly).
pub(crate) fn chat_options(
    messages: &[RawMessage],
    tools: bool,
    (add, cont): (Option<bool>, Option<bool>),
    kwargs: Option<Value>,
) -> Result<ChatOptions, ApiError> {
    let bad = |m: &str| Err(ApiError::bad_param("continue_final_message", m));
    let prefill = messages.last().is_some_and(|m| {
        let text = match &m.content {
            Value::String(s) => !s.trim().is_empty(),
            Value::Array(parts) => !parts.is_empty(),
            _ => false,
        };
        m.role == "assistant" && text && m.tool_calls.as_array().is_none_or(Vec::is_empty)
    });
    let continue_final_message = match (add, cont) {
        (Some(true), Some(true)) => {
            return bad("continue_final_message and add_generation_prompt cannot both be true: continue the last message or open a new turn")
        }
        (_, Some(true)) if !prefill => {
            return bad("continue_final_message needs the last message to be an assistant's, with text")
        }
        (_, Some(c)) => c,
        (Some(true), None) => false,
        (_, None) => prefill && !tools,
    };
    let template_kwargs = match kwargs {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(o)) => o,
        Some(_) => {
            return Err(ApiError::bad_param(
                "chat_template_kwargs",
                "chat_template_kwargs must be an object of the template's variables",
            ))
        }
    };
    Ok(ChatOptions {
        add_generation_prompt: add.unwrap_or(!continue_final_message),
        continue_final_message,
        template_kwargs,
    })
}

/// The conversation with the tools' description at the end of its system message (a new one
/// first, if it has none).
pub(super) fn with_tools(
    mut messages: Vec<ChatMessage>,
    tools: Option<&ToolUse>,
) -> Vec<ChatMessage> {
    let Some(tools) = tools else {
        return messages;
    };
    let prompt = tools.system_prompt();
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{prompt}", m.content),
        _ => messages.insert(0, ChatMessage::text("system", prompt)),
    }
    messages
}

/// A message's content: a string, or a list of `{"type": "text", "text": ...}` parts (joined).
fn content(v: &Value, i: usize) -> Result<String, ApiError> {
    let param = format!("messages[{i}].content");
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(ApiError::bad_param(
                    &param,
                    format!("{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.concat()),
        _ => Err(ApiError::bad_param(
            &param,
            format!("{param} must be a string or a list of text parts"),
        )),
    }
}
