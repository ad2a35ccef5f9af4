//! Text ⇄ token ids, and streaming detokenization for printing tokens as they are generated.
//!
//! [`Tokenizer`] wraps a Hugging Face [`tokenizers::Tokenizer`]. It is built either from a
//! `tokenizer.json` ([`Tokenizer::from_file`]) or from the vocabulary embedded in a GGUF file
//! ([`Tokenizer::from_gguf_metadata`]). We build the GGUF one ourselves rather than use candle's
//! `quantized::tokenizer`, which does not know llama.cpp's `smollm` pre-tokenizer and so splits
//! digits differently from how SmolLM2 was trained.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Everything that can go wrong building or using a tokenizer. Messages are one line and say what to
/// do; the crate's `ModelError` prefixes them with "tokenizer: ".
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF metadata key the tokenizer needs is absent.
    #[error("GGUF metadata key '{0}' is missing; the file carries no usable tokenizer, use the model's tokenizer.json instead")]
    MissingMetadata(&'static str),
    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("GGUF metadata key '{key}' is malformed: {reason}")]
    BadMetadata { key: String, reason: String },
    /// The GGUF vocabulary is not byte-level BPE (for example SentencePiece, `llama`).
    #[error("tokenizer model '{0}' is not supported (only byte-level BPE, 'gpt2', is); use the model's tokenizer.json instead")]
    UnsupportedModel(String),
    /// A `tokenizer.json` could not be read or parsed.
    #[error("cannot load {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    /// The vocabulary and merges do not form a valid BPE model.
    #[error("cannot build the BPE model: {0}")]
    Build(String),
    /// The `tokenizers` library failed to encode text.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// The `tokenizers` library failed to decode ids.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    /// Streaming decode produced text that contradicts what it already emitted; only possible with
    /// decoders whose output for earlier tokens depends on later ones.
    #[error("streaming decode went out of sync at token {id}; decode the whole sequence instead")]
    StreamOutOfSync { id: u32 },
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// Ids of the tokens with a role in generation. `None` where the source does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence: generation stops here.
    pub eos: Option<u32>,
    /// End of turn (Llama 3's `<|eot_id|>`); also stops generation.
    pub eot: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown token. Byte-level BPE never produces it, but GGUF files still name one.
    pub unk: Option<u32>,
}

impl SpecialTokens {
    /// Whether generation should stop after `id` (end of sequence or end of turn).
    pub fn is_stop(&self, id: u32) -> bool {
        self.eos == Some(id) || self.eot == Some(id)
    }
}

/// A tokenizer: text to ids and back, plus the ids of the special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    /// Prepend BOS / append EOS when encoding with `add_special_tokens`. Only GGUF sets these; a
    /// `tokenizer.json` expresses the same through its own post-processor.
    add_bos: bool,
    add_eos: bool,
    /// The decoder is plain byte-level, so every token maps to a fixed byte string and streaming can
    /// work on bytes (see [`TokenStream`]).
    byte_level_decoder: bool,
    /// The GGUF pre-tokenizer type was not recognised and a plain GPT-2 split stands in for it.
    approximate: bool,
}

