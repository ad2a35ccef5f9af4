//! The request bodies of `/v1/chat/completions` and `/v1/completions`, parsed and validated into a
//! [`Validated`] request, or an [`ApiError`] that names the field at fault. Unknown fields are
//! ignored, as OpenAI clients expect; known ones that would change the result and that we do not
//! implement are refused by name.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::generator::{ChatMessage, ChatOptions, DrySampling, Sampling};
use crate::tools::{self, Syntax, ToolUse};

/// Both endpoints' fields; which of `messages` / `prompt` is required depends on the endpoint.
#[derive(Debug, Default, Deserialize)]
pub struct RawRequest {
    pub messages: Option<Vec<RawMessage>>,
    pub prompt: Option<Value>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stop: Option<Value>,
    pub temperature: Option<f32>,
    /// llama.cpp's dynamic temperature.
    pub dynatemp_range: Option<f32>,
    pub dynatemp_exponent: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    /// llama.cpp's and Hugging Face's typical-p, llama.cpp's XTC.
    pub typical_p: Option<f32>,
    pub top_n_sigma: Option<f32>,
    pub xtc_probability: Option<f32>,
    pub xtc_threshold: Option<f32>,
    pub seed: Option<u64>,
    /// Ours: false drafts this request with the draft model alone, without prompt lookup.
    pub prompt_lookup: Option<bool>,
    /// llama.cpp's: false prefills the whole prompt, not keeping what the previous request left
    /// cached (the tokens are the same either way).
    pub cache_prompt: Option<bool>,
    /// OpenAI's, applied as llama.cpp's server applies them: over the last `repeat_last_n`
    /// tokens, the prompt's included.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// llama.cpp's (vLLM calls it `repetition_penalty`; either is taken).
    pub repeat_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// llama.cpp's: the penalties' window (default 64; -1: the whole sequence; 0: no penalty).
    pub repeat_last_n: Option<i64>,
    /// llama.cpp's DRY.
    pub dry_multiplier: Option<f32>,
    pub dry_base: Option<f32>,
    pub dry_allowed_length: Option<u64>,
    pub dry_penalty_last_n: Option<i64>,
    pub dry_sequence_breakers: Option<Vec<String>>,
    /// OpenAI's: token ids (as strings) to a bias in [-100, 100] added to their logits.
    pub logit_bias: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's: how many choices (default 1, at most [`MAX_CHOICES`]).
    pub n: Option<u64>,
    /// Chat: true or false, with `top_logprobs` (0 to 20); completions: how many alternatives.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    /// Structured output ([`crate::format`]): OpenAI's `response_format`, llama.cpp's
    /// `json_schema`, vLLM's `guided_*`.
    pub response_format: Option<Value>,
    pub json_schema: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<Value>,
    pub guided_choice: Option<Value>,
    pub guided_grammar: Option<Value>,
    pub structured_outputs: Option<Value>,
    /// llama.cpp's grammar (GBNF, or Lark after `%llguidance`).
    pub grammar: Option<Value>,
    /// Chat's rendering, as vLLM's (`add_generation_prompt`, `continue_final_message`) and
    /// both servers' `chat_template_kwargs` ([`chat_options`]).
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template_kwargs: Option<Value>,
    /// Chat's tool calling ([`crate::tools`]).
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// llama.cpp's `/completion`: the generated token ids in the answer.
    pub return_tokens: Option<bool>,
    // Known but not implemented: refused when they would change the result.
    pub best_of: Option<u64>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<Value>,
    /// Chat's audio output: refused unless the output is text only ([`refuse_audio`]).
    pub modalities: Option<Value>,
    pub audio: Option<Value>,
    /// llama.cpp's samplers we do not have (0 and 1 are their "off").
    pub mirostat: Option<Value>,
    pub tfs_z: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct RawMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    /// An assistant turn's calls.
    #[serde(default)]
    pub tool_calls: Value,
    /// A `tool` turn's call.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// What to tokenize.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Chat(Vec<ChatMessage>, ChatOptions),
    Text(String),
    Tokens(Vec<u32>),
}

/// A request that passed validation (the prompt is not tokenized yet).
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub endpoint: Endpoint,
    pub input: Input,
    /// None: as many as the context allows.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub sampling: Sampling,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices to generate (OpenAI's `n`), one after another through the model.
    pub n: usize,
    /// Completions' `echo`: each choice's text starts with the prompt's (and its
    /// log-probabilities, when asked for, with the prompt tokens').
    pub echo: bool,
    /// Chat's tools: the replies are read back as calls or content.
    pub tools: Option<ToolUse>,
    /// llama.cpp's `return_tokens`: the generated token ids in the answer.
    pub return_tokens: bool,
    /// `max_tokens: 0` with `echo`: the prompt scored, nothing generated (legacy OpenAI's way,
    /// and lm-eval-harness's for log-likelihoods). The pair runs one step, whose token the
    /// answer leaves out; `max_tokens` is then 1.
    pub score_only: bool,
}

