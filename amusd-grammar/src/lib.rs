//! Constrained decoding for amusd: compiles a request's grammar
//! ([`amusd_spec::constraint::Grammar`]: any JSON object, a JSON schema, a regular expression, a
//! Lark grammar, or llama.cpp's GBNF rewritten as Lark by [`gbnf`]) against one model's
//! vocabulary, and masks each position's logits to the tokens the grammar allows there.
//!
//! The engine is llguidance (the one llama.cpp builds with `LLAMA_LLGUIDANCE`, and vLLM and
//! mistral.rs use): an Earley parser over the grammar's lexemes with a token trie, which computes
//! a 49k-token mask in tens of microseconds and rolls back as cheaply. What is ours is the
//! contract [`amusd_spec::constraint::Constraint`] asks for: a mask that is a pure function of the
//! generated tokens, whatever order the calls come in (a verify step's rows, a draft's rollback, a
//! worker restarted mid-request), so every strategy commits the same tokens.

use std::fmt;
use std::sync::{Arc, OnceLock};

use amusd_model::tokenizer::Tokenizer;
use amusd_spec::constraint::{Constraint, Constraints, Grammar, GrammarKind};
use amusd_spec::SpecError;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};

pub mod gbnf;

/// Why a vocabulary or a grammar cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The tokenizer's tokens could not be read as bytes.
    #[error("cannot read the tokenizer's tokens as bytes: {0}")]
    Vocabulary(String),
    /// The grammar does not compile (the message is llguidance's).
    #[error("the {kind} does not compile: {message}")]
    Compile { kind: &'static str, message: String },
    /// The model's tokenizer could not be loaded.
    #[error(transparent)]
    Model(#[from] amusd_model::ModelError),
}

impl From<GrammarError> for SpecError {
    fn from(e: GrammarError) -> Self {
        SpecError::Grammar(e.to_string())
    }
}

/// What a user calls each kind, for errors.
fn kind_name(kind: GrammarKind) -> &'static str {
    match kind {
        GrammarKind::JsonObject => "JSON object grammar",
        GrammarKind::JsonSchema => "JSON schema",
        GrammarKind::Regex => "regular expression",
        GrammarKind::Lark => "Lark grammar",
        GrammarKind::Gbnf => "GBNF grammar",
    }
}

/// The parts of `tokenizer.json` that say each token's bytes (the decoder, the vocabulary, the
/// added tokens), without the merges, whose JSON is most of the whole (a third of the compiler's
/// build time here).
fn vocabulary_json(tokenizer: &Tokenizer) -> Result<serde_json::Value, GrammarError> {
    let t = tokenizer.inner();
    let err = |e: serde_json::Error| GrammarError::Vocabulary(e.to_string());
    let decoder = serde_json::to_value(t.get_decoder()).map_err(err)?;
    let added: Vec<serde_json::Value> = (t.get_added_tokens_decoder().into_iter())
        .map(|(id, a)| serde_json::json!({"id": id, "content": a.content, "special": a.special}))
        .collect();
    Ok(serde_json::json!({
        "decoder": decoder,
        "added_tokens": added,
        "model": {"vocab": t.get_vocab(false)},
    }))
}

/// llguidance's multi-line diagnostics as one line: the caret lines and the echo of the source
/// (`1 | start: ...`, the grammar as llguidance rewrote it) left out.
fn one_line(message: &str) -> String {
    let echo = |l: &str| {
        let digits = l
            .trim_start()
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        digits > 0 && l.trim_start()[digits..].trim_start().starts_with('|')
    };
    (message.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| "^~ ".contains(c)) && !echo(l))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compiles grammars for one vocabulary: the token trie and llguidance's parser factory, built
/// once per model (about a hundred milliseconds for 49k tokens) and shared by every request.
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let trie = self.factory.tok_env().tok_trie();
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &trie.vocab_size())
            .field("stop_ids", &trie.eos_tokens())
            .finish()
    }
}

impl GrammarCompiler {
    /// For a vocabulary given as each token's bytes (a special token's prefixed with
    /// [`TokTrie::SPECIAL_TOKEN_MARKER`], so no text matches it). `stop_ids` are the tokens that
    /// end generation: the only ones allowed once the grammar is complete, and allowed wherever
    /// it may end. At least one is needed.
    pub fn new(token_bytes: Vec<Vec<u8>>, stop_ids: &[u32]) -> Result<Self, GrammarError> {
        let Some(&first_stop) = stop_ids.first() else {
            return Err(GrammarError::Vocabulary(
                "no end-of-sequence token: a grammar could never end".into(),
            ));
        };
        if let Some(&bad) = stop_ids.iter().find(|&&t| t as usize >= token_bytes.len()) {
            return Err(GrammarError::Vocabulary(format!(
                "stop token {bad} is outside the vocabulary of {}",
                token_bytes.len()
            )));
        }
        let info = TokRxInfo::new(token_bytes.len() as u32, first_stop);
        let trie = TokTrie::from(&info, &token_bytes).with_eos_tokens(stop_ids);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Errors come back as values; nothing is printed from a worker.
        factory.quiet();
        Ok(Self { factory })
    }

