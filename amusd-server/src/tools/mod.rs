//! Tool calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls` on chat, for any model.
//!
//! A model's own tool-call syntax lives in its chat template and differs by family; this is the
//! format llama.cpp falls back to for templates without one ("generic"): the tools, as JSON, go in
//! the system message with the reply's format, and the reply is constrained by a JSON schema to be
//! either `{"tool_calls":[{"name":...,"arguments":{...}},...]}` (each call's arguments fit its
//! tool's `parameters`) or `{"response":"..."}`, compact (no whitespace between JSON tokens). The
//! server turns the first into OpenAI's `tool_calls` (finish reason `tool_calls`), the second into
//! the message's content. Earlier turns are written back in the same format: an assistant's
//! `tool_calls` as that JSON, a `tool` message as a user turn holding `{"tool_response": ...}`.
//! Since it is a prompt and a grammar, every strategy gives the same reply, as for any structured
//! output. Templates with a tool syntax of their own (Hermes, Llama 3.x) get theirs instead
//! ([`syntax`]).

pub mod reader;
pub mod syntax;

pub use syntax::Syntax;

use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::format::{GrammarType, OutputGrammar};

/// One function the model may call.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of its arguments.
    pub parameters: Value,
}

/// What the reply may be.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolChoice {
    /// Calls or an answer (`"auto"`, the default).
    Auto,
    /// One call or more (`"required"`).
    Required,
    /// Calls of this tool only (`{"type": "function", "function": {"name": ...}}`).
    Named(String),
}

/// A request's tools and what it allows of them.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUse {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// More than one call in a reply (`parallel_tool_calls`, default true).
    pub parallel: bool,
    /// How the prompt and the reply write calls: the model's chat template's.
    pub syntax: Syntax,
}

/// The request's tools, checked; None when it gives none or says `tool_choice: "none"`.
pub fn tool_use(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolUse>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => (a.iter().enumerate())
            .map(|(i, t)| tool(i, t))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(bad(
                "tools",
                "tools must be a list of {\"type\": \"function\", \"function\": {...}}",
            ))
        }
    };
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice {other:?} must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
                ))
            }
        },
        Some(v) => match v["function"]["name"].as_str() {
            Some(name) if tools.iter().any(|t| t.name == name) => ToolChoice::Named(name.into()),
            Some(name) => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not among the tools"),
                ))
            }
            None => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    if tools.is_empty() {
        return match choice {
            ToolChoice::Auto => Ok(None),
            _ => Err(bad(
                "tool_choice",
                "tool_choice asks for a tool call, and there are no tools",
            )),
        };
    }
    Ok(Some(ToolUse {
        tools,
        choice,
        parallel: parallel.unwrap_or(true),
        syntax: Syntax::Generic,
    }))
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_param(param, message)
}

fn tool(i: usize, t: &Value) -> Result<Tool, ApiError> {
    let param = format!("tools[{i}]");
    let f = &t["function"];
    if t["type"] != "function" || !f.is_object() {
        return Err(bad(
            &param,
            format!("{param} must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": {{...}}}}}}"),
        ));
    }
    let name = f["name"].as_str().unwrap_or_default();
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
        return Err(bad(
            &param,
            format!("{param}.function.name {name:?} must be 1-64 letters, digits, _ or -"),
        ));
    }
    let parameters = match &f["parameters"] {
        Value::Null => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Value::Object(p) => Value::Object(closed(p.clone())),
        _ => {
            return Err(bad(
                &param,
                format!("{param}.function.parameters must be a JSON schema object"),
            ))
        }
    };
    Ok(Tool {
        name: name.into(),
        description: f["description"].as_str().map(Into::into),
        parameters,
    })
}

/// A tool's arguments are the properties its schema names: unless it says otherwise, no others
/// (as llama.cpp's schema converter reads an object schema without `additionalProperties`;
/// JSON Schema's own default lets a model invent arguments no function takes).
fn closed(mut schema: Map<String, Value>) -> Map<String, Value> {
    let object =
        schema.get("type").is_some_and(|t| t == "object") || schema.contains_key("properties");
    if object && !schema.contains_key("additionalProperties") {
        schema.insert("additionalProperties".into(), false.into());
    }
    schema
}

