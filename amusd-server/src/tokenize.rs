//! `POST /tokenize` and `POST /detokenize`, in the shapes both llama.cpp's server and vLLM's give
//! them, so a client of either can count and inspect tokens without generating; and llama.cpp's
//! `POST /apply-template`, a chat request's prompt as text.
//!
//! `/tokenize` takes llama.cpp's `content` (special tokens not added unless `add_special`, pieces
//! with `with_pieces`), vLLM's `prompt` (added unless `add_special_tokens` is false) or vLLM's
//! `messages` (the chat template applied, as `/v1/chat/completions` does), and answers `tokens`
//! with vLLM's `count` and `max_model_len`. `/detokenize` takes `tokens` and answers the text as
//! llama.cpp's `content` and vLLM's `prompt`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::generator::Codec;
use crate::request::{self, RawMessage};
use crate::tools::Syntax;

/// `/tokenize`'s body.
#[derive(Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    pub content: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<RawMessage>>,
    pub add_special: Option<bool>,
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub with_pieces: bool,
    /// With `messages`, how they render (as on chat).
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template_kwargs: Option<Value>,
}

/// `/detokenize`'s body.
#[derive(Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Option<Vec<Value>>,
}

/// What to tokenize, checked: exactly one of `content`, `prompt`, `messages`.
enum Input {
    Text {
        text: String,
        add_special: bool,
    },
    Chat(
        Vec<crate::generator::ChatMessage>,
        crate::generator::ChatOptions,
    ),
}

fn input(r: TokenizeRequest) -> Result<Input, ApiError> {
    let given = [
        r.content.is_some(),
        r.prompt.is_some(),
        r.messages.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(ApiError::bad_request(
            "give one of content (llama.cpp), prompt or messages (vLLM) to tokenize",
        ));
    }
    let add = r.add_special.or(r.add_special_tokens);
    Ok(match (r.content, r.prompt, r.messages) {
        // llama.cpp adds no special tokens by default, vLLM does.
        (Some(text), _, _) => Input::Text {
            text,
            add_special: add.unwrap_or(false),
        },
        (_, Some(text), _) => Input::Text {
            text,
            add_special: add.unwrap_or(true),
        },
        (_, _, Some(m)) => {
            let flags = (r.add_generation_prompt, r.continue_final_message);
            let options = request::chat_options(&m, false, flags, r.chat_template_kwargs)?;
            Input::Chat(request::messages(Some(m))?, options)
        }
        _ => unreachable!("exactly one is given"),
    })
}

/// `/tokenize`'s answer (tokenizing is CPU work: the caller runs this off the async threads).
pub fn tokenize(codec: &dyn Codec, r: TokenizeRequest) -> Result<Value, ApiError> {
    let pieces = r.with_pieces;
    let (param, ids) = match input(r)? {
        Input::Text { text, add_special } => ("content", codec.encode(&text, add_special)),
        Input::Chat(m, options) => ("messages", codec.encode_chat(&m, &options)),
    };
    let ids = ids.map_err(|m| ApiError::bad_param(param, format!("{param}: {m}")))?;
    let tokens: Value = if pieces {
        (ids.iter())
            .map(|&id| json!({"id": id, "piece": codec.token_text(id)}))
            .collect()
    } else {
        json!(ids)
    };
    Ok(json!({
        "tokens": tokens,
        "count": ids.len(),
        "max_model_len": codec.context_length(),
    }))
}

/// `/apply-template`'s answer: a chat request's prompt, rendered as `/v1/chat/completions`
/// renders it (its tools too, in the template's syntax), as `{"prompt": ...}`.
pub fn apply_template(codec: &dyn Codec, body: &[u8]) -> Result<Value, ApiError> {
    let syntax = Syntax::of_codec(codec);
    let v = request::validate(request::parse(body)?, request::Endpoint::Chat, syntax)?;
    let request::Input::Chat(messages, options) = v.input else {
        unreachable!("a chat request's input is its messages")
    };
    let prompt = (codec.render_chat(&messages, &options))
        .map_err(|m| ApiError::bad_param("messages", format!("messages: {m}")))?;
    Ok(json!({ "prompt": prompt }))
}

/// `/detokenize`'s answer.
pub fn detokenize(codec: &dyn Codec, r: DetokenizeRequest) -> Result<Value, ApiError> {
    let vocab = codec.vocab_size();
    let bad = |m: String| ApiError::bad_param("tokens", m);
    let values = r
        .tokens
        .ok_or_else(|| bad("tokens is missing: pass a list of token ids".into()))?;
    let ids = (values.iter())
        .map(|v| {
            v.as_u64()
                .filter(|&t| t < vocab as u64)
                .map(|t| t as u32)
                .ok_or_else(|| bad(format!("tokens: {v} is not a token id (0..{vocab})")))
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let mut stream = codec.text_stream();
    let mut text: String = ids.iter().map(|&t| stream.push(t)).collect();
    text.push_str(&stream.finish());
    Ok(json!({ "content": text, "prompt": text }))
}
