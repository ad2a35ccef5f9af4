//! What the server needs from a model: a [`Codec`] (text to token ids and back, shared by every
//! request handler) and a [`Generator`] (the decode loop, owned by the one decode thread).

use std::time::Duration;

/// One message of a chat conversation, as the client sent it (content parts already joined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls, for a chat template with a tool syntax of its own
    /// ([`crate::tools::Syntax`]): OpenAI's shape, each call's arguments an object. Other
    /// templates get calls written into the content.
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn's call, for such a template.
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of text alone.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
        }
    }
}

/// How a conversation becomes the prompt, beyond its messages.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatOptions {
    /// Open an assistant turn after the messages, for the model to write (the usual case).
    pub add_generation_prompt: bool,
    /// The last message is an assistant's turn for the model to go on with (assistant prefill).
    pub continue_final_message: bool,
    /// More variables for the chat template (`chat_template_kwargs`).
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            continue_final_message: false,
            template_kwargs: Default::default(),
        }
    }
}

/// Sampling parameters of one request, validated (temperature 0 is greedy).
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// llama.cpp's dynamic temperature: a range (0: off) and an exponent.
    pub dynatemp_range: f32,
    pub dynatemp_exponent: f32,
    /// 0: off.
    pub top_k: u32,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// llama.cpp's top-n-sigma; 0 or less: off.
    pub top_n_sigma: f32,
    /// 1: off.
    pub typical_p: f32,
    /// XTC: how often it removes the top choices (0: off), and from which probability a token
    /// is one.
    pub xtc_probability: f32,
    pub xtc_threshold: f32,
    /// None when sampling: the generator picks one (and the response cannot be repeated).
    pub seed: Option<u64>,
    /// Penalties of the tokens in the last `repeat_last_n` (`u32::MAX`: all of them), as
    /// llama.cpp's server applies them: 1, 0 and 0 are off.
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub repeat_last_n: u32,
    /// llama.cpp's DRY.
    pub dry: DrySampling,
    /// OpenAI's `logit_bias`: token ids and what their logits gain, before the penalties and the
    /// temperature (ids ascending; the generator refuses more than it can carry).
    pub logit_bias: Vec<(u32, f32)>,
    /// `Some(k)`: report each generated token's log-probability and its position's `k` most
    /// likely tokens' (OpenAI's `logprobs` / `top_logprobs`).
    pub logprobs: Option<usize>,
    /// With `logprobs`: the prompt's tokens' too (completions' `echo`), in [`GenStats`].
    pub prompt_logprobs: bool,
    /// A grammar the answer follows (structured output, [`crate::format`]).
    pub grammar: Option<crate::format::OutputGrammar>,
    /// Whether the draft may run prompt lookup ahead of its model for this request (where it
    /// has one); false drafts with the model alone. The text is the same either way.
    pub prompt_lookup: bool,
    /// Whether the models keep what the previous request left cached where the prompt starts
    /// with the same tokens (a conversation's earlier turns), as llama.cpp's server does by
    /// default. The text is the same either way.
    pub cache_prompt: bool,
}

/// llama.cpp's DRY (`dry_multiplier`, `dry_base`, `dry_allowed_length`, `dry_penalty_last_n`,
/// `dry_sequence_breakers`); off when `multiplier` is 0.
#[derive(Clone, Debug, PartialEq)]
pub struct DrySampling {
    pub multiplier: f32,
    pub base: f32,
    pub allowed_length: u32,
    /// `u32::MAX`: the whole sequence; 0: off.
    pub last_n: u32,
    /// None: the decoders' own default (llama.cpp's: newline, colon, double quote, asterisk).
    pub sequence_breakers: Option<Vec<String>>,
    /// The tokens whose text holds a breaker, as a bit set ([`Codec::dry_breakers`]; the
    /// handler fills it).
    pub breakers: Vec<u64>,
}

impl DrySampling {
    pub fn is_off(&self) -> bool {
        self.multiplier == 0.0 || self.last_n == 0
    }
}

impl Default for DrySampling {
    fn default() -> Self {
        Self {
            multiplier: 0.0,
            base: 1.75,
            allowed_length: 2,
            last_n: u32::MAX,
            sequence_breakers: None,
            breakers: Vec::new(),
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            dynatemp_range: 0.0,
            dynatemp_exponent: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            top_n_sigma: 0.0,
            typical_p: 1.0,
            xtc_probability: 0.0,
            xtc_threshold: 0.1,
            seed: None,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_last_n: 64,
            dry: DrySampling::default(),
            logit_bias: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            grammar: None,
            prompt_lookup: true,
            cache_prompt: true,
        }
    }
}

/// What the decode thread asks the generator for.
#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
}

