//! Constrained decoding: a grammar the generated text must follow (a JSON schema, a regular
//! expression, a Lark or GBNF grammar), as OpenAI's `response_format`, vLLM's guided decoding and
//! llama.cpp's `grammar` ask.
//!
//! # Why the strategies still agree
//! A [`Constraint`] masks the logits of the tokens that may not come next, and what it allows at
//! a position is a function of the tokens generated before it, nothing else: the same function
//! `ar` applies to its one row, a verify step applies to each of its rows (row `j` after the
//! committed tokens and the first `j` draft tokens), and a restarted worker applies after the
//! tokens committed before it started. The mask comes first, before the bias and the penalties
//! ([`crate::sampling`]), so a masked token is never chosen, greedy or sampled. A draft token the
//! grammar forbids is never the verify model's choice, so the policy rejects it; the rows after it
//! are never committed, and whatever the constraint answers for them changes nothing.
//!
//! The draft masks its own logits with its own copy of the grammar, so it proposes what the
//! verify model can accept; a draft without one (prompt lookup, a model without a tokenizer)
//! only drafts worse.
//!
//! The implementations live elsewhere (`amusd-grammar`, on llguidance): this crate defines what
//! the decoding loops need of one, and tests them with a fake.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::SpecError;

/// What kind of grammar a request gives, as the region stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarKind {
    /// Any JSON object (`response_format: {"type": "json_object"}`); the text is unused.
    JsonObject,
    /// A JSON schema (`json_schema`), the text its JSON.
    JsonSchema,
    /// A regular expression the whole output matches.
    Regex,
    /// A Lark grammar in llguidance's syntax.
    Lark,
    /// A grammar in llama.cpp's GBNF (rewritten as Lark where it is compiled).
    Gbnf,
}

impl GrammarKind {
    pub const ALL: [Self; 5] = [
        Self::JsonObject,
        Self::JsonSchema,
        Self::Regex,
        Self::Lark,
        Self::Gbnf,
    ];

    /// The region's code (0 is "no grammar").
    pub fn code(self) -> u32 {
        match self {
            Self::JsonObject => 1,
            Self::JsonSchema => 2,
            Self::Regex => 3,
            Self::Lark => 4,
            Self::Gbnf => 5,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name llguidance's tagged grammars use (GBNF's is ours: llguidance reads it as Lark).
    pub fn tag(self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema => "json_schema",
            Self::Regex => "regex",
            Self::Lark => "lark",
            Self::Gbnf => "gbnf",
        }
    }
}

/// A request's grammar, as the user gave it (compiled by each process that decodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    pub kind: GrammarKind,
    pub text: String,
}

impl Grammar {
    pub fn new(kind: GrammarKind, text: impl Into<String>) -> Self {
        Self {
            kind,
            text: text.into(),
        }
    }
}

impl fmt::Display for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            GrammarKind::JsonObject => write!(f, "any JSON object"),
            k => write!(f, "{} ({} bytes)", k.tag(), self.text.len()),
        }
    }
}

/// One sequence's grammar state.
pub trait Constraint: Send {
    /// Sets to `-inf` in `logits` every token that may not follow `generated` (the tokens after
    /// the prompt). A pure function of `generated`: an implementation may keep state between calls
    /// to answer faster (a parser advanced over the previous call's tokens, rolled back where
    /// they differ), never to answer differently. Where `generated` itself breaks the grammar, it
    /// masks everything.
    fn mask(&mut self, generated: &[u32], logits: &mut [f32]);
}

/// Compiles requests' grammars for one model's vocabulary.
pub trait Constraints: Send + Sync {
    fn compile(&self, grammar: &Grammar) -> Result<Box<dyn Constraint>, SpecError>;
}

/// A compiled grammar held by a [`crate::Sampler`]: shared by its clones, which is sound because
/// what it answers depends only on the tokens it is given.
#[derive(Clone)]
pub struct ActiveConstraint {
    /// Where the generated tokens start in a sampler's prefix.
    pub prompt_len: usize,
    inner: Arc<Mutex<Box<dyn Constraint>>>,
}

impl ActiveConstraint {
    pub fn new(constraint: Box<dyn Constraint>, prompt_len: usize) -> Self {
        Self {
            prompt_len,
            inner: Arc::new(Mutex::new(constraint)),
        }
    }

