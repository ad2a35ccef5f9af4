//! Prompt-lookup drafting: the tokens that followed the latest earlier occurrence of the sequence's
//! longest suffix (n-grams from a max length down to a min) are proposed as the continuation, as
//! llama.cpp's `ngram-*` and vLLM's `ngram` speculators do. Where an answer re-types its context
//! (code being refactored, a quoted passage) such drafts are long, right and free.
//!
//! [`NgramIndex`] is the index (O(1) work per token appended or truncated, never a rescan of the
//! context); [`LookupGate`] decides how many lookup tokens to propose from how the lookup's earlier
//! guesses fared; [`NoModel`] stands in for a draft model when the lookup drafts alone.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use crate::decoder::Decoder;
use crate::sampling::Sampler;
use crate::SpecError;

/// The n-gram lengths the lookup tries, longest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NgramRange {
    pub min: usize,
    pub max: usize,
}

impl NgramRange {
    /// Longest suffix 4 tokens, shortest 2: a single token matches too often in prose to be worth a
    /// verify slot, and suffixes longer than 4 add little on code (measured in the README).
    pub const DEFAULT: Self = Self { min: 2, max: 4 };
    /// [`Self::DEFAULT`] as written on a command line.
    pub const DEFAULT_TEXT: &'static str = "2-4";
    /// Longer suffixes are never needed to disambiguate and only cost index memory.
    pub const LONGEST: usize = 16;
    /// The default longest lookup run proposed at once (`--lookup-max-run`); see the README.
    pub const MAX_RUN: usize = 16;
}

impl Default for NgramRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for NgramRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// A bad `MIN-MAX` n-gram range.
#[derive(Debug, thiserror::Error)]
#[error("bad n-gram range '{0}': expected MIN-MAX with 1 <= MIN <= MAX <= 16, e.g. 2-4")]
pub struct BadRange(pub String);

impl FromStr for NgramRange {
    type Err = BadRange;
    fn from_str(s: &str) -> Result<Self, BadRange> {
        let bad = || BadRange(s.to_string());
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (min, max) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if min == 0 || min > max || max > Self::LONGEST {
            return Err(bad());
        }
        Ok(Self { min, max })
    }
}

/// The lookup's model spec: `lookup` or `lookup:MIN-MAX`. `None` if `spec` names something else.
pub fn parse_spec(spec: &str) -> Option<Result<NgramRange, BadRange>> {
    match spec {
        "lookup" => Some(Ok(NgramRange::DEFAULT)),
        _ => spec.strip_prefix("lookup:").map(str::parse),
    }
}

/// "No earlier position" in [`NgramIndex::prev`].
const NONE: u32 = u32::MAX;

/// An index of every n-gram of a token sequence (for each n of the range) by where it occurred,
/// kept in step with the sequence as tokens are pushed and truncated.
///
/// Entry `p` for length `n` stands for the n-gram `tokens[p - n..p]` followed by `tokens[p]`: it is
/// added when token `p` is pushed, so the sequence's own suffix is never its own match.
pub struct NgramIndex {
    range: NgramRange,
    tokens: Vec<u32>,
    /// Per n (index `n - min`): the latest entry of each n-gram, by the n-gram's hash.
    heads: Vec<HashMap<u64, u32>>,
    /// Per n, per position: the previous entry with the same hash (or [`NONE`]). Restores the
    /// head on truncation and walks past hash collisions.
    prev: Vec<Vec<u32>>,
}

