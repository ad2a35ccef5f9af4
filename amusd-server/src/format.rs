//! Structured output: the grammar a request's answer must follow, from the names the popular
//! servers give it: OpenAI's `response_format` (`json_object`, `json_schema`), llama.cpp's
//! `json_schema` and `grammar` (GBNF, or Lark after `%llguidance`, as llama.cpp reads it), and
//! vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`) and older `guided_json`,
//! `guided_regex`, `guided_choice` and `guided_grammar` (a grammar with a `::=` is GBNF, as vLLM
//! tells them apart, else Lark in llguidance's syntax). One per request. Whether it compiles
//! against the model's vocabulary is the handler's check ([`crate::Codec::check_grammar`]).

use serde_json::Value;

use crate::error::ApiError;
use crate::request::RawRequest;

/// What kind of grammar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrammarType {
    /// Any JSON object.
    JsonObject,
    /// A JSON schema (the text is its JSON).
    JsonSchema,
    /// A regular expression the whole answer matches.
    Regex,
    /// A Lark grammar (llguidance's syntax).
    Lark,
    /// A GBNF grammar (llama.cpp's syntax).
    Gbnf,
}

/// A request's grammar, and the parameter it came from (errors name it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputGrammar {
    pub kind: GrammarType,
    pub text: String,
    pub param: &'static str,
}

/// The request's grammar, if it asks for one; a 400 naming the parameter if it is malformed or
/// if it asks for two.
pub fn output_grammar(r: &RawRequest) -> Result<Option<OutputGrammar>, ApiError> {
    let given = |v: &Option<Value>| v.as_ref().filter(|v| !v.is_null()).cloned();
    let mut found = Vec::new();
    if let Some(f) = given(&r.response_format) {
        found.extend(response_format(&f)?);
    }
    if let Some(s) = given(&r.json_schema) {
        found.push(schema("json_schema", &s)?);
    }
    if let Some(s) = given(&r.guided_json) {
        found.push(schema("guided_json", &s)?);
    }
    if let Some(s) = given(&r.guided_regex) {
        found.push(text("guided_regex", GrammarType::Regex, &s)?);
    }
    if let Some(c) = given(&r.guided_choice) {
        found.push(choice("guided_choice", &c)?);
    }
    if let Some(g) = given(&r.guided_grammar) {
        found.push(text("guided_grammar", cfg_kind(&g), &g)?);
    }
    if let Some(g) = given(&r.grammar) {
        found.push(text("grammar", llama_cpp_kind(&g), &g)?);
    }
    if let Some(so) = given(&r.structured_outputs) {
        found.push(structured_outputs(&so)?);
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(ApiError::bad_param(
            found[1].param,
            format!(
                "{} and {} both constrain the answer: give one",
                found[0].param, found[1].param
            ),
        )),
    }
}

/// OpenAI's `response_format`: `text` (no grammar), `json_object` or `json_schema`.
fn response_format(f: &Value) -> Result<Option<OutputGrammar>, ApiError> {
    let bad = |m: String| ApiError::bad_param("response_format", m);
    match f["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputGrammar {
            kind: GrammarType::JsonObject,
            text: String::new(),
            param: "response_format",
        })),
        Some("json_schema") => {
            let inner = &f["json_schema"];
            if !inner.is_object() {
                return Err(bad(
                    "response_format json_schema needs a \"json_schema\" object with a \"schema\""
                        .into(),
                ));
            }
            // OpenAI's wrapper carries the schema under "schema"; without one, any JSON.
            let s = match &inner["schema"] {
                Value::Null => Value::Object(Default::default()),
                s => s.clone(),
            };
            schema("response_format", &s).map(Some)
        }
        other => Err(bad(format!(
            "response_format type must be \"text\", \"json_object\" or \"json_schema\", got {}",
            other.map_or_else(|| f["type"].to_string(), |s| format!("{s:?}"))
        ))),
    }
}