    /// Masks `logits` for the token after `prefix` (the prompt included).
    pub fn mask(&self, prefix: &[u32], logits: &mut [f32]) {
        let generated = prefix.get(self.prompt_len..).unwrap_or(&[]);
        // A panic elsewhere while the lock was held leaves the constraint as a valid (pure)
        // function all the same.
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.mask(generated, logits);
    }
}

impl fmt::Debug for ActiveConstraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveConstraint")
            .field("prompt_len", &self.prompt_len)
            .finish_non_exhaustive()
    }
}

/// Compiles `grammar` with `constraints` for a request whose prompt is `prompt_len` tokens;
/// `None` without a grammar. A process asked to follow a grammar it cannot compile fails.
pub fn activate(
    constraints: Option<&dyn Constraints>,
    grammar: Option<&Grammar>,
    prompt_len: usize,
) -> Result<Option<ActiveConstraint>, SpecError> {
    let Some(g) = grammar else {
        return Ok(None);
    };
    let c = constraints.ok_or_else(|| {
        SpecError::Grammar(format!(
            "this model cannot follow a grammar ({g}): it has no tokenizer"
        ))
    })?;
    Ok(Some(ActiveConstraint::new(c.compile(g)?, prompt_len)))
}

/// A grammar over any vocabulary for tests: generated token `i` must be `≡ i (mod m)` or a stop
/// token (`m` = the text parsed as a number), and after `len` tokens only a stop token.
#[cfg(any(test, feature = "fake"))]
pub mod fake {
    use super::*;

    /// Compiles grammars of kind [`GrammarKind::Regex`] with text `"M,LEN,STOP"`.
    pub struct FakeConstraints;

    pub struct FakeConstraint {
        m: u32,
        len: usize,
        stop: u32,
    }

    impl FakeConstraint {
        pub fn allows(&self, generated: &[u32], token: u32) -> bool {
            let ok_so_far = (generated.iter().enumerate())
                .all(|(i, &t)| t == self.stop || t % self.m == i as u32 % self.m);
            let i = generated.len();
            ok_so_far
                && (token == self.stop || (i < self.len && token % self.m == i as u32 % self.m))
        }
    }

    impl Constraint for FakeConstraint {
        fn mask(&mut self, generated: &[u32], logits: &mut [f32]) {
            for (t, l) in logits.iter_mut().enumerate() {
                if !self.allows(generated, t as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    impl Constraints for FakeConstraints {
        fn compile(&self, grammar: &Grammar) -> Result<Box<dyn Constraint>, SpecError> {
            let bad = || SpecError::Grammar(format!("bad fake grammar '{}'", grammar.text));
            let f: Vec<u32> = (grammar.text.split(','))
                .map(|s| s.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            match f[..] {
                [m, len, stop] if m > 0 => Ok(Box::new(FakeConstraint {
                    m,
                    len: len as usize,
                    stop,
                })),
                _ => Err(bad()),
            }
        }
    }

    /// The fake grammar text.
    pub fn grammar(m: u32, len: usize, stop: u32) -> Grammar {
        Grammar::new(GrammarKind::Regex, format!("{m},{len},{stop}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_their_codes_and_none_is_zero() {
        for k in GrammarKind::ALL {
            assert_eq!(GrammarKind::from_code(k.code()), Some(k));
        }
        assert_eq!(GrammarKind::from_code(0), None);
        assert_eq!(GrammarKind::from_code(6), None);
    }

    #[test]
    fn the_mask_sees_only_the_generated_tokens() {
        let c = fake::FakeConstraints
            .compile(&fake::grammar(3, 8, 0))
            .unwrap();
        let active = ActiveConstraint::new(c, 2);
        // Prompt [7, 7], then generated [3] (position 0: 3 % 3 == 0); next must be ≡ 1 (mod 3).
        let mut logits = vec![0.0f32; 6];
        active.mask(&[7, 7, 3], &mut logits);
        let allowed: Vec<usize> = (0..6).filter(|&t| logits[t] == 0.0).collect();
        assert_eq!(allowed, vec![0, 1, 4]);
    }

    #[test]
    fn without_constraints_a_grammar_is_an_error_and_no_grammar_is_none() {
        let g = fake::grammar(2, 4, 0);
        assert!(activate(None, Some(&g), 3).is_err());
        assert!(activate(None, None, 3).unwrap().is_none());
        assert!(activate(Some(&fake::FakeConstraints), Some(&g), 3)
            .unwrap()
            .is_some());
        let bad = Grammar::new(GrammarKind::Regex, "x");
        assert!(activate(Some(&fake::FakeConstraints), Some(&bad), 3).is_err());
    }
}