/// The most choices one request may ask for (`n`): each is a whole generation, run in turn.
pub const MAX_CHOICES: usize = 16;

/// The most alternatives a request may ask for per token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Parses a body; a syntax or type error names where it is.
pub fn parse(body: &[u8]) -> Result<RawRequest, ApiError> {
    let value = json_object(body, "{\"messages\": [...]}")?;
    typed(value)
}

/// A body that must be a JSON object (`example` shows one in the error).
pub(crate) fn json_object(body: &[u8], example: &str) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    match value.is_object() {
        true => Ok(value),
        false => Err(ApiError::bad_request(format!(
            "the body must be a JSON object, such as {example}"
        ))),
    }
}

/// `value` as `T`; a type error names the field.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad_param(&path, format!("{path}: {}", e.into_inner()))
    })
}

/// Parses a body of llama.cpp's `/completion`: its names mapped onto the OpenAI fields
/// (`n_predict` to `max_tokens`, which it wins over, -1 none; `n_probs` to completions'
/// `logprobs`; `logit_bias` as
/// `[[id, bias], ...]` pairs, `false` banning, to the object form), and what it does not have
/// (`n`, `echo`, chat's fields) left out. Validate it as a completion.
pub fn parse_llama(body: &[u8]) -> Result<RawRequest, ApiError> {
    let mut value = json_object(body, "{\"prompt\": \"...\"}")?;
    let o = value.as_object_mut().expect("checked to be an object");
    for key in ["n", "echo", "best_of", "messages", "tools", "tool_choice"] {
        o.remove(key);
    }
    // `n_predict` wins over `max_tokens` (llama.cpp reads both).
    match o.remove("n_predict") {
        None | Some(Value::Null) => {}
        Some(n) if n == -1 => {
            o.remove("max_tokens");
        }
        // llama.cpp takes 0 to only evaluate the prompt; here a request must generate, and the
        // error names the field the client sent.
        Some(n) if n == 0 => {
            return Err(ApiError::bad_param(
                "n_predict",
                "n_predict is 0: nothing would be generated; pass at least 1, or -1 for as many \
                 as fit",
            ))
        }
        Some(n) if n.as_u64().is_some() => {
            o.insert("max_tokens".into(), n);
        }
        Some(n) => {
            return Err(ApiError::bad_param(
                "n_predict",
                format!("n_predict {n} must be -1 (as many as fit) or a whole number"),
            ))
        }
    }
    if let Some(k) = o
        .remove("n_probs")
        .filter(|k| k.as_u64().is_some_and(|k| k > 0))
    {
        o.insert("logprobs".into(), k);
    }
    if let Some(Value::Array(pairs)) = o.get("logit_bias") {
        let bad = || {
            ApiError::bad_param(
                "logit_bias",
                "logit_bias must be [[token id, bias or false], ...] or an object of ids to biases",
            )
        };
        let mut map = serde_json::Map::new();
        for pair in pairs {
            let (Some(id), Some(bias)) = (pair[0].as_u64(), pair.get(1)) else {
                return Err(bad());
            };
            let bias = match bias {
                Value::Bool(false) => Value::from(-100.0),
                b if b.is_number() => b.clone(),
                _ => return Err(bad()),
            };
            map.insert(id.to_string(), bias);
        }
        o.insert("logit_bias".into(), Value::Object(map));
    }
    typed(value)
}