impl ToolUse {
    /// The tools the reply may call.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            ToolChoice::Named(n) => &t.name == n,
            _ => true,
        })
    }

    /// Whether a reply makes one call only: without `parallel_tool_calls`, or with one function
    /// named (OpenAI's named `tool_choice` gives exactly one call).
    fn single_call(&self) -> bool {
        !self.parallel || matches!(self.choice, ToolChoice::Named(_))
    }

    /// The same tools, written in `syntax`.
    pub fn in_syntax(self, syntax: Syntax) -> Self {
        Self { syntax, ..self }
    }

    /// The reply's grammar.
    pub fn grammar(&self) -> OutputGrammar {
        match self.syntax {
            Syntax::Generic => self.generic_grammar(),
            native => self.native_grammar(native),
        }
    }

    /// The generic format's grammar: a JSON schema of the calls, or of the calls or an answer.
    fn generic_grammar(&self) -> OutputGrammar {
        let call = |t: &Tool| {
            json!({"type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"], "additionalProperties": false})
        };
        let mut calls = json!({"type": "array", "minItems": 1,
            "items": {"anyOf": self.callable().map(call).collect::<Vec<_>>()}});
        if self.single_call() {
            calls["maxItems"] = 1.into();
        }
        let calling = json!({"type": "object", "properties": {"tool_calls": calls},
            "required": ["tool_calls"], "additionalProperties": false});
        let mut schema = match self.choice {
            ToolChoice::Auto => json!({"anyOf": [calling, {"type": "object",
                "properties": {"response": {"type": "string"}},
                "required": ["response"], "additionalProperties": false}]}),
            _ => calling,
        };
        // The format is ours, and compact as the prompt shows it and earlier turns write it.
        schema["x-guidance"] = fixed_whitespace(",", ":");
        OutputGrammar {
            kind: GrammarType::JsonSchema,
            text: schema.to_string(),
            param: "tools",
        }
    }

    /// What the system message says of the tools and the reply's format.
    pub fn system_prompt(&self) -> String {
        let mut s = String::from(
            "You can call these tools (as JSON: name, description, parameters' schema):\n",
        );
        for t in self.callable() {
            let mut o = Map::new();
            o.insert("name".into(), t.name.clone().into());
            if let Some(d) = &t.description {
                o.insert("description".into(), d.clone().into());
            }
            o.insert("parameters".into(), t.parameters.clone());
            s.push_str(&Value::Object(o).to_string());
            s.push('\n');
        }
        // Compact, as the grammar holds the reply.
        let calls = if self.single_call() {
            "{\"tool_calls\":[{\"name\":\"<tool name>\",\"arguments\":{<its arguments>}}]}"
        } else {
            "{\"tool_calls\":[{\"name\":\"<tool name>\",\"arguments\":{<its arguments>}},...]}"
        };
        s.push('\n');
        match self.choice {
            ToolChoice::Auto => s.push_str(&format!(
                "Reply with JSON only: {calls} to call tools, or {{\"response\":\"<your answer>\"}} to answer directly."
            )),
            _ => s.push_str(&format!("Reply with JSON only, calling tools: {calls}")),
        }
        s
    }
}

/// llguidance's JSON options (a schema's `x-guidance`) for JSON with no optional whitespace, its
/// separators these: each newline or indent a model puts between JSON tokens is a token more
/// (a pretty-printed call took 25 more, and `max_tokens` cut calls short).
pub(crate) fn fixed_whitespace(items: &str, keys: &str) -> Value {
    json!({"whitespace_flexible": false, "item_separator": items, "key_separator": keys})
}

/// An assistant turn's `tool_calls` (OpenAI's shape) as the reply format's JSON, for the prompt.
pub fn calls_as_text(calls: &Value, param: &str) -> Result<String, ApiError> {
    let calls: Vec<Value> = (earlier_calls(calls, param)?.into_iter())
        .map(|c| json!({"name": c.name, "arguments": c.arguments}))
        .collect();
    Ok(json!({ "tool_calls": calls }).to_string())
}

/// One call of an earlier assistant turn, checked.
pub(crate) struct EarlierCall<'a> {
    pub id: Option<&'a str>,
    pub name: &'a str,
    /// The object its arguments' JSON text holds ([`arguments_value`]).
    pub arguments: Value,
}