/// Figures a generator reports about one finished (or cancelled) request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenStats {
    /// The model produced an end-of-sequence token (else it ran out of budget or was cancelled).
    pub stopped_by_model: bool,
    /// Draft tokens proposed and accepted (0 for plain decoding).
    pub draft_n: u64,
    pub draft_n_accepted: u64,
    pub rollbacks: u64,
    /// Prompt tokens found cached from the previous request (not prefilled again).
    pub cache_n: usize,
    /// The prompt's tokens' log-probabilities from its second token on, when the request asked
    /// ([`Sampling::prompt_logprobs`]).
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// A generated token's log-probability, and its position's most likely tokens', most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a generation failed. The message is shown to the client.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The request cannot be served as asked (e.g. too long for a model's context): a 400.
    #[error("{0}")]
    BadRequest(String),
    /// The model or its workers failed: a 500.
    #[error("{0}")]
    Failed(String),
}

/// Text to token ids and back. Shared by the async handlers (validation needs the prompt's length)
/// and the decode thread.
pub trait Codec: Send + Sync {
    /// The name `/v1/models` lists and responses carry.
    fn model_id(&self) -> &str;
    /// Most tokens a request may hold, prompt plus generated.
    fn context_length(&self) -> usize;
    /// Token ids are below this.
    fn vocab_size(&self) -> usize;
    /// A conversation rendered with the model's chat template as `options` say (usually ready
    /// for the assistant's turn).
    fn encode_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<Vec<u32>, String>;
    /// A conversation's text, rendered as [`Codec::encode_chat`] renders it before tokenizing
    /// (llama.cpp's `/apply-template`).
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        options: &ChatOptions,
    ) -> Result<String, String>;
    /// A plain completion prompt.
    fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, String>;
    /// Text as the tokenizer reads it, with the model's special tokens (its BOS) added or not
    /// (`/tokenize`).
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String>;
    /// An incremental decoder: its pieces, concatenated, are the decoding of all ids pushed.
    fn text_stream(&self) -> Box<dyn TextStream + '_>;
    /// One token's text on its own (for log-probabilities; part of a character renders as
    /// U+FFFD).
    fn token_text(&self, id: u32) -> String;
    /// The chat template's source (llama.cpp's `/props`), if the model has one.
    fn chat_template(&self) -> Option<String> {
        None
    }
    /// DRY's breaker set for `breakers` (None: the default strings): bit `t % 64` of word
    /// `t / 64` set for each token `t` whose text holds one. A model without text has none.
    fn dry_breakers(&self, breakers: Option<&[String]>) -> Vec<u64> {
        let _ = breakers;
        Vec::new()
    }
    /// Whether `grammar` compiles against the vocabulary; the error says why not. A model that
    /// cannot follow grammars refuses them all.
    fn check_grammar(&self, grammar: &crate::format::OutputGrammar) -> Result<(), String> {
        let _ = grammar;
        Err("this model cannot follow a grammar".into())
    }
}

/// Incremental detokenization that never emits part of a UTF-8 character.
pub trait TextStream {
    /// The text that `id` completes (often empty inside a multi-byte character).
    fn push(&mut self, id: u32) -> String;
    /// Whatever is held back at the end (an incomplete character renders as U+FFFD).
    fn finish(&mut self) -> String;
}

/// The decode loop. Lives on the decode thread only, so it needs not be `Send`.
pub trait Generator {
    /// Generates for `req`, calling `on_tokens` with the tokens as they are committed, and their
    /// log-probabilities if the request asked ([`Sampling::logprobs`]; else none). `cancelled`
    /// is polled often (at least every few tens of milliseconds while the request runs); once it
    /// says true the generator should stop soon and return what it has.
    fn generate(
        &mut self,
        req: &GenRequest,
        on_tokens: &mut dyn FnMut(&[u32], &[TokenLogprobs]),
        cancelled: &dyn Fn() -> bool,
    ) -> Result<GenStats, GenError>;

    /// Called when no request has come for a while: supervise workers, and the like.
    fn idle(&mut self) -> Result<(), GenError> {
        Ok(())
    }

    /// Worker restarts so far (monotonic), for `/metrics`.
    fn worker_restarts(&self) -> u64 {
        0
    }

    /// Why the generator cannot serve until it recovers (a worker whose restarts ran out, to be
    /// started again by the next request or idle step), if it cannot: `/health` says 503 then.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// Builds the generator on the decode thread (loading can take a while; `/health` says 503 until
/// it is done).
pub type GeneratorFactory = Box<dyn FnOnce() -> Result<Box<dyn Generator>, GenError> + Send>;

/// How often an idle decode thread calls [`Generator::idle`].
pub const IDLE_EVERY: Duration = Duration::from_millis(200);