/// vLLM's `structured_outputs`: an object with one of `json` (a schema), `regex`, `choice` or
/// `grammar` (Lark).
fn structured_outputs(so: &Value) -> Result<OutputGrammar, ApiError> {
    const P: &str = "structured_outputs";
    let bad = || {
        ApiError::bad_param(
            P,
            "structured_outputs must be an object with one of json, regex, choice or grammar",
        )
    };
    let o = so.as_object().ok_or_else(bad)?;
    let set: Vec<(&String, &Value)> = o.iter().filter(|(_, v)| !v.is_null()).collect();
    let [(key, v)] = set[..] else {
        return Err(bad());
    };
    let g = match key.as_str() {
        "json" => schema(P, v),
        "regex" => text(P, GrammarType::Regex, v),
        "choice" => choice(P, v),
        "grammar" => text(P, cfg_kind(v), v),
        _ => Err(bad()),
    }?;
    Ok(g)
}

/// A JSON schema: an object (or a string holding one, as vLLM also takes `guided_json`).
fn schema(param: &'static str, s: &Value) -> Result<OutputGrammar, ApiError> {
    let bad = || ApiError::bad_param(param, format!("{param} must be a JSON schema object"));
    let value = match s {
        Value::String(t) => serde_json::from_str::<Value>(t).map_err(|_| bad())?,
        v => v.clone(),
    };
    if !value.is_object() && !value.is_boolean() {
        return Err(bad());
    }
    Ok(OutputGrammar {
        kind: GrammarType::JsonSchema,
        text: value.to_string(),
        param,
    })
}

fn text(param: &'static str, kind: GrammarType, v: &Value) -> Result<OutputGrammar, ApiError> {
    match v.as_str() {
        Some(t) if !t.is_empty() => Ok(OutputGrammar {
            kind,
            text: t.to_string(),
            param,
        }),
        _ => Err(ApiError::bad_param(
            param,
            format!("{param} must be a non-empty string"),
        )),
    }
}

/// What a vLLM grammar is: GBNF if it defines a rule with `::=` (as vLLM decides), else Lark.
fn cfg_kind(v: &Value) -> GrammarType {
    match v.as_str() {
        Some(t) if t.contains("::=") => GrammarType::Gbnf,
        _ => GrammarType::Lark,
    }
}

/// What llama.cpp's `grammar` is: GBNF, unless it starts with `%llguidance` (llama.cpp's mark
/// for llguidance's Lark).
fn llama_cpp_kind(v: &Value) -> GrammarType {
    match v.as_str() {
        Some(t) if t.trim_start().starts_with("%llguidance") => GrammarType::Lark,
        _ => GrammarType::Gbnf,
    }
}

