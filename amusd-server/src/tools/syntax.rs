//! A model family's own tool-call syntax, as its chat template writes it, for the families whose
//! templates take OpenAI's `tools` and `tool_calls` (llama.cpp's `--jinja` handlers do the same):
//!
//! - **Hermes** (Hermes 2 Pro / 3, Qwen 2.5 and later, and the templates that copied them): the
//!   template lists the tools, and a call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
//!   several one per line.
//! - **Llama 3.x** (Llama 3.1, 3.2, 3.3 Instruct): the template lists the tools in the user's turn,
//!   and a call is the reply `{"name": ..., "parameters": {...}}`, one per reply (the templates
//!   refuse more).
//!
//! The template renders the tools and the earlier turns (an assistant's `tool_calls`, `tool`
//! results) itself; the reply is constrained by a Lark grammar to the calls, or with `"auto"` to
//! the calls or an answer that does not begin as a call does (so its first character past any
//! whitespace tells the two apart, and a stream can send the answer's text as it comes). Every other template gets the
//! generic format ([`super`]).

use serde_json::{json, Value};

use super::{Tool, ToolChoice, ToolUse};
use crate::format::{GrammarType, OutputGrammar};

/// How tool calls are written in the prompt and the reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Syntax {
    /// llama.cpp's generic JSON format, described in the system message ([`super`]).
    #[default]
    Generic,
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>`.
    Hermes,
    /// `{"name": ..., "parameters": ...}`.
    Llama3,
}

impl Syntax {
    /// The syntax of a chat template's source, by the markers llama.cpp looks for: Hermes's call
    /// tag, Llama 3's turn for tool results. None (no template) and other templates: generic.
    pub fn of_template(source: Option<&str>) -> Self {
        match source {
            Some(s) if s.contains("<tool_call>") && s.contains("tools") => Self::Hermes,
            Some(s) if s.contains("<|start_header_id|>ipython<|end_header_id|>") => Self::Llama3,
            _ => Self::Generic,
        }
    }

    /// The syntax of the model's chat template.
    pub fn of_codec(codec: &dyn crate::generator::Codec) -> Self {
        Self::of_template(codec.chat_template().as_deref())
    }

    /// Whether the chat template renders the tools and the earlier calls itself.
    pub fn native(self) -> bool {
        self != Self::Generic
    }

    /// The character a reply of calls begins with; an answer may not begin with it, even after
    /// whitespace.
    pub fn call_start(self) -> char {
        match self {
            Self::Hermes => '<',
            Self::Generic | Self::Llama3 => '{',
        }
    }

    /// The key of a call's arguments.
    pub fn arguments_key(self) -> &'static str {
        match self {
            Self::Llama3 => "parameters",
            Self::Generic | Self::Hermes => "arguments",
        }
    }
}

impl ToolUse {
    /// The reply's grammar under a native syntax: the calls, or with `"auto"` the calls or an
    /// answer whose first character past any whitespace is not [`Syntax::call_start`] (as the
    /// reader tells them apart).
    pub(super) fn native_grammar(&self, syntax: Syntax) -> OutputGrammar {
        let key = syntax.arguments_key();
        let call = |t: &Tool| {
            json!({"type": "object",
                "properties": {"name": {"const": t.name}, key: t.parameters},
                "required": ["name", key], "additionalProperties": false})
        };
        // The separators of the family's calls as its template writes them (Python's
        // `json.dumps`, which the models were trained on), and no other whitespace.
        let schema = json!({"anyOf": self.callable().map(call).collect::<Vec<_>>(),
            "x-guidance": super::fixed_whitespace(", ", ": ")});
        let (calls, call) = match syntax {
            Syntax::Hermes if !self.single_call() => (
                "call (\"\\n\" call)*",
                "\"<tool_call>\\n\" json \"\\n</tool_call>\"",
            ),
            Syntax::Hermes => ("call", "\"<tool_call>\\n\" json \"\\n</tool_call>\""),
            Syntax::Llama3 | Syntax::Generic => ("call", "json"),
        };
        let start = match self.choice {
            ToolChoice::Auto => "calls | ANSWER",
            _ => "calls",
        };
        let first = regex_escape(syntax.call_start());
        let text = format!(
            "start: {start}\ncalls: {calls}\ncall: {call}\njson: %json {schema}\nANSWER: /\\s*[^\\s{first}][\\s\\S]*/\n"
        );
        OutputGrammar {
            kind: GrammarType::Lark,
            text,
            param: "tools",
        }
    }

    /// The template's `tools` variable: OpenAI's list, each callable tool's function with its
    /// checked schema.
    pub fn template_tools(&self) -> Value {
        let tool = |t: &Tool| {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = d.clone().into();
            }
            json!({"type": "function", "function": f})
        };
        Value::Array(self.callable().map(tool).collect())
    }
}

/// `c` inside a regex character class.
fn regex_escape(c: char) -> String {
    match c {
        '{' | '}' | '[' | ']' | '\\' | '^' | '-' => format!("\\{c}"),
        c => c.to_string(),
    }
}

/// An assistant turn's `tool_calls` for a native template: OpenAI's shape, each call's arguments
/// the object their JSON text holds (templates write them with `tojson`, as llama.cpp passes them).
pub fn calls_for_template(calls: &Value, param: &str) -> Result<Value, crate::error::ApiError> {
    let calls = (super::earlier_calls(calls, param)?.into_iter())
        .map(|c| {
            let mut call = json!({"type": "function",
                "function": {"name": c.name, "arguments": c.arguments}});
            if let Some(id) = c.id {
                call["id"] = id.into();
            }
            call
        })
        .collect();
    Ok(Value::Array(calls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::tests::weather;
    use crate::tools::tool_use;

    /// The JSON schema a native grammar's calls follow.
    fn calls_schema(g: &OutputGrammar) -> Value {
        let line = g.text.lines().find_map(|l| l.strip_prefix("json: %json "));
        serde_json::from_str(line.expect("a %json rule")).unwrap()
    }

    #[test]
    fn templates_tell_their_syntax() {
        let hermes = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n";
        let llama = "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}";
        assert_eq!(Syntax::of_template(Some(hermes)), Syntax::Hermes);
        assert_eq!(Syntax::of_template(Some(llama)), Syntax::Llama3);
        assert_eq!(Syntax::of_template(Some("{{ messages }}")), Syntax::Generic);
        assert_eq!(Syntax::of_template(None), Syntax::Generic);
        assert!(!Syntax::Generic.native() && Syntax::Hermes.native());
    }

    #[test]
    fn native_grammars_are_lark_over_each_callable_tools_schema() {
        let t = weather();
        let auto = tool_use(Some(&t), None, None).unwrap().unwrap();
        let g = auto.native_grammar(Syntax::Hermes);
        assert_eq!((g.kind, g.param), (GrammarType::Lark, "tools"));
        assert!(g
            .text
            .starts_with("start: calls | ANSWER\ncalls: call (\"\\n\" call)*\n"));
        assert!(g
            .text
            .contains("call: \"<tool_call>\\n\" json \"\\n</tool_call>\""));
        assert!(g.text.contains("ANSWER: /\\s*[^\\s<][\\s\\S]*/"));
        let schema = calls_schema(&g);
        assert_eq!(
            schema["anyOf"][0]["properties"]["name"]["const"],
            "get_weather"
        );
        assert_eq!(schema["anyOf"][0]["required"], json!(["name", "arguments"]));
        let named = json!({"type": "function", "function": {"name": "time"}});
        let one = tool_use(Some(&t), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        let g = one.native_grammar(Syntax::Llama3);
        assert!(g
            .text
            .starts_with("start: calls\ncalls: call\ncall: json\n"));
        let schema = calls_schema(&g);
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 1);
        assert_eq!(
            schema["anyOf"][0]["required"],
            json!(["name", "parameters"])
        );
        assert_eq!(one.template_tools()[0]["function"]["name"], "time");
        assert_eq!(
            auto.template_tools()[0]["function"]["description"],
            "Weather now"
        );
    }

    /// A named function is one call, parallel calls allowed or not.
    #[test]
    fn a_named_function_is_one_hermes_call() {
        let t = weather();
        let named = json!({"type": "function", "function": {"name": "time"}});
        let one = tool_use(Some(&t), Some(&named), None).unwrap().unwrap();
        let g = one.native_grammar(Syntax::Hermes);
        assert!(
            g.text.starts_with("start: calls\ncalls: call\n"),
            "{}",
            g.text
        );
    }

    /// The calls' JSON has the template's separators and no other whitespace.
    #[test]
    fn native_calls_have_the_templates_separators_and_no_other_whitespace() {
        let t = weather();
        let any = tool_use(Some(&t), Some(&json!("required")), None)
            .unwrap()
            .unwrap();
        for syntax in [Syntax::Hermes, Syntax::Llama3] {
            let schema = calls_schema(&any.native_grammar(syntax));
            assert_eq!(
                schema["x-guidance"],
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
            );
        }
    }

    #[test]
    fn earlier_calls_reach_the_template_as_objects() {
        let calls = json!([{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{\"x\": 1}"}}]);
        let v = calls_for_template(&calls, "messages[1].tool_calls").unwrap();
        assert_eq!(v[0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(v[0]["id"], "c1");
        assert!(calls_for_template(&json!("f"), "p").is_err());
    }
}