/// An assistant turn's `tool_calls` (OpenAI's shape, given as request parameter `param`), read.
pub(crate) fn earlier_calls<'a>(
    calls: &'a Value,
    param: &str,
) -> Result<Vec<EarlierCall<'a>>, ApiError> {
    let bad = || {
        bad(
            param,
            format!("{param} must be a list of {{\"type\": \"function\", \"function\": {{\"name\": ..., \"arguments\": \"...\"}}}}"),
        )
    };
    let list = calls.as_array().ok_or_else(bad)?;
    (list.iter())
        .map(|c| {
            let f = &c["function"];
            Ok(EarlierCall {
                id: c["id"].as_str(),
                name: f["name"].as_str().ok_or_else(bad)?,
                arguments: arguments_value(&f["arguments"]),
            })
        })
        .collect()
}

/// A call's arguments as they are written back: they come as a JSON string, and go back as the
/// object it holds (the string itself if it holds none).
fn arguments_value(arguments: &Value) -> Value {
    match arguments {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Value::Null => json!({}),
        v => v.clone(),
    }
}

/// A `tool` message (a call's result) as the user turn that carries it.
pub fn result_as_text(content: &str, call_id: Option<&str>) -> String {
    let mut r = json!({"content": content});
    if let Some(id) = call_id {
        r["tool_call_id"] = id.into();
    }
    json!({ "tool_response": r }).to_string()
}

/// A reply read back: calls, an answer, or text in neither form (cut short by `max_tokens`).
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Each call's name and arguments (as JSON text, OpenAI's form).
    Calls(Vec<(String, String)>),
    Content(String),
}

/// `text`, a reply in `syntax`, read back.
pub fn read_reply(text: &str, syntax: Syntax) -> Reply {
    reader::read(text, syntax)
}

/// Call `k`'s id in choice `choice` of response `response_id`.
pub fn call_id(response_id: &str, choice: usize, k: usize) -> String {
    format!("call_{response_id}_{choice}_{k}")
}