/// Validates a parsed body for `endpoint`; tool calls are written in `syntax` (the chat
/// template's).
pub fn validate(
    raw: RawRequest,
    endpoint: Endpoint,
    syntax: Syntax,
) -> Result<Validated, ApiError> {
    refuse_unsupported(&raw)?;
    refuse_audio(&raw)?;
    let echo = echo(&raw, endpoint)?;
    let logprobs = logprobs(&raw, endpoint)?;
    let tools = tools::tool_use(
        raw.tools.as_ref(),
        raw.tool_choice.as_ref(),
        raw.parallel_tool_calls,
    )?
    .map(|t| t.in_syntax(syntax));
    let grammar = match (crate::format::output_grammar(&raw)?, &tools) {
        (Some(g), Some(_)) => {
            return Err(ApiError::bad_param(
                g.param,
                format!("{} and tools both constrain the answer: give one", g.param),
            ))
        }
        (g, None) => g,
        (None, Some(t)) => Some(t.grammar()),
    };
    let sampling = Sampling {
        prompt_logprobs: echo && logprobs.is_some(),
        logprobs,
        grammar,
        ..sampling(&raw)?
    };
    let input = match endpoint {
        Endpoint::Chat => {
            let mut options = chat_options(
                raw.messages.as_deref().unwrap_or_default(),
                tools.is_some(),
                (raw.add_generation_prompt, raw.continue_final_message),
                raw.chat_template_kwargs,
            )?;
            let messages = messages_in(raw.messages, syntax)?;
            let messages = match &tools {
                Some(t) if syntax.native() => {
                    (options.template_kwargs).insert("tools".into(), t.template_tools());
                    messages
                }
                t => with_tools(messages, t.as_ref()),
            };
            Input::Chat(messages, options)
        }
        Endpoint::Completions if tools.is_some() => {
            return Err(ApiError::bad_param(
                "tools",
                "tools is a /v1/chat/completions parameter; remove it",
            ))
        }
        Endpoint::Completions => prompt(raw.prompt)?,
    };
    let zero = matches!(
        (raw.max_completion_tokens, raw.max_tokens),
        (Some(0), _) | (None, Some(0))
    );
    let score_only = zero && echo && raw.stream != Some(true);
    let max_tokens = match (raw.max_completion_tokens, raw.max_tokens) {
        _ if score_only => Some(1),
        (Some(0), _) | (None, Some(0)) => {
            return Err(ApiError::bad_param(
                "max_tokens",
                "max_tokens is 0: nothing would be generated; pass at least 1 (or, on \
                 /v1/completions, echo without stream to score the prompt)",
            ))
        }
        (Some(n), _) | (None, Some(n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        (None, None) => None,
    };
    let n = match raw.n.unwrap_or(1) {
        n @ 1.. if n as usize <= MAX_CHOICES => n as usize,
        n => {
            return Err(ApiError::bad_param(
                "n",
                format!(
                    "n {n} must be from 1 to {MAX_CHOICES} (the choices run one after another)"
                ),
            ))
        }
    };
    Ok(Validated {
        n,
        echo,
        score_only,
        tools,
        return_tokens: raw.return_tokens.unwrap_or(false),
        endpoint,
        input,
        max_tokens,
        stop: stop(raw.stop)?,
        sampling,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Completions' `echo`, checked: not on chat (OpenAI's chat has none), and streamed only
/// without `logprobs` (the prompt's come with the generation's end, not before its first token).
fn echo(r: &RawRequest, endpoint: Endpoint) -> Result<bool, ApiError> {
    if r.echo != Some(true) {
        return Ok(false);
    }
    let refuse = |m: &str| Err(ApiError::bad_param("echo", m));
    let logprobs = r
        .logprobs
        .as_ref()
        .is_some_and(|l| !l.is_null() && l != false);
    match (endpoint, r.stream == Some(true) && logprobs) {
        (Endpoint::Chat, _) => refuse("echo is a /v1/completions parameter; remove it"),
        (_, true) => {
            refuse("echo with stream and logprobs is not implemented; drop one of the three")
        }
        _ => Ok(true),
    }
}

fn refuse_unsupported(r: &RawRequest) -> Result<(), ApiError> {
    let set = |v: &Option<Value>| match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let refused = [
        ("best_of", r.best_of.is_some_and(|n| n != 1)),
        (
            "mirostat",
            set(&r.mirostat) && r.mirostat != Some(Value::from(0)),
        ),
        ("tfs_z", r.tfs_z.is_some_and(|z| z != 1.0)),
        ("functions", set(&r.functions)),
        ("function_call", set(&r.function_call)),
        ("suffix", set(&r.suffix)),
    ];
    let names: Vec<&str> = refused.iter().filter(|r| r.1).map(|r| r.0).collect();
    match names.first() {
        None => Ok(()),
        Some(first) => Err(ApiError::bad_param(
            first,
            format!(
                "unsupported parameter{}: {} (not implemented here; remove {})",
                if names.len() > 1 { "s" } else { "" },
                names.join(", "),
                if names.len() > 1 { "them" } else { "it" },
            ),
        )),
    }
}

/// Refuses audio output (OpenAI's `modalities` with anything but `"text"`, an `audio` object):
/// answered silently in text, the client would wait for audio that never comes.
fn refuse_audio(r: &RawRequest) -> Result<(), ApiError> {
    let text_only = match &r.modalities {
        None | Some(Value::Null) => true,
        Some(Value::Array(m)) => m.iter().all(|m| m == "text"),
        Some(_) => false,
    };
    if !text_only {
        let given = r
            .modalities
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_default();
        return Err(ApiError::bad_param(
            "modalities",
            format!("modalities {given}: only text output is implemented; pass [\"text\"] or leave modalities out"),
        ));
    }
    if r.audio.as_ref().is_some_and(|a| !a.is_null()) {
        return Err(ApiError::bad_param(
            "audio",
            "audio: audio output is not implemented; remove audio",
        ));
    }
    Ok(())
}

/// The conversation, an assistant's calls and the tools' results written in the generic format.
pub(crate) fn messages(raw: Option<Vec<RawMessage>>) -> Result<Vec<ChatMessage>, ApiError> {
    messages_in(raw, Syntax::Generic)
}

/// The conversation for a template of `syntax`: a native one takes an assistant's calls and the
/// `tool` turns as they are; the generic format writes them as text.
fn messages_in(raw: Option<Vec<RawMessage>>, syntax: Syntax) -> Result<Vec<ChatMessage>, ApiError> {
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
fn with_tools(mut messages: Vec<ChatMessage>, tools: Option<&ToolUse>) -> Vec<ChatMessage> {
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

fn prompt(v: Option<Value>) -> Result<Input, ApiError> {
    let bad = || {
        ApiError::bad_param(
            "prompt",
            "prompt must be a non-empty string or list of token ids, or a list of one of those",
        )
    };
    let input = match v.ok_or_else(bad)? {
        Value::String(s) => Input::Text(s),
        // OpenAI's batch forms, `string[]` and `int[][]`, holding one prompt (lm-eval-harness
        // sends `[[ids]]`).
        Value::Array(mut a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => {
            match a.pop() {
                Some(Value::String(s)) => Input::Text(s),
                Some(Value::Array(ids)) => Input::Tokens(token_ids(&ids).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        Value::Array(a) if a.len() > 1 && a.iter().all(|p| p.is_string() || p.is_array()) => {
            return Err(ApiError::bad_param(
                "prompt",
                "several prompts in one request are not supported: send one request per prompt",
            ))
        }
        Value::Array(a) => Input::Tokens(token_ids(&a).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    match &input {
        Input::Text(s) if s.is_empty() => Err(bad()),
        Input::Tokens(t) if t.is_empty() => Err(bad()),
        _ => Ok(input),
    }
}

/// A list of token ids, if every item is one.
fn token_ids(a: &[Value]) -> Option<Vec<u32>> {
    (a.iter())
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

fn stop(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::bad_param("stop", "stop must be a string or a list of strings");
    let stops = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

fn sampling(r: &RawRequest) -> Result<Sampling, ApiError> {
    let temperature = r.temperature.unwrap_or(0.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(ApiError::bad_param(
            "temperature",
            format!("temperature {temperature} must be 0 (greedy) or more"),
        ));
    }
    let top_p = r.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param(
            "top_p",
            format!("top_p {top_p} must be in (0, 1] (1: off)"),
        ));
    }
    let min_p = r.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad_param(
            "min_p",
            format!("min_p {min_p} must be in [0, 1] (0: off)"),
        ));
    }
    let unit = |name: &str, v: Option<f32>, default: f32, open_at_zero: bool| {
        let x = v.unwrap_or(default);
        let ok = if open_at_zero {
            x > 0.0 && x <= 1.0
        } else {
            (0.0..=1.0).contains(&x)
        };
        if ok {
            Ok(x)
        } else {
            let range = if open_at_zero { "(0, 1]" } else { "[0, 1]" };
            Err(ApiError::bad_param(
                name,
                format!("{name} {x} must be in {range}"),
            ))
        }
    };
    let typical_p = unit("typical_p", r.typical_p, 1.0, true)?;
    let top_n_sigma = r.top_n_sigma.unwrap_or(0.0);
    if !top_n_sigma.is_finite() {
        return Err(ApiError::bad_param(
            "top_n_sigma",
            format!("top_n_sigma {top_n_sigma} must be a number (0 or less: off)"),
        ));
    }
    let dynatemp_range = r.dynatemp_range.unwrap_or(0.0);
    if !(dynatemp_range.is_finite() && dynatemp_range >= 0.0) {
        return Err(ApiError::bad_param(
            "dynatemp_range",
            format!("dynatemp_range {dynatemp_range} must be 0 (off) or more"),
        ));
    }
    let dynatemp_exponent = r.dynatemp_exponent.unwrap_or(1.0);
    if !(dynatemp_exponent.is_finite() && dynatemp_exponent > 0.0) {
        return Err(ApiError::bad_param(
            "dynatemp_exponent",
            format!("dynatemp_exponent {dynatemp_exponent} must be more than 0"),
        ));
    }
    let xtc_probability = unit("xtc_probability", r.xtc_probability, 0.0, false)?;
    let xtc_threshold = unit("xtc_threshold", r.xtc_threshold, 0.1, false)?;
    // Like llama.cpp: zero or negative top_k means no top-k.
    let top_k = r.top_k.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32;
    let (repeat_penalty, frequency_penalty, presence_penalty, repeat_last_n) = penalties(r)?;
    Ok(Sampling {
        temperature,
        dynatemp_range,
        dynatemp_exponent,
        top_k,
        top_p,
        min_p,
        top_n_sigma,
        typical_p,
        xtc_probability,
        xtc_threshold,
        seed: r.seed,
        repeat_penalty,
        frequency_penalty,
        presence_penalty,
        repeat_last_n,
        dry: dry(r)?,
        logit_bias: logit_bias(r.logit_bias.as_ref())?,
        // Per endpoint, and checked apart: `validate` sets them.
        logprobs: None,
        prompt_logprobs: false,
        grammar: None,
        prompt_lookup: r.prompt_lookup.unwrap_or(true),
        cache_prompt: r.cache_prompt.unwrap_or(true),
    })
}

/// OpenAI's log-probability options, checked: chat's `logprobs` (true or false) and
/// `top_logprobs` (alternatives per token, 0 to [`MAX_TOP_LOGPROBS`]; only with `logprobs`),
/// completions' `logprobs` (alternatives per token). `Some(k)` when asked for.
fn logprobs(r: &RawRequest, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let given = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
    let count = |name: &str, v: Value| {
        (v.as_u64())
            .filter(|&k| k as usize <= MAX_TOP_LOGPROBS)
            .map(|k| k as usize)
            .ok_or_else(|| {
                ApiError::bad_param(
                    name,
                    format!("{name} must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {v}"),
                )
            })
    };
    if endpoint == Endpoint::Completions {
        return match given(&r.logprobs) {
            None | Some(Value::Bool(false)) => Ok(None),
            Some(v) => count("logprobs", v).map(Some),
        };
    }
    let on = match given(&r.logprobs) {
        None => false,
        Some(Value::Bool(on)) => on,
        Some(v) => {
            return Err(ApiError::bad_param(
                "logprobs",
                format!("logprobs must be true or false, got {v}"),
            ))
        }
    };
    match (
        on,
        given(&r.top_logprobs)
            .map(|v| count("top_logprobs", v))
            .transpose()?,
    ) {
        (true, k) => Ok(Some(k.unwrap_or(0))),
        (false, None | Some(0)) => Ok(None),
        (false, Some(_)) => Err(ApiError::bad_param(
            "top_logprobs",
            "top_logprobs needs \"logprobs\": true",
        )),
    }
}

/// OpenAI's `logit_bias`, checked: token ids (decimal strings) to numbers in [-100, 100]; the ids
/// ascending. Whether they are in the vocabulary is the handler's check (it has the codec).
fn logit_bias(v: Option<&Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::bad_param("logit_bias", m);
    let map =
        match v {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(bad(
                "logit_bias must be an object of token ids to biases, such as {\"15043\": -100}"
                    .into(),
            )),
        };
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let token = (key.parse::<u32>())
            .map_err(|_| bad(format!("logit_bias: {key:?} is not a token id")))?;
        let bias = (value.as_f64())
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                bad(format!(
                    "logit_bias: the bias of token {key} must be a number in [-100, 100], got {value}"
                ))
            })?;
        out.push((token, bias as f32));
    }
    out.sort_unstable_by_key(|&(token, _)| token);
    Ok(out)
}

/// The repeat, frequency and presence penalties and their window, checked.
fn dry(r: &RawRequest) -> Result<DrySampling, ApiError> {
    let d = DrySampling::default();
    let multiplier = r.dry_multiplier.unwrap_or(d.multiplier);
    if !(multiplier >= 0.0 && multiplier.is_finite()) {
        return Err(ApiError::bad_param(
            "dry_multiplier",
            format!("dry_multiplier {multiplier} must be 0 (off) or more"),
        ));
    }
    let base = r.dry_base.unwrap_or(d.base);
    if !(1.0..=4.0).contains(&base) {
        return Err(ApiError::bad_param(
            "dry_base",
            format!("dry_base {base} must be in [1, 4]"),
        ));
    }
    let last_n = match r.dry_penalty_last_n.unwrap_or(-1) {
        -1 => u32::MAX,
        n @ 0.. => u32::try_from(n).unwrap_or(u32::MAX),
        n => {
            return Err(ApiError::bad_param(
                "dry_penalty_last_n",
                format!("dry_penalty_last_n {n} must be -1 (the whole sequence) or more"),
            ))
        }
    };
    Ok(DrySampling {
        multiplier,
        base,
        allowed_length: u32::try_from(r.dry_allowed_length.unwrap_or(2)).unwrap_or(u32::MAX),
        last_n,
        sequence_breakers: r.dry_sequence_breakers.clone(),
        breakers: Vec::new(),
    })
}

fn penalties(r: &RawRequest) -> Result<(f32, f32, f32, u32), ApiError> {
    let (name, repeat) = match (r.repeat_penalty, r.repetition_penalty) {
        (Some(p), _) => ("repeat_penalty", p),
        (None, Some(p)) => ("repetition_penalty", p),
        (None, None) => ("repeat_penalty", 1.0),
    };
    if !(repeat > 0.0 && repeat.is_finite()) {
        return Err(ApiError::bad_param(
            name,
            format!("{name} {repeat} must be more than 0 (1: off)"),
        ));
    }
    let additive = |name: &str, value: Option<f32>| {
        let v = value.unwrap_or(0.0);
        match (-2.0..=2.0).contains(&v) {
            true => Ok(v),
            false => Err(ApiError::bad_param(
                name,
                format!("{name} {v} must be in [-2, 2] (0: off)"),
            )),
        }
    };
    let frequency = additive("frequency_penalty", r.frequency_penalty)?;
    let presence = additive("presence_penalty", r.presence_penalty)?;
    let last_n = match r.repeat_last_n.unwrap_or(64) {
        -1 => u32::MAX,
        n @ 0.. => u32::try_from(n).unwrap_or(u32::MAX),
        n => {
            return Err(ApiError::bad_param(
                "repeat_last_n",
                format!("repeat_last_n {n} must be -1 (the whole sequence) or more"),
            ))
        }
    };
    Ok((repeat, frequency, presence, last_n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, endpoint: Endpoint) -> Result<Validated, ApiError> {
        validate(parse(body.as_bytes())?, endpoint, Syntax::Generic)
    }

    fn err(body: &str, endpoint: Endpoint) -> ApiError {
        check(body, endpoint).expect_err(body)
    }

    #[test]
    fn a_chat_request_with_every_parameter() {
        let v = check(
            r#"{"model":"x","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi "},{"type":"text","text":"there"}]}],
                "max_completion_tokens":7,"max_tokens":99,"stop":"\n","temperature":0.5,"dynatemp_range":0.25,
                "top_p":0.9,"top_k":-1,"min_p":0.1,"typical_p":0.95,"xtc_probability":0.5,"seed":42,"prompt_lookup":false,"cache_prompt":false,"stream":true,
                "frequency_penalty":0.5,"presence_penalty":-0.25,"repetition_penalty":1.1,"repeat_last_n":-1,
                "dry_multiplier":0.8,"dry_allowed_length":3,"dry_penalty_last_n":100,"dry_sequence_breakers":["\n"],
                "logit_bias":{"198":-100,"15":2.5},"stream_options":{"include_usage":true},"n":1,"logprobs":false,
                "unknown_field":{"ignored":true}}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(
            v.input,
            Input::Chat(
                vec![
                    ChatMessage::text("system", "be brief"),
                    ChatMessage::text("user", "hi there"),
                ],
                ChatOptions::default()
            )
        );
        assert_eq!(v.max_tokens, Some(7), "max_completion_tokens wins");
        assert_eq!(v.stop, vec!["\n".to_string()]);
        assert_eq!(
            v.sampling,
            Sampling {
                temperature: 0.5,
                dynatemp_range: 0.25,
                dynatemp_exponent: 1.0,
                top_k: 0,
                top_p: 0.9,
                min_p: 0.1,
                top_n_sigma: 0.0,
                typical_p: 0.95,
                xtc_probability: 0.5,
                xtc_threshold: 0.1,
                seed: Some(42),
                repeat_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: -0.25,
                repeat_last_n: u32::MAX,
                dry: DrySampling {
                    multiplier: 0.8,
                    allowed_length: 3,
                    last_n: 100,
                    sequence_breakers: Some(vec!["\n".into()]),
                    ..DrySampling::default()
                },
                logit_bias: vec![(15, 2.5), (198, -100.0)],
                logprobs: None,
                prompt_logprobs: false,
                grammar: None,
                prompt_lookup: false,
                cache_prompt: false,
            }
        );
        assert!(v.stream && v.include_usage && v.n == 1);
    }

    #[test]
    fn logprobs_per_endpoint() {
        let chat = |extra: &str| {
            let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
            check(&body, Endpoint::Chat).unwrap().sampling.logprobs
        };
        assert_eq!(chat(""), None);
        assert_eq!(chat(r#","logprobs":false,"top_logprobs":0"#), None);
        assert_eq!(chat(r#","logprobs":true"#), Some(0));
        assert_eq!(chat(r#","logprobs":true,"top_logprobs":20"#), Some(20));
        let completion = |extra: &str| {
            let body = format!(r#"{{"prompt":"x"{extra}}}"#);
            check(&body, Endpoint::Completions)
                .unwrap()
                .sampling
                .logprobs
        };
        assert_eq!(completion(r#","logprobs":null"#), None);
        assert_eq!(completion(r#","logprobs":3"#), Some(3));
        let e = err(r#"{"prompt":"x","logprobs":-1}"#, Endpoint::Completions);
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn n_choices_up_to_the_limit() {
        let v = check(r#"{"prompt":"hi","n":16}"#, Endpoint::Completions).unwrap();
        assert_eq!(v.n, MAX_CHOICES);
        let v = check(r#"{"prompt":"hi"}"#, Endpoint::Completions).unwrap();
        assert_eq!(v.n, 1);
    }

    #[test]
    fn defaults_are_greedy_with_prompt_lookup() {
        let v = check(r#"{"prompt":"hi"}"#, Endpoint::Completions).unwrap();
        assert_eq!(v.sampling, Sampling::default());
        assert!(v.sampling.prompt_lookup && v.sampling.cache_prompt);
        assert_eq!(v.sampling.temperature, 0.0);
        let e = err(
            r#"{"prompt":"hi","prompt_lookup":"no"}"#,
            Endpoint::Completions,
        );
        assert!(format!("{e:?}").contains("prompt_lookup"), "{e:?}");
    }

    #[test]
    fn completion_prompts() {
        let text = |b: &str| check(b, Endpoint::Completions).map(|v| v.input);
        assert_eq!(text(r#"{"prompt":"abc"}"#), Ok(Input::Text("abc".into())));
        assert_eq!(text(r#"{"prompt":["abc"]}"#), Ok(Input::Text("abc".into())));
        assert_eq!(
            text(r#"{"prompt":[1,2,3]}"#),
            Ok(Input::Tokens(vec![1, 2, 3]))
        );
        // A list of one token list, as lm-eval-harness sends.
        assert_eq!(
            text(r#"{"prompt":[[504,6355,314]]}"#),
            Ok(Input::Tokens(vec![504, 6355, 314]))
        );
        for bad in [
            r#"{"prompt":""}"#,
            r#"{"prompt":[]}"#,
            r#"{"prompt":[[]]}"#,
            r#"{"prompt":[[1,"a"]]}"#,
            r#"{"prompt":[[1,[2]]]}"#,
            r#"{"prompt":[1,[2]]}"#,
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":[[1],[2]]}"#,
            r#"{"prompt":["a",[2]]}"#,
            r#"{"prompt":7}"#,
            r#"{}"#,
        ] {
            assert_eq!(
                err(bad, Endpoint::Completions).param.as_deref(),
                Some("prompt")
            );
        }
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (r#"{"messages":[]}"#, "messages"),
            (r#"{"max_tokens":1}"#, "messages"),
            (r#"{"messages":"hi"}"#, "messages"),
            (
                r#"{"messages":[{"role":"function","content":"x"}]}"#,
                "messages[0].role",
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0].content",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-3}"#,
                "max_tokens",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"min_p":2}"#,
                "min_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"typical_p":0}"#,
                "typical_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"dry_multiplier":-1}"#,
                "dry_multiplier",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"dry_base":0.5}"#,
                "dry_base",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"xtc_threshold":-1}"#,
                "xtc_threshold",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
                "stop",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"frequency_penalty":2.5}"#,
                "frequency_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":-3}"#,
                "presence_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"repeat_penalty":0}"#,
                "repeat_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"repetition_penalty":-1}"#,
                "repetition_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"repeat_last_n":-2}"#,
                "repeat_last_n",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "stream",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":101}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"five":1}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":"up"}}"#,
                "logit_bias",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":[5]}"#,
                "logit_bias",
            ),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":0}"#, "n"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":3}"#,
                "logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":21}"#,
                "top_logprobs",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#,
                "n",
            ),
        ];
        for (body, param) in cases {
            let e = err(body, Endpoint::Chat);
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            assert!(
                e.message.contains(param.split('[').next().unwrap()),
                "{e:?}"
            );
        }
    }

    #[test]
    fn malformed_json_is_a_400_that_says_so() {
        for body in ["{", "not json", "[1,2]", ""] {
            let e = err(body, Endpoint::Chat);
            assert_eq!(e.status, 400);
            assert!(e.message.contains("JSON"), "{body}: {e:?}");
        }
    }

    /// Tools: their description ends the system message (or is one), their schema is the
    /// grammar, earlier calls and results are written in the reply's format; tools with another
    /// grammar, or on completions, are refused.
    #[test]
    fn tools_shape_the_prompt_and_the_grammar() {
        let tools = r#""tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]"#;
        let turns = r#""messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"x"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",
            "function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}]"#;
        let v = check(&format!("{{{turns},{tools}}}"), Endpoint::Chat).unwrap();
        let Input::Chat(m, _) = &v.input else {
            panic!("{v:?}")
        };
        assert!(
            m[0].content
                .starts_with("Be brief.\n\nYou can call these tools"),
            "{m:?}"
        );
        assert!(m[0].content.contains(
            r#"{"name":"f","parameters":{"type":"object","additionalProperties":false}}"#
        ));
        assert_eq!(
            m[2].content,
            r#"{"tool_calls":[{"name":"f","arguments":{}}]}"#
        );
        assert_eq!(
            (m[3].role.as_str(), m[3].content.as_str()),
            (
                "user",
                r#"{"tool_response":{"content":"1","tool_call_id":"c"}}"#
            )
        );
        assert_eq!(v.sampling.grammar.as_ref().map(|g| g.param), Some("tools"));
        assert!(v.tools.is_some());
        // No system message: one comes first.
        let v = check(
            &format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{tools}}}"#),
            Endpoint::Chat,
        )
        .unwrap();
        let Input::Chat(m, _) = &v.input else {
            panic!("{v:?}")
        };
        assert_eq!((m.len(), m[0].role.as_str()), (2, "system"));
        for (body, endpoint, param) in [
            (
                format!(
                    r#"{{"messages":[{{"role":"user","content":"x"}}],{tools},"guided_regex":"a"}}"#
                ),
                Endpoint::Chat,
                "guided_regex",
            ),
            (
                format!(r#"{{"prompt":"x",{tools}}}"#),
                Endpoint::Completions,
                "tools",
            ),
        ] {
            let e = check(&body, endpoint).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        }
    }

    /// A template with a tool syntax of its own gets the conversation as it came (the calls with
    /// their arguments as objects, the `tool` turn as one) and the tools as its `tools` variable;
    /// no system message describes them, and the grammar is the syntax's.
    #[test]
    fn a_native_tool_syntax_leaves_the_prompt_to_the_template() {
        let body = r#"{"messages":[{"role":"user","content":"x"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function",
            "function":{"name":"f","arguments":"{\"a\": 1}"}}]},{"role":"tool","tool_call_id":"c","content":"1"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}]}"#;
        let v = validate(
            parse(body.as_bytes()).unwrap(),
            Endpoint::Chat,
            Syntax::Hermes,
        )
        .unwrap();
        let Input::Chat(m, options) = &v.input else {
            panic!("{v:?}")
        };
        assert_eq!(m.len(), 3, "no system message added: {m:?}");
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("assistant", "")
        );
        let calls = m[1].tool_calls.as_ref().unwrap();
        assert_eq!(
            calls[0]["function"]["arguments"],
            serde_json::json!({"a": 1})
        );
        assert_eq!(
            (
                m[2].role.as_str(),
                m[2].content.as_str(),
                m[2].tool_call_id.as_deref()
            ),
            ("tool", "1", Some("c"))
        );
        assert_eq!(options.template_kwargs["tools"][0]["function"]["name"], "f");
        let grammar = v.sampling.grammar.as_ref().unwrap();
        assert_eq!(grammar.kind, crate::format::GrammarType::Lark);
        assert!(grammar.text.contains("<tool_call>"), "{}", grammar.text);
        assert_eq!(v.tools.as_ref().map(|t| t.syntax), Some(Syntax::Hermes));
    }

    /// Audio output, asked by either parameter, is a 400 naming it (answered in text, a client
    /// would wait for audio); text output asked explicitly is served.
    #[test]
    fn audio_output_is_refused_by_name() {
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        for (extra, name) in [
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""modalities":["audio"]"#, "modalities"),
            (r#""modalities":"audio""#, "modalities"),
            (r#""audio":{"voice":"alloy","format":"wav"}"#, "audio"),
        ] {
            let e = err(&format!("{{{base},{extra}}}"), Endpoint::Chat);
            assert_eq!(e.param.as_deref(), Some(name), "{extra}");
            assert!(e.message.starts_with(name), "{e:?}");
        }
        let text = format!(r#"{{{base},"modalities":["text"],"audio":null}}"#);
        check(&text, Endpoint::Chat).unwrap();
    }

    #[test]
    fn unsupported_parameters_are_refused_by_name() {
        let base = r#""messages":[{"role":"user","content":"x"}]"#;
        for (extra, name) in [
            (r#""best_of":2"#, "best_of"),
            (r#""suffix":"x""#, "suffix"),
            (r#""mirostat":2"#, "mirostat"),
        ] {
            let e = err(&format!("{{{base},{extra}}}"), Endpoint::Chat);
            assert_eq!(e.param.as_deref(), Some(name), "{extra}");
            assert!(e.message.contains(name), "{e:?}");
        }
        // Their neutral values are accepted.
        check(
            &format!(
                r#"{{{base},"n":1,"logprobs":false,"tools":[],"tool_choice":"none","mirostat":0,"tfs_z":1,
                "response_format":{{"type":"text"}},"presence_penalty":0,"logit_bias":{{}}}}"#
            ),
            Endpoint::Chat,
        )
        .unwrap();
    }
}