impl fmt::Debug for Tokenizer {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("approximate", &self.approximate)
            .finish()
    }
}

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 split regex as llama.cpp's `llama3` family has it (digits in groups of up to three).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (single digits).
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl Tokenizer {
    /// Builds the byte-level BPE tokenizer embedded in a GGUF file's metadata.
    ///
    /// Reads `tokenizer.ggml.{model, tokens, merges, token_type, pre}` and the special token ids
    /// (`bos_token_id`, `eos_token_id`, `eot_token_id`, `padding_token_id`, `unknown_token_id`,
    /// `add_bos_token`, `add_eos_token`). Control tokens (type 3) become special added tokens and
    /// user-defined ones (type 4) plain added tokens: both are matched whole in input text, but only
    /// control tokens are dropped by `decode(.., skip_special_tokens = true)`, as in llama.cpp.
    ///
    /// The pre-tokenizer follows `tokenizer.ggml.pre`, mirroring llama.cpp's grouping:
    /// - `smollm`, `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva-7b`: digits
    ///   one by one, then the GPT-2 split (`Sequence[Digits(individual), ByteLevel]`);
    /// - `gpt-2`, `gpt2`, `mpt`, `olmo`, `jais`: the GPT-2 split;
    /// - `llama3`, `llama-v3`, `llama-bpe`, `smaug-bpe`: Llama 3's split, digits in threes;
    /// - `qwen2`, `stablelm2`, `deepseek-r1-qwen`: Qwen2's split with NFC normalisation.
    ///
    /// Anything else, including llama.cpp's catch-all `default` and a missing key, gets the plain
    /// GPT-2 split. That is
    /// an approximation: ids may differ from the reference tokenizer on digits, punctuation runs or
    /// non-Latin scripts, though decoding stays exact. [`Tokenizer::is_approximate`] reports it so
    /// callers can warn.
    pub fn from_gguf_metadata(metadata: &HashMap<String, Value>) -> Result<Self> {
        let model = gguf_string(metadata, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens = gguf_strings(metadata, "tokenizer.ggml.tokens")?;
        let mut inner = tokenizers::Tokenizer::new(gguf_bpe(metadata, &tokens)?);
        let pre = match metadata.get("tokenizer.ggml.pre") {
            Some(v) => v
                .to_string()
                .map_err(|e| bad("tokenizer.ggml.pre", e))?
                .as_str(),
            // Files converted before llama.cpp recorded the pre-tokenizer; llama.cpp calls this
            // "default" and warns that tokenization may be off, which is_approximate reports.
            None => "default",
        };
        let approximate = configure_pre_tokenizer(&mut inner, pre)?;
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        add_typed_tokens(&mut inner, metadata, &tokens)?;
        let (special, add_bos, add_eos) = gguf_special_tokens(metadata, tokens.len())?;
        Ok(Self {
            inner,
            special,
            add_bos,
            add_eos,
            byte_level_decoder: true,
            approximate,
        })
    }

    /// Loads a Hugging Face `tokenizer.json`.
    ///
    /// The file does not say which token is BOS or EOS (that lives in `tokenizer_config.json` and
    /// `generation_config.json`), so [`Tokenizer::special_tokens`] is empty until
    /// [`Tokenizer::with_special_tokens`] sets it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        crate::files::check_regular(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: crate::error::printable(&e.to_string()),
        })?;
        Ok(Self::from_inner(inner))
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        let byte_level_decoder = matches!(inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)));
        Self {
            inner,
            special: SpecialTokens::default(),
            add_bos: false,
            add_eos: false,
            byte_level_decoder,
            approximate: false,
        }
    }

    /// Replaces the special token ids (for a `tokenizer.json`, whose file does not name them).
    pub fn with_special_tokens(mut self, special: SpecialTokens) -> Self {
        self.special = special;
        self
    }

    /// Text to ids. Special-token text in `text` (`<|im_start|>`) always encodes to its single id, so
    /// rendered chat templates tokenize as intended; `add_special_tokens` only controls whether
    /// BOS/EOS are added around the text where the model asks for them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(crate::error::printable(&e.to_string())))?;
        let body = encoding.get_ids();
        let bos = self
            .special
            .bos
            .filter(|_| add_special_tokens && self.add_bos);
        let eos = self
            .special
            .eos
            .filter(|_| add_special_tokens && self.add_eos);
        let mut ids = Vec::with_capacity(body.len() + 2);
        ids.extend(bos);
        ids.extend_from_slice(body);
        ids.extend(eos);
        Ok(ids)
    }

    /// Ids to text. Ids outside the vocabulary are skipped, as the model's output layer may be
    /// padded beyond it; invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(crate::error::printable(&e.to_string())))
    }

    /// The ids whose text (decoded alone) holds any of `needles`, ascending: DRY's sequence
    /// breakers. One decode per id of the vocabulary (tens of milliseconds for 49k).
    pub fn tokens_containing(&self, needles: &[String]) -> Vec<u32> {
        let needles: Vec<&str> = (needles.iter())
            .map(String::as_str)
            .filter(|n| !n.is_empty())
            .collect();
        if needles.is_empty() {
            return Vec::new();
        }
        (0..self.vocab_size() as u32)
            .filter(|&id| {
                let text = self.decode(&[id], false).unwrap_or_default();
                needles.iter().any(|n| text.contains(n))
            })
            .collect()
    }

    /// Starts streaming detokenization; see [`TokenStream`].
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream::new(self, skip_special_tokens)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, given in its vocabulary form (byte-level BPE writes a leading space as `Ġ`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary form of a token.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special (control) token, the kind `skip_special_tokens` drops.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .id_to_token(id)
            .is_some_and(|token| self.inner.get_added_vocabulary().is_special_token(&token))
    }

    /// BOS, EOS and the other ids with a role in generation.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// True when built from GGUF metadata whose pre-tokenizer type is unknown or missing, so a plain
    /// GPT-2 split stands in for it (see [`Tokenizer::from_gguf_metadata`]).
    pub fn is_approximate(&self) -> bool {
        self.approximate
    }

    /// The wrapped `tokenizers` tokenizer, for what this type does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Sets the normalizer and pre-tokenizer for a llama.cpp `tokenizer.ggml.pre` type. Returns whether