/// OpenAI's `tool_calls` list; ids from the response's and the choice's (`call_<id>_<choice>_<k>`).
pub fn tool_calls_json(
    calls: &[(String, String)],
    response_id: &str,
    choice: usize,
    streamed: bool,
) -> Value {
    (calls.iter().enumerate())
        .map(|(k, (name, arguments))| {
            let mut c = json!({"id": call_id(response_id, choice, k), "type": "function",
                "function": {"name": name, "arguments": arguments}});
            if streamed {
                c["index"] = k.into();
            }
            c
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two tools: one with a schema and a description, one with neither.
    pub(crate) fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "time"}}])
    }

    #[test]
    fn tools_and_choices_are_read() {
        let t = weather();
        let u = tool_use(Some(&t), None, None).unwrap().unwrap();
        assert_eq!(u.choice, ToolChoice::Auto);
        assert!(u.parallel);
        assert_eq!(u.tools[0].name, "get_weather");
        assert_eq!(
            u.tools[1].parameters,
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        assert_eq!(u.tools[0].parameters["additionalProperties"], false);
        let named = json!({"type": "function", "function": {"name": "time"}});
        let u = tool_use(Some(&t), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(u.choice, ToolChoice::Named("time".into()));
        assert!(!u.parallel);
        assert_eq!(
            tool_use(Some(&t), Some(&json!("none")), None).unwrap(),
            None
        );
        assert_eq!(tool_use(None, None, None).unwrap(), None);
        assert_eq!(
            tool_use(Some(&json!([])), Some(&json!("auto")), None).unwrap(),
            None
        );
    }

    #[test]
    fn bad_tools_name_their_parameter() {
        let t = weather();
        for (tools, choice, param) in [
            (json!({"a": 1}), None, "tools"),
            (json!([{"type": "function"}]), None, "tools[0]"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                None,
                "tools[0]",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": 3}}]),
                None,
                "tools[0]",
            ),
            (t.clone(), Some(json!("sometimes")), "tool_choice"),
            (
                t.clone(),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
                "tool_choice",
            ),
            (json!([]), Some(json!("required")), "tool_choice"),
        ] {
            let e = tool_use(Some(&tools), choice.as_ref(), None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{tools} {choice:?}: {e:?}");
        }
    }

    #[test]
    fn the_grammar_allows_calls_of_the_callable_tools_or_an_answer() {
        let t = weather();
        let u = tool_use(Some(&t), None, None).unwrap().unwrap();
        let g = u.grammar();
        assert_eq!((g.kind, g.param), (GrammarType::JsonSchema, "tools"));
        let s: Value = serde_json::from_str(&g.text).unwrap();
        let calls = &s["anyOf"][0]["properties"]["tool_calls"];
        assert_eq!(
            calls["items"]["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        assert_eq!(
            calls["items"]["anyOf"][0]["properties"]["arguments"]["required"],
            json!(["city"])
        );
        assert!(calls.get("maxItems").is_none());
        assert_eq!(s["anyOf"][1]["required"], json!(["response"]));
        let named = json!({"type": "function", "function": {"name": "time"}});
        let u = tool_use(Some(&t), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        let s: Value = serde_json::from_str(&u.grammar().text).unwrap();
        let items = &s["properties"]["tool_calls"]["items"]["anyOf"];
        assert_eq!(items.as_array().unwrap().len(), 1);
        assert_eq!(items[0]["properties"]["name"]["const"], "time");
        assert_eq!(s["properties"]["tool_calls"]["maxItems"], 1);
        assert!(!u.system_prompt().contains("get_weather"));
        assert!(u.system_prompt().contains("\"name\":\"time\""));
    }

    /// A function named in `tool_choice` is called once, as OpenAI's, parallel calls allowed or
    /// not; the prompt shows one call.
    #[test]
    fn a_named_function_is_called_exactly_once() {
        let t = weather();
        let named = json!({"type": "function", "function": {"name": "time"}});
        for parallel in [None, Some(true)] {
            let u = tool_use(Some(&t), Some(&named), parallel).unwrap().unwrap();
            let s: Value = serde_json::from_str(&u.grammar().text).unwrap();
            let calls = &s["properties"]["tool_calls"];
            assert_eq!(
                (calls["minItems"].as_u64(), calls["maxItems"].as_u64()),
                (Some(1), Some(1))
            );
            assert!(!u.system_prompt().contains("...]"), "{}", u.system_prompt());
        }
        let required = tool_use(Some(&t), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        let s: Value = serde_json::from_str(&required.grammar().text).unwrap();
        assert!(s["properties"]["tool_calls"].get("maxItems").is_none());
    }

    /// The generic format's JSON has no optional whitespace (llguidance's `x-guidance`), and the
    /// prompt shows it compact, as earlier turns are written.
    #[test]
    fn the_generic_reply_is_compact_json() {
        let t = weather();
        for choice in [json!("auto"), json!("required")] {
            let u = tool_use(Some(&t), Some(&choice), None).unwrap().unwrap();
            let s: Value = serde_json::from_str(&u.grammar().text).unwrap();
            assert_eq!(
                s["x-guidance"],
                json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
                "{choice}"
            );
            let prompt = u.system_prompt();
            assert!(
                prompt.contains(r#"{"tool_calls":[{"name":"<tool name>","arguments":"#),
                "{prompt}"
            );
            assert!(!prompt.contains("\": "), "{prompt}");
        }
    }

    #[test]
    fn replies_read_back_as_calls_or_content() {
        assert_eq!(
            read_reply(
                r#"{"tool_calls": [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]}"#,
                Syntax::Generic
            ),
            Reply::Calls(vec![
                ("f".into(), r#"{"x":1}"#.into()),
                ("g".into(), "{}".into())
            ])
        );
        assert_eq!(
            read_reply(r#"{"response": "Hi!"}"#, Syntax::Generic),
            Reply::Content("Hi!".into())
        );
        // Cut short: the text as it is.
        assert_eq!(
            read_reply(r#"{"tool_calls": [{"na"#, Syntax::Generic),
            Reply::Content(r#"{"tool_calls": [{"na"#.into())
        );
    }

    #[test]
    fn earlier_turns_are_written_in_the_reply_format() {
        let calls = json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        assert_eq!(
            calls_as_text(&calls, "messages[1].tool_calls").unwrap(),
            r#"{"tool_calls":[{"name":"f","arguments":{"x":1}}]}"#
        );
        assert!(calls_as_text(&json!("f"), "p").is_err());
        assert_eq!(
            result_as_text("18 C", Some("c1")),
            r#"{"tool_response":{"content":"18 C","tool_call_id":"c1"}}"#
        );
        let ids = tool_calls_json(&[("f".into(), "{}".into())], "chatcmpl-1", 0, true);
        assert_eq!(ids[0]["id"], "call_chatcmpl-1_0_0");
        assert_eq!(ids[0]["index"], 0);
        assert_eq!(ids[0]["function"]["arguments"], "{}");
    }
}
