//! Chat templates: turning a conversation into the prompt text a chat model was trained on.
//!
//! Models ship their template as Jinja source, in GGUF metadata (`tokenizer.chat_template`) or in a
//! Hugging Face `tokenizer_config.json`. We render it with minijinja, configured like the Jinja
//! environment `transformers` uses (`trim_blocks`, `lstrip_blocks`, Python string methods via
//! `minijinja_contrib::pycompat`, a `raise_exception` function) so that published templates render
//! the same text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// Everything that can go wrong loading or rendering a chat template. Messages are one line; the
/// crate's `ModelError` prefixes them with "chat template: ".
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template is not valid Jinja.
    #[error("syntax error{}: {detail}", .line.map(|l| format!(" on line {l}")).unwrap_or_default())]
    Syntax { line: Option<usize>, detail: String },
    /// Rendering failed, including the template itself calling `raise_exception`.
    #[error("the chat template failed: {0}")]
    Render(String),
    /// A `tokenizer_config.json` or `chat_template.jinja` could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A `tokenizer_config.json` is not JSON, or its fields have unexpected types.
    #[error("{path} is malformed: {reason}")]
    Config { path: PathBuf, reason: String },
    /// A GGUF metadata value the template needs has the wrong type.
    #[error("GGUF metadata key '{key}' is malformed: {reason}")]
    BadMetadata { key: String, reason: String },
    /// The conversation's last message cannot be continued ([`RenderOptions`]).
    #[error("cannot continue the last message: {0}")]
    Continue(&'static str),
}

/// How a conversation is rendered, beyond its messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// End with the opening of an assistant turn, for the model to write it.
    pub add_generation_prompt: bool,
    /// The last message is an assistant's turn to go on with: the text ends where its content
    /// does (llama.cpp's assistant prefill, vLLM's `continue_final_message`). Templates close
    /// every turn, so the text is rendered whole and cut after the last occurrence of that content,
    /// as both servers do.
    pub continue_final_message: bool,
    /// More variables for the template (`chat_template_kwargs`, such as `enable_thinking`); the
    /// conversation's own (`messages`, `bos_token`, ...) win over them.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// One turn of a conversation. `role` is usually "system", "user" or "assistant"; templates with
/// a tool syntax of their own also read an assistant's `tool_calls` (OpenAI's shape) and a
/// "tool" turn's `tool_call_id`, which the template sees only where they are set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// The name the template is registered under; it appears in render error locations.
const TEMPLATE_NAME: &str = "chat_template";

/// Template steps one render may take (minijinja's "fuel"): a template that loops without end
/// (three nested `range(100000)`) fails in well under a second instead of hanging a request and
/// its process, which cannot be interrupted mid-render (~0.5 s to burn on the 2-core Zen 4). Real
/// templates take 25-40 steps per message (SmolLM2's 26, the Hermes and Llama 3 tool templates'
/// 28 and 38), so a conversation of 10 000 messages takes ~1/80 of it.
pub const RENDER_FUEL: u64 = 20_000_000;