/// the type was unknown and approximated.
fn configure_pre_tokenizer(inner: &mut tokenizers::Tokenizer, pre: &str) -> Result<bool> {
    // add_prefix_space is off everywhere: llama.cpp never inserts one for BPE vocabularies.
    let gpt2_split = ByteLevel::new(false, true, true);
    let bytes_only = ByteLevel::new(false, true, false);
    let regex_split = |regex: &str| {
        Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex for '{pre}': {e}")))
    };
    let (pre_tokenizer, approximate): (PreTokenizerWrapper, bool) = match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (
                Sequence::new(vec![Digits::new(true).into(), gpt2_split.into()]).into(),
                false,
            )
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => (gpt2_split.into(), false),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => (
            Sequence::new(vec![regex_split(REGEX_LLAMA3)?.into(), bytes_only.into()]).into(),
            false,
        ),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => {
            inner
                .with_normalizer(Some(NFC))
                .map_err(|e| TokenizerError::Build(e.to_string()))?;
            (
                Sequence::new(vec![regex_split(REGEX_QWEN2)?.into(), bytes_only.into()]).into(),
                false,
            )
        }
        _ => (gpt2_split.into(), true),
    };
    inner.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(approximate)
}

/// The BPE model from `tokenizer.ggml.{tokens, merges}`.
fn gguf_bpe(metadata: &HashMap<String, Value>, tokens: &[&str]) -> Result<BPE> {
    let merges = gguf_strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|merge| {
            merge
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    bad(
                        "tokenizer.ggml.merges",
                        format!("entry {merge:?} is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Merges>>()?;
    // Later duplicates would overwrite earlier ids; keep the first so that the id the model was
    // trained with for that string wins.
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let id =
            u32::try_from(id).map_err(|_| bad("tokenizer.ggml.tokens", "more than 2^32 tokens"))?;
        vocab.entry(token.to_string()).or_insert(id);
    }
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))
}

/// Registers the unknown and control tokens (`tokenizer.ggml.token_type` 2 and 3) as special added
/// tokens and the user-defined ones (4) as plain added tokens, as llama.cpp treats them.
fn add_typed_tokens(
    inner: &mut tokenizers::Tokenizer,
    metadata: &HashMap<String, Value>,
    tokens: &[&str],
) -> Result<()> {
    let types = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.token_type", e))?
            .as_slice(),
        None => &[],
    };
    let mut specials = Vec::new();
    let mut user_defined = Vec::new();
    for (id, ty) in types.iter().enumerate() {
        let ty = gguf_int(ty).ok_or_else(|| {
            bad(
                "tokenizer.ggml.token_type",
                format!("entry {id} is {ty:?}, not an integer"),
            )
        })?;
        let Some(token) = tokens.get(id) else { break };
        match ty {
            TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL => {
                specials.push(AddedToken::from(token.to_string(), true))
            }
            TOKEN_TYPE_USER_DEFINED => {
                user_defined.push(AddedToken::from(token.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    inner
        .add_special_tokens(specials)
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    inner
        .add_tokens(user_defined)
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    Ok(())
}

/// The special token ids and the add-BOS / add-EOS flags; a flag set without its id is an error.
fn gguf_special_tokens(
    metadata: &HashMap<String, Value>,
    vocab_len: usize,
) -> Result<(SpecialTokens, bool, bool)> {
    let id = |key: &'static str| gguf_token_id(metadata, key, vocab_len);
    let special = SpecialTokens {
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        eot: id("tokenizer.ggml.eot_token_id")?,
        pad: id("tokenizer.ggml.padding_token_id")?,
        unk: id("tokenizer.ggml.unknown_token_id")?,
    };
    let flag = |key: &'static str| match metadata.get(key) {
        Some(v) => v.to_bool().map_err(|e| bad(key, e)),
        None => Ok(false),
    };
    let add_bos = flag("tokenizer.ggml.add_bos_token")?;
    let add_eos = flag("tokenizer.ggml.add_eos_token")?;
    if add_bos && special.bos.is_none() {
        return Err(TokenizerError::MissingMetadata(
            "tokenizer.ggml.bos_token_id",
        ));
    }
    if add_eos && special.eos.is_none() {
        return Err(TokenizerError::MissingMetadata(
            "tokenizer.ggml.eos_token_id",
        ));
    }
    Ok((special, add_bos, add_eos))
}

fn bad(key: &str, reason: impl fmt::Display) -> TokenizerError {
    TokenizerError::BadMetadata {
        key: key.to_string(),
        reason: crate::error::printable(&reason.to_string()),
    }
}

fn gguf_string<'a>(metadata: &'a HashMap<String, Value>, key: &'static str) -> Result<&'a str> {
    let value = metadata
        .get(key)
        .ok_or(TokenizerError::MissingMetadata(key))?;
    value
        .to_string()
        .map(String::as_str)
        .map_err(|e| bad(key, e))
}

fn gguf_strings<'a>(
    metadata: &'a HashMap<String, Value>,
    key: &'static str,
) -> Result<Vec<&'a str>> {
    let values = metadata
        .get(key)
        .ok_or(TokenizerError::MissingMetadata(key))?;
    let values = values.to_vec().map_err(|e| bad(key, e))?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(bad(key, format!("entry {i} is {other:?}, not a string"))),
        })
        .collect()
}

