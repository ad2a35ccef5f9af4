//! The request bodies of `/v1/chat/completions` and `/v1/completions`, parsed and validated into a
//! [`Validated`] request, or an [`ApiError`] that names the field at fault. Unknown fields are
//! ignored, as OpenAI clients expect; known ones that would change the result and that we do not
//! implement are refused by name.

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::generator::{ChatMessage, ChatOptions, Sampling};
use crate::tools::{self, Syntax, ToolUse};

mod messages;
mod params;
#[cfg(test)]
mod tests;

pub(crate) use messages::{chat_options, messages};
use messages::{messages_in, with_tools};
use params::{logprobs, sampling};

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
    /// both servers' `chat_template_kwargs` (`chat_options`).
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
    /// Chat's audio output: refused unless the output is text only (`refuse_audio`).
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
    mut raw: RawRequest,
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
    let input = input(&mut raw, endpoint, syntax, tools.as_ref())?;
    let (max_tokens, score_only) = max_tokens(&raw, echo)?;
    let n = choices(raw.n)?;
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

/// The request's input: a chat's messages (with the tools where the template does not take them)
/// and options, or a completion's prompt.
fn input(
    raw: &mut RawRequest,
    endpoint: Endpoint,
    syntax: Syntax,
    tools: Option<&ToolUse>,
) -> Result<Input, ApiError> {
    match endpoint {
        Endpoint::Chat => {
            let mut options = chat_options(
                raw.messages.as_deref().unwrap_or_default(),
                tools.is_some(),
                (raw.add_generation_prompt, raw.continue_final_message),
                raw.chat_template_kwargs.take(),
            )?;
            let messages = messages_in(raw.messages.take(), syntax)?;
            let messages = match tools {
                Some(t) if syntax.native() => {
                    (options.template_kwargs).insert("tools".into(), t.template_tools());
                    messages
                }
                t => with_tools(messages, t),
            };
            Ok(Input::Chat(messages, options))
        }
        Endpoint::Completions if tools.is_some() => Err(ApiError::bad_param(
            "tools",
            "tools is a /v1/chat/completions parameter; remove it",
        )),
        Endpoint::Completions => prompt(raw.prompt.take()),
    }
}

/// The token budget (`None`: up to the context), and whether the request only scores its
/// prompt: a completion with `echo`, not streamed, whose budget is 0 (generating one token that
/// is dropped).
fn max_tokens(raw: &RawRequest, echo: bool) -> Result<(Option<usize>, bool), ApiError> {
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
    Ok((max_tokens, score_only))
}

/// `n`, checked.
fn choices(n: Option<u64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1.. if n as usize <= MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::bad_param(
            "n",
            format!("n {n} must be from 1 to {MAX_CHOICES} (the choices run one after another)"),
        )),
    }
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