/// ChatML, for models that ship no template. It matches SmolLM2's and Qwen's turn format without
/// their default system prompts.
const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A compiled chat template plus the BOS/EOS strings templates may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Kept beside `env` because a compiled template only lends its source for as long as it lives.
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`, so syntax errors surface here rather than at the first request.
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on; templates are written for it,
        // and without them block tags leave stray newlines and indentation in the prompt.
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters with trimming form a valid syntax"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_fuel(Some(RENDER_FUEL));
        let source = source.into();
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatError::Syntax {
                line: e.line(),
                detail: crate::error::printable(
                    &e.detail()
                        .map_or_else(|| e.kind().to_string(), str::to_string),
                ),
            })?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n` per message), for models without a template.
    pub fn chatml() -> Self {
        Self::new(CHATML, "", "").expect("the built-in ChatML template compiles")
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), with BOS/EOS strings taken from the
    /// vocabulary. `Ok(None)` when the file has no template; callers usually fall back to
    /// [`ChatTemplate::chatml`].
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, Value>,
    ) -> Result<Option<Self>, ChatError> {
        const KEY: &str = "tokenizer.chat_template";
        let Some(source) = metadata.get(KEY) else {
            return Ok(None);
        };
        let source = source.to_string().map_err(|e| bad_metadata(KEY, e))?;
        let token = |id_key: &str| -> Result<String, ChatError> {
            let (Some(id), Some(Value::Array(tokens))) =
                (metadata.get(id_key), metadata.get("tokenizer.ggml.tokens"))
            else {
                return Ok(String::new());
            };
            let index = match *id {
                Value::U32(id) => usize::try_from(id).ok(),
                Value::I32(id) => usize::try_from(id).ok(),
                Value::U64(id) => usize::try_from(id).ok(),
                Value::I64(id) => usize::try_from(id).ok(),
                _ => {
                    let what = crate::gguf::describe_value(id);
                    return Err(bad_metadata(id_key, format!("{what} is not an integer")));
                }
            };
            // An id outside the vocabulary is the tokenizer's problem to report; the template just
            // gets an empty string.
            match index.and_then(|i| tokens.get(i)) {
                Some(Value::String(token)) => Ok(token.clone()),
                _ => Ok(String::new()),
            }
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        Self::new(source.as_str(), bos, eos).map(Some)
    }

    /// The template in a Hugging Face `tokenizer_config.json`, with its `bos_token`/`eos_token`.
    ///
    /// `chat_template` may be a string or a list of `{name, template}` (the one named "default" is
    /// used). Recent `transformers` versions store the template in a `chat_template.jinja` beside the
    /// config instead; that file is used when the config has none. `Ok(None)` when neither has one.
    pub fn from_tokenizer_config(path: impl AsRef<Path>) -> Result<Option<Self>, ChatError> {
        let path = path.as_ref();
        let text = crate::files::read_to_string(path).map_err(|source| ChatError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ChatError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        let malformed = |reason: &str| ChatError::Config {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };

        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                let jinja = path.with_file_name("chat_template.jinja");
                match crate::files::read_to_string(&jinja) {
                    Ok(source) => source,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => {
                        return Err(ChatError::Io {
                            path: jinja,
                            error: source,
                        })
                    }
                }
            }
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    malformed("chat_template is a list without a template named \"default\"")
                })?
                .to_string(),
            Some(_) => {
                return Err(malformed(
                    "chat_template is neither a string nor a list of {name, template}",
                ))
            }
        };
        let bos = special_token_text(&config, "bos_token")
            .ok_or_else(|| malformed("bos_token is not a string"))?;
        let eos = special_token_text(&config, "eos_token")
            .ok_or_else(|| malformed("eos_token is not a string"))?;
        Self::new(source, bos, eos).map(Some)
    }

    /// Replaces the BOS/EOS strings passed to the template (for [`ChatTemplate::chatml`], or a
    /// template whose config did not name them).
    pub fn with_special_tokens(
        mut self,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Self {
        self.bos_token = bos_token.into();
        self.eos_token = eos_token.into();
        self
    }

    /// Renders a conversation. With `add_generation_prompt`, the text ends with the opening of an
    /// assistant turn, ready for the model to continue. The result contains special-token text such
    /// as `<|im_start|>`; encode it with the tokenizer and `add_special_tokens = false` when the
    /// template already writes the BOS.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let options = RenderOptions {
            add_generation_prompt,
            ..Default::default()
        };
        self.render_with(messages, &options)
    }

    /// Renders a conversation as `options` say.
    pub fn render_with(
        &self,
        messages: &[Message],
        options: &RenderOptions,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(crate::error::printable(&e.to_string())))?;
        let continuing = options.continue_final_message;
        let text = template
            .render(context! {
                messages => minijinja::value::Serde(messages),
                add_generation_prompt => options.add_generation_prompt && !continuing,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                ..minijinja::Value::from(minijinja::value::Serde(&options.kwargs))
            })
            .map_err(render_error)?;
        if text.is_empty() && !messages.is_empty() {
            // Said here, not as "the prompt is empty" after tokenizing, where the template's
            // part in it is lost.
            return Err(ChatError::Render(format!(
                "the template rendered no text for a conversation of {} messages",
                messages.len()
            )));
        }
        match continuing {
            true => cut_after_last(text, messages),
            false => Ok(text),
        }
    }

    /// The BOS string templates see as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS string templates see as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// `text` up to the end of the last message's content (trailing whitespace aside, which
/// templates often trim).
fn cut_after_last(mut text: String, messages: &[Message]) -> Result<String, ChatError> {
    let content = match messages.last() {
        Some(m) if m.role == "assistant" && !m.content.trim().is_empty() => m.content.trim_end(),
        _ => return Err(ChatError::Continue("it must be an assistant's, with text")),
    };
    let at = text.rfind(content).ok_or(ChatError::Continue(
        "the chat template does not write its text as is",
    ))?;
    text.truncate(at + content.len());
    Ok(text)
}

/// Jinja's `raise_exception(message)`, which HF templates call to reject conversations they cannot
/// format (for example roles that do not alternate).
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A special token in `tokenizer_config.json`: a string, an `AddedToken` object with a `content`
/// field, or absent/null (empty). `None` when it is something else.
fn special_token_text(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key) {
        None | Some(serde_json::Value::Null) => Some(String::new()),
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(object) => object.get("content")?.as_str().map(str::to_string),
    }
}