/// Any integer type: writers disagree (token types are I32 in llama.cpp's files, ids U32).
fn gguf_int(value: &Value) -> Option<i64> {
    match *value {
        Value::U8(v) => Some(v.into()),
        Value::I8(v) => Some(v.into()),
        Value::U16(v) => Some(v.into()),
        Value::I16(v) => Some(v.into()),
        Value::U32(v) => Some(v.into()),
        Value::I32(v) => Some(v.into()),
        Value::U64(v) => i64::try_from(v).ok(),
        Value::I64(v) => Some(v),
        _ => None,
    }
}

/// An optional token id, checked against the vocabulary size.
fn gguf_token_id(
    metadata: &HashMap<String, Value>,
    key: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let id = gguf_int(value).ok_or_else(|| {
        bad(
            key,
            format!("{} is not an integer", crate::gguf::describe_value(value)),
        )
    })?;
    match usize::try_from(id) {
        Ok(index) if index < vocab_size => Ok(u32::try_from(id).ok()),
        // llama.cpp writes -1 (as u32::MAX when unsigned) for "no such token".
        _ if id == -1 || id == i64::from(u32::MAX) => Ok(None),
        _ => Err(bad(
            key,
            format!("id {id} is outside the {vocab_size}-token vocabulary"),
        )),
    }
}

/// The byte a GPT-2 byte-level character stands for: the inverse of `bytes_to_unicode` in GPT-2's
/// `encoder.py`. Printable bytes map to themselves; the other 68 map, in order, to U+0100..U+0143.
fn byte_level_byte(c: char) -> Option<u8> {
    match u32::from(c) {
        code @ (0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) => u8::try_from(code).ok(),
        code @ 0x100..=0x143 => {
            let n = code - 0x100;
            let byte = match n {
                0..=32 => n,              // 0x00..=0x20: controls and space
                33..=66 => 0x7F + n - 33, // 0x7F..=0xA0: DEL, C1 controls, NBSP
                _ => 0xAD,                // soft hyphen
            };
            u8::try_from(byte).ok()
        }
        _ => None,
    }
}

/// Streaming detokenization: feed ids one at a time as they are generated, get back the text they
/// complete.
///
/// A character outside ASCII often spans several byte-level tokens (an emoji is typically four), so
/// a token may complete no character; its bytes are held until they do. Joining every [`step`]'s
/// output and then [`finish`]'s gives exactly `decode(all_ids)`.
///
/// For byte-level tokenizers (every GGUF one, and `tokenizer.json`s with a `ByteLevel` decoder) the
/// stream works on the tokens' bytes directly and costs O(1) per token. For other decoders
/// (SentencePiece-style `Metaspace`/`ByteFallback`) it re-decodes a short window of recent ids and
/// holds text back while the window ends in U+FFFD.
///
/// [`step`]: TokenStream::step
/// [`finish`]: TokenStream::finish
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special_tokens: bool,
    state: StreamState,
}