    /// For a model's tokenizer, reading each token's bytes from its `tokenizer.json` form (byte-level
    /// BPE, or SentencePiece with byte fallback).
    pub fn from_tokenizer(tokenizer: &Tokenizer, stop_ids: &[u32]) -> Result<Self, GrammarError> {
        let value = vocabulary_json(tokenizer)?;
        // llguidance asserts on some malformed vocabularies; a bad tokenizer is an error here.
        let bytes =
            std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&value))
                .map_err(|_| GrammarError::Vocabulary("malformed vocabulary".into()))?
                .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        let mut bytes = bytes;
        // Ids the tokenizer never produces (a padded embedding) stay empty: never allowed.
        bytes.resize(bytes.len().max(tokenizer.vocab_size()), Vec::new());
        Self::new(bytes, stop_ids)
    }

    /// A model's compiler, from its spec (`PATH[:FORMAT]`): its tokenizer and stop tokens.
    pub fn for_model(spec: &amusd_model::ModelSpec) -> Result<Self, GrammarError> {
        let text = amusd_model::loader::load_text(spec)?;
        Self::from_tokenizer(&text.tokenizer, &text.eos_ids)
    }

    /// The vocabulary's size.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// A fresh matcher for `grammar`, or why it does not compile.
    pub fn matcher(&self, grammar: &Grammar) -> Result<Matcher, GrammarError> {
        let kind = kind_name(grammar.kind);
        let compile_error = |message: String| GrammarError::Compile {
            kind,
            message: one_line(&message),
        };
        let top = match grammar.kind {
            GrammarKind::Gbnf => {
                let lark = gbnf::to_lark(&grammar.text).map_err(|e| GrammarError::Compile {
                    kind,
                    message: e.to_string(),
                })?;
                TopLevelGrammar::from_lark(lark)
            }
            k => TopLevelGrammar::from_tagged_str(k.tag(), &grammar.text)
                .map_err(|e| compile_error(e.to_string()))?,
        };
        let parser = self
            .factory
            .create_parser(top)
            .map_err(|e| compile_error(e.to_string()))?;
        let mut m = Matcher::new(Ok(parser));
        // The first mask reports what the factory deferred (a regex that matches nothing...).
        m.compute_mask().map_err(|e| compile_error(e.to_string()))?;
        Ok(m)
    }

    /// Checks that `grammar` compiles, as a coordinator does before it sends a request on.
    pub fn check(&self, grammar: &Grammar) -> Result<(), GrammarError> {
        self.matcher(grammar).map(drop)
    }

    /// The constraint for one sequence.
    pub fn constraint(&self, grammar: &Grammar) -> Result<GrammarConstraint, GrammarError> {
        let initial = self.matcher(grammar)?;
        Ok(GrammarConstraint {
            matcher: initial.deep_clone(),
            initial,
            consumed: Vec::new(),
        })
    }
}

impl Constraints for GrammarCompiler {
    fn compile(&self, grammar: &Grammar) -> Result<Box<dyn Constraint>, SpecError> {
        Ok(Box::new(self.constraint(grammar)?))
    }
}

/// One sequence's matcher, advanced over the tokens of the last [`Constraint::mask`] call and
/// rolled back to where the next call's tokens part from them.
pub struct GrammarConstraint {
    matcher: Matcher,
    /// The matcher before any token, to start again from if it ever errs.
    initial: Matcher,
    /// The tokens `matcher` has consumed.
    consumed: Vec<u32>,
}

impl GrammarConstraint {
    /// Brings the matcher to `generated`. False when `generated` breaks the grammar.
    fn advance_to(&mut self, generated: &[u32]) -> bool {
        let common = (self.consumed.iter().zip(generated))
            .take_while(|(a, b)| a == b)
            .count();
        let back = self.consumed.len() - common;
        if back > 0 && self.matcher.rollback(back).is_ok() {
            self.consumed.truncate(common);
        } else if back > 0 || self.matcher.is_error() {
            self.restart();
        }
        let start = self.consumed.len();
        let rest = &generated[start..];
        match self.matcher.try_consume_tokens(rest) {
            Ok(n) => {
                self.consumed.extend_from_slice(&rest[..n]);
                n == rest.len()
            }
            Err(_) => {
                self.restart();
                false
            }
        }
    }

    fn restart(&mut self) {
        self.matcher = self.initial.deep_clone();
        self.consumed.clear();
    }
}

impl Constraint for GrammarConstraint {
    fn mask(&mut self, generated: &[u32], logits: &mut [f32]) {
        let allowed = if self.advance_to(generated) {
            self.matcher.compute_mask_or_eos().ok()
        } else {
            None
        };
        match allowed {
            Some(set) => {
                let n = set.len();
                for (t, l) in logits.iter_mut().enumerate() {
                    if t >= n || !set.is_allowed(t as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            // A prefix the grammar forbids: a verify row past a rejected draft token, never
            // committed.
            None => logits.fill(f32::NEG_INFINITY),
        }
    }
}

/// A model's compiler built on first use: a worker loads its tokenizer only when a request with
/// a grammar arrives, so startup stays as fast as before.
pub struct LazyCompiler {
    spec: amusd_model::ModelSpec,
    compiler: OnceLock<Result<GrammarCompiler, String>>,
}

impl LazyCompiler {
    pub fn new(spec: amusd_model::ModelSpec) -> Self {
        Self {
            spec,
            compiler: OnceLock::new(),
        }
    }

    fn get(&self) -> Result<&GrammarCompiler, SpecError> {
        let built = self
            .compiler
            .get_or_init(|| GrammarCompiler::for_model(&self.spec).map_err(|e| e.to_string()));
        built.as_ref().map_err(|e| SpecError::Grammar(e.clone()))
    }
}

impl Constraints for LazyCompiler {
    fn compile(&self, grammar: &Grammar) -> Result<Box<dyn Constraint>, SpecError> {
        self.get()?.compile(grammar)
    }
}

#[cfg(test)]
mod tests;