/// vLLM's `guided_choice`: the answer is one of the strings, as a regular expression of their
/// alternatives (each escaped).
fn choice(param: &'static str, v: &Value) -> Result<OutputGrammar, ApiError> {
    let bad = || {
        ApiError::bad_param(
            param,
            format!("{param} must be a non-empty list of strings"),
        )
    };
    let items = v.as_array().filter(|a| !a.is_empty()).ok_or_else(bad)?;
    let alternatives: Vec<String> = items
        .iter()
        .map(|i| i.as_str().map(escape_regex).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    Ok(OutputGrammar {
        kind: GrammarType::Regex,
        text: format!("({})", alternatives.join("|")),
        param,
    })
}

/// `s` as a regular expression that matches exactly it: the meta characters of Rust's regex
/// syntax (which llguidance's is) escaped.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Option<OutputGrammar>, ApiError> {
        let raw: RawRequest = serde_json::from_str(body).unwrap();
        output_grammar(&raw)
    }

    fn grammar(body: &str) -> (GrammarType, String, &'static str) {
        let g = parse(body).unwrap().unwrap();
        (g.kind, g.text, g.param)
    }

    #[test]
    fn each_name_gives_its_grammar() {
        use GrammarType::*;
        assert_eq!(parse(r#"{}"#).unwrap(), None);
        assert_eq!(
            parse(r#"{"response_format":{"type":"text"}}"#).unwrap(),
            None
        );
        assert_eq!(
            grammar(r#"{"response_format":{"type":"json_object"}}"#),
            (JsonObject, String::new(), "response_format")
        );
        assert_eq!(
            grammar(
                r#"{"response_format":{"type":"json_schema","json_schema":{"name":"x","strict":true,"schema":{"type":"integer"}}}}"#
            ),
            (
                JsonSchema,
                r#"{"type":"integer"}"#.into(),
                "response_format"
            )
        );
        // Properties keep the order they were written in: structured output follows it.
        assert_eq!(
            grammar(r#"{"json_schema":{"type":"object","properties":{"zeta":{},"alpha":{}}}}"#),
            (
                JsonSchema,
                r#"{"type":"object","properties":{"zeta":{},"alpha":{}}}"#.into(),
                "json_schema"
            )
        );
        assert_eq!(
            grammar(r#"{"guided_json":"{\"type\":\"boolean\"}"}"#),
            (JsonSchema, r#"{"type":"boolean"}"#.into(), "guided_json")
        );
        assert_eq!(
            grammar(r#"{"guided_regex":"[0-9]+"}"#),
            (Regex, "[0-9]+".into(), "guided_regex")
        );
        assert_eq!(
            grammar(r#"{"guided_choice":["yes","no (or maybe)","a.b"]}"#),
            (Regex, r"(yes|no \(or maybe\)|a\.b)".into(), "guided_choice")
        );
        assert_eq!(
            grammar(r#"{"guided_grammar":"start: \"a\""}"#),
            (Lark, "start: \"a\"".into(), "guided_grammar")
        );
        assert_eq!(
            grammar(r#"{"guided_grammar":"root ::= \"a\""}"#),
            (Gbnf, "root ::= \"a\"".into(), "guided_grammar")
        );
        assert_eq!(
            grammar(r#"{"grammar":"root ::= [0-9]+"}"#),
            (Gbnf, "root ::= [0-9]+".into(), "grammar")
        );
        assert_eq!(
            grammar(r#"{"grammar":"%llguidance {}\nstart: \"a\""}"#),
            (Lark, "%llguidance {}\nstart: \"a\"".into(), "grammar")
        );
        assert_eq!(
            grammar(r#"{"structured_outputs":{"grammar":"root ::= \"b\""}}"#),
            (Gbnf, "root ::= \"b\"".into(), "structured_outputs")
        );
        assert_eq!(
            grammar(r#"{"structured_outputs":{"choice":["a","b"]}}"#),
            (Regex, "(a|b)".into(), "structured_outputs")
        );
        assert_eq!(
            grammar(r#"{"structured_outputs":{"json":{"type":"null"}}}"#),
            (
                JsonSchema,
                r#"{"type":"null"}"#.into(),
                "structured_outputs"
            )
        );
    }

    #[test]
    fn malformed_or_doubled_grammars_name_their_parameter() {
        for (body, param) in [
            (r#"{"response_format":{"type":"xml"}}"#, "response_format"),
            (
                r#"{"response_format":{"type":"json_schema"}}"#,
                "response_format",
            ),
            (
                r#"{"response_format":{"type":"json_schema","json_schema":{"schema":5}}}"#,
                "response_format",
            ),
            (r#"{"json_schema":[1]}"#, "json_schema"),
            (r#"{"guided_json":"{not json"}"#, "guided_json"),
            (r#"{"guided_regex":""}"#, "guided_regex"),
            (r#"{"guided_regex":5}"#, "guided_regex"),
            (r#"{"guided_choice":[]}"#, "guided_choice"),
            (r#"{"guided_choice":["a",1]}"#, "guided_choice"),
            (r#"{"grammar":7}"#, "grammar"),
            (
                r#"{"grammar":"root ::= \"a\"","json_schema":{}}"#,
                "grammar",
            ),
            (
                r#"{"structured_outputs":{"xml":"a"}}"#,
                "structured_outputs",
            ),
            (
                r#"{"structured_outputs":{"regex":"a","choice":["a"]}}"#,
                "structured_outputs",
            ),
            (
                r#"{"structured_outputs":{"choice":[]}}"#,
                "structured_outputs",
            ),
            (
                r#"{"response_format":{"type":"json_object"},"guided_regex":"a"}"#,
                "guided_regex",
            ),
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