enum StreamState {
    /// Bytes of a character not yet complete.
    Bytes { pending: Vec<u8> },
    /// `ids[..context]` were already emitted and are kept only as left context, because
    /// SentencePiece-style decoders render a token differently at the start of a sequence (they strip
    /// its leading space); `context_text` is their decoding.
    Window {
        ids: Vec<u32>,
        context: usize,
        context_text: String,
    },
}

impl<'a> TokenStream<'a> {
    /// A stream that decodes like `tokenizer.decode(ids, skip_special_tokens)`.
    pub fn new(tokenizer: &'a Tokenizer, skip_special_tokens: bool) -> Self {
        let state = if tokenizer.byte_level_decoder {
            StreamState::Bytes {
                pending: Vec::new(),
            }
        } else {
            StreamState::Window {
                ids: Vec::new(),
                context: 0,
                context_text: String::new(),
            }
        };
        Self {
            tokenizer,
            skip_special_tokens,
            state,
        }
    }

    /// Feeds the next id; returns the text it completes, empty when it completes no character.
    pub fn step(&mut self, id: u32) -> Result<String> {
        match &mut self.state {
            StreamState::Bytes { pending } => {
                let inner = &self.tokenizer.inner;
                // Same filtering as `tokenizers::Tokenizer::decode`: unknown ids vanish, and special
                // tokens do when asked.
                let Some(token) = inner.id_to_token(id) else {
                    return Ok(String::new());
                };
                if self.skip_special_tokens && inner.get_added_vocabulary().is_special_token(&token)
                {
                    return Ok(String::new());
                }
                // Same rule as the ByteLevel decoder: a token containing any character outside the
                // byte-level alphabet (an added token such as "你好") is taken as literal UTF-8.
                match token
                    .chars()
                    .map(byte_level_byte)
                    .collect::<Option<Vec<u8>>>()
                {
                    Some(bytes) => pending.extend_from_slice(&bytes),
                    None => pending.extend_from_slice(token.as_bytes()),
                }
                Ok(take_complete_utf8(pending))
            }
            StreamState::Window {
                ids,
                context,
                context_text,
            } => {
                ids.push(id);
                let text = self.tokenizer.decode(ids, self.skip_special_tokens)?;
                if text.len() <= context_text.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
                    return Ok(String::new());
                }
                let Some(new_text) = text.strip_prefix(context_text.as_str()) else {
                    return Err(TokenizerError::StreamOutOfSync { id });
                };
                let new_text = new_text.to_string();
                // What was just emitted becomes the context for the next step.
                ids.drain(..*context);
                *context = ids.len();
                *context_text = self.tokenizer.decode(ids, self.skip_special_tokens)?;
                Ok(new_text)
            }
        }
    }

    /// Ends the stream: returns any held-back text, with incomplete characters as U+FFFD exactly as
    /// `decode` renders them, and resets the stream for reuse.
    pub fn finish(&mut self) -> Result<String> {
        match &mut self.state {
            StreamState::Bytes { pending } => {
                let rest = String::from_utf8_lossy(pending).into_owned();
                pending.clear();
                Ok(rest)
            }
            StreamState::Window {
                ids,
                context,
                context_text,
            } => {
                let text = self.tokenizer.decode(ids, self.skip_special_tokens)?;
                let rest = text
                    .strip_prefix(context_text.as_str())
                    .unwrap_or_default()
                    .to_string();
                ids.clear();
                *context = 0;
                context_text.clear();
                Ok(rest)
            }
        }
    }
}