pub(crate) fn ngram_hash(gram: &[u32]) -> u64 {
    // FNV-1a over the ids, then a finaliser: cheap, and collisions are checked anyway.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ gram.len() as u64;
    for &t in gram {
        h = (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

impl NgramIndex {
    pub fn new(range: NgramRange) -> Self {
        let lengths = range.max - range.min + 1;
        Self {
            range,
            tokens: Vec::new(),
            heads: (0..lengths).map(|_| HashMap::new()).collect(),
            prev: vec![Vec::new(); lengths],
        }
    }

    pub fn range(&self) -> NgramRange {
        self.range
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Empties the index (a new request).
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Appends one token: one hash-map insert per n-gram length.
    pub fn push(&mut self, token: u32) {
        let p = self.tokens.len();
        self.tokens.push(token);
        for (k, n) in (self.range.min..=self.range.max).enumerate() {
            let before = if p >= n {
                let key = ngram_hash(&self.tokens[p - n..p]);
                self.heads[k].insert(key, p as u32)
            } else {
                None
            };
            self.prev[k].push(before.unwrap_or(NONE));
        }
    }

    pub fn extend(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.push(t);
        }
    }

    /// Forgets tokens from `len` on, undoing their entries newest first: O(tokens removed).
    pub fn truncate(&mut self, len: usize) {
        while self.tokens.len() > len {
            let p = self.tokens.len() - 1;
            for (k, n) in (self.range.min..=self.range.max).enumerate() {
                let before = self.prev[k].pop().unwrap_or(NONE);
                if p < n {
                    continue;
                }
                // `p` is the newest entry of all, so it is the head of its own hash.
                let key = ngram_hash(&self.tokens[p - n..p]);
                if before == NONE {
                    self.heads[k].remove(&key);
                } else {
                    self.heads[k].insert(key, before);
                }
            }
            self.tokens.pop();
        }
    }

    /// Where the longest suffix (max down to min tokens) last occurred earlier: the position of
    /// the token that followed it, and the suffix's length.
    pub fn find(&self) -> Option<(usize, usize)> {
        let len = self.tokens.len();
        for n in (self.range.min..=self.range.max).rev() {
            let k = n - self.range.min;
            if len <= n {
                continue;
            }
            let suffix = &self.tokens[len - n..];
            let mut p = self.heads[k].get(&ngram_hash(suffix)).copied();
            while let Some(at) = p.filter(|&at| at != NONE) {
                let at = at as usize;
                if &self.tokens[at - n..at] == suffix {
                    return Some((at, n));
                }
                p = Some(self.prev[k][at]);
            }
        }
        None
    }

    /// Up to `max` tokens continuing the sequence the way its longest matched suffix continued
    /// before. A match close to the end runs into the proposal itself and repeats it, as a
    /// back-reference in LZ77 does, so a repeating pattern proposes its next period.
    pub fn propose(&self, max: usize) -> Vec<u32> {
        let Some((at, _)) = self.find() else {
            return Vec::new();
        };
        let len = self.tokens.len();
        let mut out = Vec::with_capacity(max);
        for i in 0..max {
            let t = match self.tokens.get(at + i) {
                Some(&t) => t,
                None => out[at + i - len],
            };
            out.push(t);
        }
        out
    }
}

/// How many lookup tokens to propose, from how the lookup's recent guesses fared: as many as its
/// current streak of right guesses (so runs double while they are accepted: a run of k right
/// tokens adds k to the streak) once the streak reaches [`Self::TRUST`], `floor` until then and
/// again after a wrong guess (never fewer than `floor`).
///
/// Outside text that copies its context, n-gram matches are right about half the time; inside,
/// they are right run after run. A streak tells the two apart, so long runs are tried only while
/// the text copies. Every guess counts, proposed or not (the drafter records the lookup's guess
/// where the model drafts), so the lookup comes back as soon as the text copies again.
///
/// The floor depends on who checks a guess first. Alone ([`Self::FLOOR_ALONE`]), a guess is
/// worth a verify slot and no more. Ahead of the model ([`Self::FLOOR_CHECKED`]), the model checks
/// the guesses in the forward that drafts its own next token anyway, and the gate's cap is only
/// an upper bound: the drafter checks as much of a run as its measured price of a row and the
/// model's recent agreement make worth it ([`crate::run_worth`]). Where rows are cheap (three
/// positions cost the AVX-512 Xeon's draft ~1.3-1.4x one) two right guesses are two more tokens
/// for little and make the streak trusted at once; where they are dear (2.2x on an AVX2 core)
/// only guesses the model has lately agreed with are checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LookupGate {
    streak: usize,
    floor: usize,
    max: usize,
}

impl LookupGate {
    /// Right guesses in a row before the lookup's runs are trusted over the model.
    pub const TRUST: usize = 2;
    /// The floor of a lookup drafting alone: its guesses go straight to the verify model.
    pub const FLOOR_ALONE: usize = 1;
    /// The floor of a lookup ahead of the draft model, which checks its guesses first (measured
    /// against 1 and 3 on the refactor set, 20 samples x 256 tokens: the README's *Defaults,
    /// measured*).
    pub const FLOOR_CHECKED: usize = 2;

    pub fn new(floor: usize, max: usize) -> Self {
        Self {
            streak: 0,
            floor,
            max: max.max(floor).max(1),
        }
    }

    /// Lookup tokens to propose now (0: the model drafts).
    pub fn cap(&self) -> usize {
        let trusted = if self.streak >= Self::TRUST {
            self.streak
        } else {
            0
        };
        trusted.max(self.floor).min(self.max)
    }

    /// A guess was checked against the committed token.
    pub fn observe(&mut self, right: bool) {
        self.streak = if right { self.streak + 1 } else { 0 };
    }
}

/// Where a draft token came from (the region records it per draft position).
pub use amusd_shm::TokenSource as Source;

/// The lookup's state for one drafted sequence: the index over it, the gate, and per position
/// where the token came from and what the lookup guessed there.
pub struct Lookup {
    index: NgramIndex,
    gate: LookupGate,
    /// Per position of the sequence: the lookup's first guess there, if it had a match.
    guesses: Vec<Option<u32>>,
    sources: Vec<Source>,
}

impl Lookup {
    /// `floor`: the lookup tokens proposed while the gate does not trust the lookup (see
    /// [`LookupGate`]); `max_run`: the longest run proposed at once.
    pub fn new(range: NgramRange, floor: usize, max_run: usize) -> Self {
        Self {
            index: NgramIndex::new(range),
            gate: LookupGate::new(floor, max_run),
            guesses: Vec::new(),
            sources: Vec::new(),
        }
    }

    pub fn range(&self) -> NgramRange {
        self.index.range()
    }

    /// A new request: the sequence becomes `prompt`. The gate keeps what it learnt.
    pub fn start(&mut self, prompt: &[u32]) {
        self.truncate(0);
        for &t in prompt {
            self.push(t, Source::Model, None);
        }
    }

    /// The sequence grew by `token`, drafted by `source`; `guess` is what the lookup proposed there.
    pub fn push(&mut self, token: u32, source: Source, guess: Option<u32>) {
        self.index.push(token);
        self.guesses.push(guess);
        self.sources.push(source);
    }

    pub fn truncate(&mut self, len: usize) {
        self.index.truncate(len);
        self.guesses.truncate(len);
        self.sources.truncate(len);
    }

    /// Scores the guesses at `positions` against the committed tokens there.
    pub fn score(&mut self, committed: &[u32], positions: std::ops::Range<usize>) {
        for p in positions {
            if let (Some(Some(g)), Some(&c)) = (self.guesses.get(p), committed.get(p)) {
                self.gate.observe(*g == c);
            }
        }
    }

    /// The lookup's next token, if it has a match (recorded as a guess where the model drafts).
    pub fn guess(&self) -> Option<u32> {
        self.index.propose(1).first().copied()
    }

    /// Up to `max` tokens as the gate allows, cut after the first stop token.
    pub fn propose(&self, max: usize, stop_ids: &[u32]) -> Vec<u32> {
        let mut run = self.index.propose(max.min(self.gate.cap()));
        if let Some(i) = run.iter().position(|t| stop_ids.contains(t)) {
            run.truncate(i + 1);
        }
        run
    }

    /// How many tokens the gate allows now.
    pub fn cap(&self) -> usize {
        self.gate.cap()
    }

    pub fn source(&self, position: usize) -> Source {
        self.sources.get(position).copied().unwrap_or(Source::Model)
    }
}

/// The decoder of a lookup drafting alone: no model. The drafter never runs it; if it is asked
/// to, it says so.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoModel;

impl Decoder for NoModel {
    fn cached(&self) -> usize {
        0
    }
    fn capacity(&self) -> usize {
        usize::MAX
    }
    fn start(&mut self, _: &[u32], _: usize, _: bool) -> Result<usize, SpecError> {
        Ok(0)
    }
    fn next_tokens(
        &mut self,
        _: &[u32],
        _: usize,
        _: usize,
        _: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError> {
        Err(SpecError::Protocol(
            "the lookup drafter has no model to run".into(),
        ))
    }
    fn prefill_bulk(&mut self, _: &[u32], _: usize) -> Result<(), SpecError> {
        Err(SpecError::Protocol(
            "the lookup drafter has no model to prefill".into(),
        ))
    }
    fn truncate(&mut self, _: usize) {}
    fn set_batching(&mut self, _: amusd_model::Batching) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index(range: (usize, usize), tokens: &[u32]) -> NgramIndex {
        let mut i = NgramIndex::new(NgramRange {
            min: range.0,
            max: range.1,
        });
        i.extend(tokens);
        i
    }

    /// The definition, by brute force: the latest earlier occurrence of the longest suffix.
    fn naive_find(tokens: &[u32], range: NgramRange) -> Option<(usize, usize)> {
        let len = tokens.len();
        for n in (range.min..=range.max).rev() {
            if len <= n {
                continue;
            }
            let suffix = &tokens[len - n..];
            if let Some(at) = (n..len).rev().find(|&at| &tokens[at - n..at] == suffix) {
                return Some((at, n));
            }
        }
        None
    }

    #[test]
    fn proposes_what_followed_the_suffix() {
        // "the cat sat . the cat" -> "sat ."
        let i = index((1, 3), &[1, 2, 3, 4, 1, 2]);
        assert_eq!(i.find(), Some((2, 2)));
        assert_eq!(i.propose(2), vec![3, 4]);
    }

    #[test]
    fn prefers_the_longest_suffix_then_the_latest_occurrence() {
        // Suffix [7, 8] occurs at 0..2 (then 1) and at 4..6 (then 2); [9, 7, 8] only at 3..6.
        let i = index((1, 3), &[7, 8, 1, 9, 7, 8, 2, 5, 9, 7, 8]);
        assert_eq!(i.find(), Some((6, 3)));
        assert_eq!(i.propose(1), vec![2]);
        let j = index((1, 2), &[7, 8, 1, 4, 7, 8, 2, 5, 7, 8]);
        assert_eq!(j.find(), Some((6, 2)), "latest of the two occurrences");
    }

    #[test]
    fn respects_the_minimum_length() {
        let i = index((2, 3), &[5, 6, 1, 6]);
        assert_eq!(i.find(), None, "a 1-token match is below the minimum");
        assert!(i.propose(4).is_empty());
        assert_eq!(index((1, 3), &[5, 6, 1, 6]).propose(2), vec![1, 6]);
    }

    #[test]
    fn an_overlapping_match_repeats_its_period() {
        // a b a b: the suffix [a, b] last occurred at 0..2, followed by "a b" and then the
        // proposal's own tokens.
        let i = index((2, 2), &[1, 2, 1, 2]);
        assert_eq!(i.propose(5), vec![1, 2, 1, 2, 1]);
        // A run of one token proposes more of it.
        assert_eq!(index((2, 3), &[4, 4, 4]).propose(3), vec![4, 4, 4]);
    }

    #[test]
    fn truncation_forgets_exactly_the_dropped_tokens() {
        let mut i = index((1, 3), &[1, 2, 3, 1, 2, 4, 1, 2]);
        assert_eq!(i.propose(1), vec![4]);
        i.truncate(5);
        // [1, 2, 3, 1, 2]: the [1, 2] followed by 4 is gone; the one followed by 3 is back.
        assert_eq!(i.propose(1), vec![3]);
        i.extend(&[9, 1, 2]);
        assert_eq!(i.propose(1), vec![9]);
        i.clear();
        assert!(i.is_empty() && i.find().is_none());
        i.extend(&[1, 2, 1]);
        assert_eq!(i.propose(1), vec![2]);
    }

    #[test]
    fn parses_ranges_and_specs() {
        assert_eq!(
            "1-3".parse::<NgramRange>().unwrap(),
            NgramRange { min: 1, max: 3 }
        );
        for bad in ["", "3", "0-2", "3-2", "1-17", "a-b", "2-"] {
            assert!(bad.parse::<NgramRange>().is_err(), "{bad}");
        }
        assert_eq!(parse_spec("lookup").unwrap().unwrap(), NgramRange::DEFAULT);
        assert_eq!(
            NgramRange::DEFAULT_TEXT.parse::<NgramRange>().unwrap(),
            NgramRange::DEFAULT
        );
        assert_eq!(
            parse_spec("lookup:3-5").unwrap().unwrap().to_string(),
            "3-5"
        );
        assert!(parse_spec("lookup:5").unwrap().is_err());
        assert!(parse_spec("model.gguf").is_none());
    }

    #[test]
    fn the_gate_trusts_a_streak_and_drops_it_on_a_wrong_guess() {
        let mut g = LookupGate::new(0, 16);
        assert_eq!(
            g.cap(),
            0,
            "the model drafts until the lookup has shown it is right"
        );
        g.observe(true);
        assert_eq!(g.cap(), 0);
        g.observe(true);
        assert_eq!(g.cap(), LookupGate::TRUST);
        for _ in 0..30 {
            g.observe(true);
        }
        assert_eq!(g.cap(), 16, "bounded by the longest run");
        g.observe(false);
        assert_eq!(g.cap(), 0, "a wrong guess hands back to the model");
        let mut alone = LookupGate::new(1, 8);
        assert_eq!(alone.cap(), 1, "with a floor, the lookup always proposes");
        for _ in 0..5 {
            alone.observe(true);
        }
        assert_eq!(alone.cap(), 5);
        alone.observe(false);
        assert_eq!(alone.cap(), 1);
        let mut checked = LookupGate::new(LookupGate::FLOOR_CHECKED, 8);
        assert_eq!(checked.cap(), 2);
        checked.observe(true);
        assert_eq!(checked.cap(), 2, "the floor, until the streak passes it");
        for _ in 0..2 {
            checked.observe(true);
        }
        assert_eq!(checked.cap(), 3);
        checked.observe(false);
        assert_eq!(checked.cap(), 2, "a wrong guess drops back to the floor");
    }

    proptest! {
        /// Any interleaving of pushes and truncations leaves the index answering as a rescan of
        /// the same tokens does.
        #[test]
        fn matches_a_rescan_after_any_edits(
            ops in proptest::collection::vec((0usize..4, proptest::collection::vec(0u32..4, 0..12)), 1..30),
            min in 1usize..3, extra in 0usize..3,
        ) {
            let range = NgramRange { min, max: min + extra };
            let mut i = NgramIndex::new(range);
            for (cut, tokens) in ops {
                i.truncate(i.len().saturating_sub(cut));
                i.extend(&tokens);
                prop_assert_eq!(i.find(), naive_find(i.tokens(), range));
            }
        }
    }
}