/// A failed render's error; running out of fuel said in the user's terms.
fn render_error(e: minijinja::Error) -> ChatError {
    ChatError::Render(match e.kind() {
        minijinja::ErrorKind::OutOfFuel => {
            format!("the template took more than {RENDER_FUEL} steps (a loop that does not end?)")
        }
        _ => crate::error::printable(&e.to_string()),
    })
}

fn bad_metadata(key: &str, reason: impl std::fmt::Display) -> ChatError {
    ChatError::BadMetadata {
        key: key.to_string(),
        reason: crate::error::printable(&reason.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::real_gguf_metadata;

    const QUESTION: &str = "What is the capital of France?";

    fn smollm() -> ChatTemplate {
        ChatTemplate::from_gguf_metadata(real_gguf_metadata())
            .unwrap()
            .expect("SmolLM2 ships a chat template")
    }

    #[test]
    fn a_template_that_loops_without_end_runs_out_of_fuel() {
        // It hung `generate` (deaf to Ctrl-C) and a server's request; now the render ends.
        let looping = "{% for a in range(100000) %}{% for b in range(100000) %}\
                       {% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(looping, "", "").unwrap();
        let started = std::time::Instant::now();
        let err = template.render(&[Message::user("Hi")], true).unwrap_err();
        eprintln!("out of fuel after {:?}", started.elapsed());
        assert!(
            err.to_string()
                .contains("steps (a loop that does not end?)"),
            "{err}"
        );
    }

    #[test]
    fn a_template_that_renders_nothing_says_so() {
        let silent = ChatTemplate::new("{% for m in messages %}{% endfor %}", "", "").unwrap();
        let err = silent.render(&[Message::user("Hi")], true).unwrap_err();
        assert!(err.to_string().contains("rendered no text"), "{err}");
    }

    #[test]
    fn a_long_conversation_stays_inside_the_fuel() {
        let messages: Vec<Message> = (0..10_000)
            .map(|i| Message::new(["user", "assistant"][i % 2], format!("message {i}")))
            .collect();
        let started = std::time::Instant::now();
        let prompt = smollm().render(&messages, true).unwrap();
        eprintln!("10 000 messages rendered in {:?}", started.elapsed());
        assert!(prompt.contains("message 9999"));
    }

    #[test]
    fn smollm_template_renders_a_question() {
        let template = smollm();
        let prompt = template.render(&[Message::user(QUESTION)], true).unwrap();
        println!("{prompt}");
        assert!(
            prompt.contains(&format!("<|im_start|>user\n{QUESTION}<|im_end|>\n")),
            "{prompt}"
        );
        assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt}");
        // SmolLM2 inserts a default system prompt when the conversation has none.
        assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
        assert_eq!(template.bos_token(), "<|im_start|>");
        assert_eq!(template.eos_token(), "<|im_end|>");

        let without = template.render(&[Message::user(QUESTION)], false).unwrap();
        assert!(without.ends_with("<|im_end|>\n"), "{without}");
    }

    /// A final assistant message is continued: the text ends with its content, where a new turn
    /// would have opened, and the template's variables take `kwargs`.
    #[test]
    fn the_last_assistant_message_is_continued_and_kwargs_reach_the_template() {
        let template = smollm();
        let messages = [
            Message::user(QUESTION),
            Message::assistant("The capital is "),
        ];
        let continuing = RenderOptions {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        let text = template.render_with(&messages, &continuing).unwrap();
        let whole = template.render(&messages, false).unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\nThe capital is"),
            "{text}"
        );
        assert!(
            whole.starts_with(&text) && whole.len() > text.len(),
            "{whole}"
        );
        for bad in [
            &messages[..1],
            &[Message::user(QUESTION), Message::assistant(" ")][..],
        ] {
            let e = template.render_with(bad, &continuing).unwrap_err();
            assert!(matches!(e, ChatError::Continue(_)), "{e}");
        }
        let trims = ChatTemplate::new(
            "{% for m in messages %}[{{ m.content | trim }}]{% endfor %}{{ flavour }}",
            "",
            "",
        )
        .unwrap();
        let mut options = continuing.clone();
        options.kwargs.insert("flavour".into(), "!".into());
        let prefix = [Message::user("a"), Message::assistant("b  ")];
        assert_eq!(trims.render_with(&prefix, &options).unwrap(), "[a][b");
        options.continue_final_message = false;
        assert_eq!(trims.render_with(&prefix, &options).unwrap(), "[a][b]!");
        let hides = ChatTemplate::new("{% for m in messages %}x{% endfor %}", "", "").unwrap();
        let e = hides.render_with(&prefix, &continuing).unwrap_err();
        assert!(e.to_string().contains("as is"), "{e}");
    }

    #[test]
    fn smollm_template_renders_turns_in_order() {
        let template = smollm();
        let messages = [
            Message::system("Be brief."),
            Message::user(QUESTION),
            Message::assistant("Paris."),
            Message::user("And of Italy?"),
        ];
        let prompt = template.render(&messages, true).unwrap();
        let expected = "<|im_start|>system\nBe brief.<|im_end|>\n\
            <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
            <|im_start|>assistant\nParis.<|im_end|>\n\
            <|im_start|>user\nAnd of Italy?<|im_end|>\n\
            <|im_start|>assistant\n";
        assert_eq!(prompt, expected);
    }

    #[test]
    fn smollm_prompt_tokenizes_with_single_special_ids() {
        let (template, metadata) = (smollm(), real_gguf_metadata());
        let tokenizer = crate::tokenizer::Tokenizer::from_gguf_metadata(metadata).unwrap();
        let prompt = template.render(&[Message::user(QUESTION)], true).unwrap();
        let ids = tokenizer.encode(&prompt, false).unwrap();
        let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
        assert_eq!(
            ids.iter().filter(|&&id| id == im_start).count(),
            3,
            "system, user, assistant"
        );
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), prompt);
    }

    #[test]
    fn chatml_fallback() {
        let template = ChatTemplate::chatml();
        let prompt = template
            .render(&[Message::user("Hi"), Message::assistant("Hello!")], true)
            .unwrap();
        assert_eq!(prompt, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n");
        assert_eq!(template.render(&[], false).unwrap(), "");
    }

    /// Llama 3's template, abridged: BOS first, header tokens around each role, `.strip()` on content.
    const LLAMA3: &str = r#"{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"#;

    fn write_config(dir: &Path, config: serde_json::Value) -> PathBuf {
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        path
    }

    #[test]
    fn llama3_template_from_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            serde_json::json!({
                "bos_token": "<|begin_of_text|>",
                "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": true},
                "chat_template": LLAMA3,
            }),
        );
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(template.eos_token(), "<|eot_id|>");
        let prompt = template
            .render(
                &[Message::system("Be brief."), Message::user("  Hi there \n")],
                true,
            )
            .unwrap();
        assert_eq!(
            prompt,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );

        // raise_exception fails the render with the template's own message.
        let err = template
            .render(&[Message::new("tool", "{}")], false)
            .unwrap_err();
        assert!(
            matches!(&err, ChatError::Render(m) if m.contains("Unknown role: tool")),
            "{err}"
        );
    }

    #[test]
    fn named_templates_pycompat_and_sidecar_jinja() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            dir.path(),
            serde_json::json!({
                "bos_token": null,
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{% for m in messages %}{% if m.content.startswith('/') %}cmd:{% endif %}{{ m.content.strip().upper() }};{% endfor %}"},
                ],
            }),
        );
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(template.bos_token(), "");
        let rendered = template
            .render(&[Message::user(" hi "), Message::user("/quit")], false)
            .unwrap();
        assert_eq!(rendered, "HI;cmd:/QUIT;");

        // No chat_template in the config: the chat_template.jinja beside it, else none at all.
        let path = write_config(dir.path(), serde_json::json!({"eos_token": "</s>"}));
        assert!(ChatTemplate::from_tokenizer_config(&path)
            .unwrap()
            .is_none());
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0].content }}{{ eos_token }}",
        )
        .unwrap();
        let template = ChatTemplate::from_tokenizer_config(&path).unwrap().unwrap();
        assert_eq!(
            template.render(&[Message::user("x")], false).unwrap(),
            "x</s>"
        );

        let path = write_config(dir.path(), serde_json::json!({"chat_template": 3}));
        let err = ChatTemplate::from_tokenizer_config(&path).unwrap_err();
        assert!(matches!(err, ChatError::Config { .. }), "{err}");
    }

    #[test]
    fn syntax_errors_are_errors_with_a_line() {
        let source = "{% for message in messages %}\n{{ message.content }\n{% endfor %}";
        let err = ChatTemplate::new(source, "", "").unwrap_err();
        let ChatError::Syntax { line, .. } = &err else {
            panic!("expected a syntax error, got {err}")
        };
        assert_eq!(*line, Some(2), "{err}");
        let text = err.to_string();
        assert!(text.starts_with("syntax error on line 2: "), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");

        let err = ChatTemplate::new("{% if %}", "", "").unwrap_err();
        assert!(matches!(err, ChatError::Syntax { .. }), "{err}");
    }

    #[test]
    fn messages_serialize_as_role_and_content() {
        let json = serde_json::to_value(Message::user("hi")).unwrap();
        assert_eq!(json, serde_json::json!({"role": "user", "content": "hi"}));
        let back: Message = serde_json::from_value(json).unwrap();
        assert_eq!(back, Message::user("hi"));
    }
}