/// Removes and returns the longest prefix of `pending` that is complete UTF-8, replacing invalid
/// sequences with U+FFFD as `String::from_utf8_lossy` does; an incomplete character at the end stays.
/// Because an invalid sequence is judged only on the bytes up to its end, the pieces concatenate to
/// `from_utf8_lossy` of all the bytes at once.
fn take_complete_utf8(pending: &mut Vec<u8>) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < pending.len() {
        match std::str::from_utf8(&pending[start..]) {
            Ok(valid) => {
                out.push_str(valid);
                start = pending.len();
            }
            Err(e) => {
                let valid_end = start + e.valid_up_to();
                // Valid by construction; the lossy conversion just avoids an unwrap.
                out.push_str(&String::from_utf8_lossy(&pending[start..valid_end]));
                match e.error_len() {
                    Some(len) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        start = valid_end + len;
                    }
                    None => {
                        start = valid_end;
                        break;
                    }
                }
            }
        }
    }
    pending.drain(..start);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// The real model's metadata; fails the test (saying how to fetch it) when it is missing.
    pub(crate) fn real_gguf_metadata() -> &'static HashMap<String, Value> {
        static METADATA: OnceLock<HashMap<String, Value>> = OnceLock::new();
        METADATA.get_or_init(|| {
            let path = crate::testing::require_default_model();
            let mut file = std::fs::File::open(&path).expect("readable model file");
            gguf_file::Content::read(&mut file)
                .expect("readable GGUF")
                .metadata
        })
    }

    fn smollm() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            Tokenizer::from_gguf_metadata(real_gguf_metadata()).expect("tokenizer builds")
        })
    }

    fn assert_round_trip(tok: &Tokenizer, text: &str) {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "ids {ids:?}");
    }

    fn stream_all(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Vec<String> {
        let mut stream = tok.stream(skip_special_tokens);
        let mut pieces: Vec<String> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
        pieces.push(stream.finish().unwrap());
        pieces
    }

    #[test]
    fn tokens_containing_finds_breakers_in_the_real_vocabulary() {
        let t = smollm();
        let newline = t.tokens_containing(&["\n".into()]);
        assert!(newline.len() > 10, "{}", newline.len());
        for id in newline.iter().take(50) {
            assert!(t.decode(&[*id], false).unwrap().contains('\n'));
        }
        let both = t.tokens_containing(&["\n".into(), ":".into(), String::new()]);
        assert!(both.len() > newline.len() && both.windows(2).all(|w| w[0] < w[1]));
        assert!(t.tokens_containing(&[]).is_empty());
    }

    #[test]
    fn smollm_metadata_is_read() {
        let tok = smollm();
        assert!(!tok.is_approximate());
        assert_eq!(tok.vocab_size(), 49152);
        let special = tok.special_tokens();
        assert_eq!(special.bos, Some(1));
        assert_eq!(special.eos, Some(2));
        assert_eq!(special.pad, Some(2));
        assert_eq!(special.unk, Some(0));
        assert!(special.is_stop(2));
        assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    }

    #[test]
    fn smollm_round_trips() {
        let tok = smollm();
        for text in [
            "def f(x):\n\tif x:\n        return [i * 2 for i in range(x)]\n\treturn None\n",
            "a  b   c    d\n\n\n  \n\t\t end   ",
            "12345 3.14159",
            "你好，世界",
            "👋🏽🚀",
            "Hello <|im_start|>user\nHi<|im_end|>",
            "",
            " leading space, trailing space ",
        ] {
            assert_round_trip(tok, text);
        }
    }

    #[test]
    fn smollm_special_tokens_are_single_ids() {
        let tok = smollm();
        let ids = tok
            .encode("Hello <|im_start|>user\nHi<|im_end|>", false)
            .unwrap();
        for marker in ["<|im_start|>", "<|im_end|>"] {
            let id = tok.token_to_id(marker).unwrap();
            assert!(tok.is_special(id), "{marker} is special");
            assert_eq!(
                ids.iter().filter(|&&i| i == id).count(),
                1,
                "{marker} in {ids:?}"
            );
            assert_eq!(tok.encode(marker, false).unwrap(), [id]);
        }
        assert!(!tok.is_special(tok.token_to_id("Hello").unwrap()));
        // Skipping specials drops the markers but nothing around them.
        assert_eq!(tok.decode(&ids, true).unwrap(), "Hello user\nHi");
    }

    #[test]
    fn smollm_digits_are_split() {
        let tok = smollm();
        let ids = tok.encode("12345", false).unwrap();
        assert_eq!(ids.len(), 5, "{ids:?}");
        let digits: Vec<u32> = "12345"
            .chars()
            .map(|c| tok.token_to_id(&c.to_string()).unwrap())
            .collect();
        assert_eq!(ids, digits);
    }

    #[test]
    fn smollm_common_words_are_single_tokens() {
        let tok = smollm();
        for (text, vocab_form) in [("Hello", "Hello"), (" world", "Ġworld")] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids.len(), 1, "{text:?} -> {ids:?}");
            assert_eq!(tok.token_to_id(vocab_form), Some(ids[0]));
            assert_eq!(tok.id_to_token(ids[0]).as_deref(), Some(vocab_form));
        }
        // add_bos_token is false in this file: nothing is added.
        assert_eq!(
            tok.encode("Hello", true).unwrap(),
            tok.encode("Hello", false).unwrap()
        );
    }

    #[test]
    fn smollm_stream_never_splits_characters() {
        let tok = smollm();
        let text = "Hi 👋🏽! 你好，世界 🚀🚀 ok\n日本語のテキスト";
        let ids = tok.encode(text, false).unwrap();
        let pieces = stream_all(tok, &ids, false);
        assert!(
            pieces
                .iter()
                .all(|p| !p.contains(char::REPLACEMENT_CHARACTER)),
            "{pieces:?}"
        );
        // Several tokens must have completed nothing, or the test proves little.
        assert!(
            pieces.iter().filter(|p| p.is_empty()).count() > 2,
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn smollm_stream_matches_decode_on_special_and_cut_sequences() {
        let tok = smollm();
        let ids = tok
            .encode("<|im_start|>assistant\n🚀 done<|im_end|>", false)
            .unwrap();
        for skip in [false, true] {
            assert_eq!(
                stream_all(tok, &ids, skip).concat(),
                tok.decode(&ids, skip).unwrap()
            );
        }
        // A sequence cut mid-emoji, and one with a stray continuation byte in the middle: the stream
        // renders the broken bytes as U+FFFD exactly where decode does.
        let rocket = tok.encode("🚀", false).unwrap();
        assert!(
            rocket.len() > 1,
            "the emoji spans several tokens: {rocket:?}"
        );
        let cut = &rocket[..rocket.len() - 1];
        let mut broken = cut.to_vec();
        broken.extend(tok.encode("a🚀", false).unwrap());
        for ids in [cut, &broken[..]] {
            assert_eq!(
                stream_all(tok, ids, false).concat(),
                tok.decode(ids, false).unwrap()
            );
        }
    }

    #[test]
    fn byte_level_alphabet_inverts_gpt2_mapping() {
        let alphabet = ByteLevel::alphabet();
        assert_eq!(alphabet.len(), 256);
        let mut bytes: Vec<u8> = alphabet
            .iter()
            .map(|&c| byte_level_byte(c).unwrap())
            .collect();
        bytes.sort_unstable();
        assert_eq!(bytes, (0..=255).collect::<Vec<u8>>());
        assert_eq!(byte_level_byte('Ġ'), Some(b' '));
        assert_eq!(byte_level_byte('Ċ'), Some(b'\n'));
        assert_eq!(byte_level_byte('ĉ'), Some(b'\t'));
        assert_eq!(byte_level_byte('你'), None);
    }

    #[test]
    fn unsupported_model_and_missing_keys_are_typed_errors() {
        let mut metadata = HashMap::new();
        let err = Tokenizer::from_gguf_metadata(&metadata).unwrap_err();
        assert!(
            matches!(err, TokenizerError::MissingMetadata("tokenizer.ggml.model")),
            "{err}"
        );
        metadata.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        );
        let err = Tokenizer::from_gguf_metadata(&metadata).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::UnsupportedModel(m) if m == "llama"),
            "{err}"
        );
        assert!(err.to_string().contains("'llama'"));
        metadata.insert(
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        );
        metadata.insert("tokenizer.ggml.tokens".to_string(), Value::U32(3));
        let err = Tokenizer::from_gguf_metadata(&metadata).unwrap_err();
        assert!(
            matches!(&err, TokenizerError::BadMetadata { key, .. } if key == "tokenizer.ggml.tokens"),
            "{err}"
        );
        assert_eq!(err.to_string().lines().count(), 1, "{err}");
    }

    /// A minimal GGUF-style vocabulary: every byte of "ab 1" plus merges for "ab" and " ab".
    #[test]
    fn tiny_gguf_vocabulary_with_unknown_pre_type() {
        let strings =
            |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
        let tokens = ["<s>", "a", "b", "Ġ", "1", "ab", "Ġab"];
        let metadata: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            (
                "tokenizer.ggml.pre",
                Value::String("some-future-model".into()),
            ),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.merges", strings(&["a b", "Ġ ab"])),
            (
                "tokenizer.ggml.token_type",
                Value::Array([3, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(0)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let tok = Tokenizer::from_gguf_metadata(&metadata).unwrap();
        assert!(tok.is_approximate());
        assert_eq!(tok.encode("ab ab", false).unwrap(), [5, 6]);
        assert_eq!(tok.encode("ab ab", true).unwrap(), [0, 5, 6]);
        assert_eq!(tok.decode(&[0, 5, 6], true).unwrap(), "ab ab");
        assert_eq!(tok.decode(&[0, 5, 6], false).unwrap(), "<s>ab ab");
    }

    #[test]
    fn loads_tokenizer_json() {
        // A byte-level BPE over the bytes of "hello" and space, with merges up to "hello" and " hello".
        let json = r#"{
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "vocab": {"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "Ġ": 5,
                          "he": 6, "ll": 7, "hell": 8, "hello": 9, "Ġhello": 10},
                "merges": ["h e", "l l", "he ll", "hell o", "Ġ hello"]
            }
        }"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let tok = Tokenizer::from_file(&path).unwrap();
        assert_eq!(tok.vocab_size(), 11);
        assert_eq!(tok.encode("hello hello", false).unwrap(), [9, 10]);
        assert_eq!(tok.encode("hello<|endoftext|>", false).unwrap(), [9, 0]);
        assert_eq!(tok.decode(&[9, 10, 0], true).unwrap(), "hello hello");
        assert!(tok.is_special(0));
        assert_eq!(tok.special_tokens(), &SpecialTokens::default());
        assert_eq!(
            stream_all(&tok, &[9, 10, 0], false).concat(),
            "hello hello<|endoftext|>"
        );

        let err = Tokenizer::from_file(dir.path().join("missing.json")).unwrap_err();
        assert!(matches!(err, TokenizerError::Load { .. }), "{err}");
        assert!(err.to_string().contains("missing.json"), "{err}");
    }

    /// The window path, with a SentencePiece-style decoder whose bytes arrive as `<0xNN>` tokens.
    #[test]
    fn stream_with_byte_fallback_decoder() {
        use tokenizers::decoders::byte_fallback::ByteFallback;
        use tokenizers::decoders::fuse::Fuse;
        use tokenizers::decoders::sequence::Sequence as DecoderSequence;
        use tokenizers::decoders::strip::Strip;
        use tokenizers::normalizers::replace::Replace;

        // "é" is 0xC3 0xA9; "▁" stands for a space, stripped at the start of the text.
        let vocab: Vocab = [("▁hi", 0), ("<0xC3>", 1), ("<0xA9>", 2), ("▁there", 3)]
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .byte_fallback(true)
            .build()
            .unwrap();
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_decoder(Some(DecoderSequence::new(vec![
            Replace::new("▁", " ").unwrap().into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
            Strip::new(' ', 1, 0).into(),
        ])));
        let tok = Tokenizer::from_inner(inner);
        assert!(!tok.byte_level_decoder);

        let ids = [0, 1, 2, 3, 1];
        let mut stream = tok.stream(false);
        let pieces: Vec<String> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
        assert_eq!(pieces, ["hi", "", "é", " there", ""]);
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
        assert_eq!(tok.decode(&ids, false).unwrap(), "hié there\u{FFFD}");
    }

    #[test]
    fn take_complete_utf8_matches_lossy() {
        let cases: [&[u8]; 5] = [
            b"abc",
            "é🚀".as_bytes(),
            b"\xF0\x9F\x9A",
            b"a\xF0\x9Fb\xFF\xC3",
            b"\x80\x80\xE4\xBD\xA0",
        ];
        for bytes in cases {
            let mut pending = Vec::new();
            let mut out = String::new();
            for &b in bytes {
                pending.push(b);
                out.push_str(&take_complete_utf8(&mut pending));
            }
            out.push_str(&String::from_utf8_lossy(&pending));
            assert_eq!(out, String::from_utf8_lossy(bytes), "{bytes:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn smollm_round_trips_arbitrary_text(text in r"[\PC\t\n ]{0,48}") {
            let tok = smollm();
            let ids = tok.encode(&text, false).unwrap();
            prop_assert_eq!(&tok.decode(&ids, false).unwrap(), &text);
            prop_assert_eq!(stream_all(tok, &ids, false).concat(), text);
        }
    }
}
