//! A deterministic stand-in model with no weights, for protocol tests.
//!
//! The "true" next token is a hash of the position and the last few tokens, so any slip in rollback or
//! caching changes everything after it. A draft configured with `err=R` replaces the true token with
//! a different one at a rate R, also decided by a hash of the context, so runs are reproducible.
//! When sampling, the model's logits are a hash-made background shared by every model of one seed
//! plus a peak at its own token: a draft then proposes the verify model's sample most of the time.

use std::time::Duration;

use crate::decoder::Decoder;
use crate::sampling::Sampler;
use crate::SpecError;

#[derive(Clone, Debug, PartialEq)]
pub struct FakeModel {
    pub vocab: u32,
    pub seed: u64,
    /// Fraction of positions where this model deliberately disagrees with the error-free one.
    pub err: f64,
    /// Simulated compute per forward pass and per token, in microseconds.
    pub us_per_token: u64,
    /// The end-of-sequence id; the true model emits it about once every `eos_every` positions.
    pub eos: u32,
    pub eos_every: u64,
    pub capacity: usize,
    /// Simulated model loading time, in milliseconds (`load_ms=`), so tests can act on a worker
    /// while it loads or while the other one does.
    pub load_ms: u64,
    /// Whether the true token depends on the position too (`pos=1`, the default). With `pos=0` it
    /// depends on the last three tokens only, so text repeats itself as soon as three tokens do:
    /// prompt lookup's best case (its errors, `err`, still fall by position).
    pub positional: bool,
}

impl Default for FakeModel {
    fn default() -> Self {
        Self {
            vocab: 512,
            seed: 1,
            err: 0.0,
            us_per_token: 0,
            eos: 0,
            eos_every: 0,
            capacity: 1 << 16,
            load_ms: 0,
            positional: true,
        }
    }
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51afd7ed558ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ceb9fe1a85ec53);
    x ^ (x >> 33)
}

impl FakeModel {
    /// Parses `fake:vocab=512,seed=7,err=0.3,us=200,eos_every=64,pos=0`.
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::FakeSpec(spec.to_string());
        let rest = spec.strip_prefix("fake").ok_or_else(bad)?;
        let rest = rest.strip_prefix(':').unwrap_or(rest);
        let mut m = Self::default();
        for kv in rest.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            match k {
                "vocab" => m.vocab = v.parse().map_err(|_| bad())?,
                "seed" => m.seed = v.parse().map_err(|_| bad())?,
                "err" => m.err = v.parse().map_err(|_| bad())?,
                "us" => m.us_per_token = v.parse().map_err(|_| bad())?,
                "eos" => m.eos = v.parse().map_err(|_| bad())?,
                "eos_every" => m.eos_every = v.parse().map_err(|_| bad())?,
                "ctx" => m.capacity = v.parse().map_err(|_| bad())?,
                "load_ms" => m.load_ms = v.parse().map_err(|_| bad())?,
                "pos" => m.positional = v.parse::<u8>().map_err(|_| bad())? != 0,
                _ => return Err(bad()),
            }
        }
        if m.vocab < 2 || !(0.0..=1.0).contains(&m.err) {
            return Err(bad());
        }
        Ok(m)
    }

    pub fn is_fake(spec: &str) -> bool {
        spec == "fake" || spec.starts_with("fake:")
    }

    fn context_hash(&self, context: &[u32]) -> u64 {
        let n = if self.positional {
            context.len() as u64
        } else {
            0
        };
        let mut h = mix(self.seed ^ n.wrapping_mul(0x9e3779b97f4a7c15));
        for &t in context.iter().rev().take(3) {
            h = mix(h ^ t as u64);
        }
        h
    }

    /// Logits after `context`: a background in [0, 2) from the context hash (the same for every
    /// `err`), the eos id far below unless predicted, and +8 on [`Self::next`].
    pub fn logits(&self, context: &[u32]) -> Vec<f32> {
        let h = self.context_hash(context);
        let peak = self.next(context);
        (0..self.vocab)
            .map(|j| {
                let r = mix(h ^ u64::from(j + 1).wrapping_mul(0xa24baed4963ee407));
                let background = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0;
                if j == peak {
                    background + 8.0
                } else if j == self.eos && self.eos_every > 0 {
                    background - 20.0
                } else {
                    background
                }
            })
            .collect()
    }

    /// The token this model predicts after `context` (its greedy choice).
    pub fn next(&self, context: &[u32]) -> u32 {
        let h = self.context_hash(context);
        let truth = if self.eos_every > 0 && h.is_multiple_of(self.eos_every) {
            self.eos
        } else {
            // Never the eos id by accident.
            let t = ((h >> 17) % self.vocab as u64) as u32;
            if t == self.eos && self.eos_every > 0 {
                (t + 1) % self.vocab
            } else {
                t
            }
        };
        if self.err > 0.0 {
            // Errors fall by position in either mode (positional hashes include it already).
            let at = if self.positional {
                h
            } else {
                mix(h ^ (context.len() as u64).wrapping_mul(0xd6e8feb86659fd93))
            };
            let e = mix(at ^ 0x5bd1e995 ^ self.seed.rotate_left(17));
            if (e as f64 / u64::MAX as f64) < self.err {
                let wrong = (truth + 1 + (e % (self.vocab as u64 - 1)) as u32) % self.vocab;
                return wrong;
            }
        }
        truth
    }

    /// The error-free model with the same seed.
    pub fn truth(&self) -> Self {
        Self {
            err: 0.0,
            ..self.clone()
        }
    }
}

/// A [`FakeModel`] with its "cache": the tokens it has been fed.
pub struct FakeDecoder {
    pub model: FakeModel,
    seen: Vec<u32>,
    /// Positions reserved by the last `start`: like the real KV cache, a forward past it fails, so
    /// the protocol tests catch a worker that reserves too little.
    reserved: usize,
}

impl FakeDecoder {
    pub fn new(model: FakeModel) -> Self {
        Self {
            model,
            seen: Vec::new(),
            reserved: 0,
        }
    }
}

impl Decoder for FakeDecoder {
    fn cached(&self) -> usize {
        self.seen.len()
    }
    fn capacity(&self) -> usize {
        self.model.capacity
    }
    fn start(&mut self, prompt: &[u32], len: usize, reuse: bool) -> Result<usize, SpecError> {
        crate::decoder::check_reservation(len, self.capacity())?;
        let keep = if reuse {
            crate::decoder::kept_prefix(&self.seen, prompt)
        } else {
            0
        };
        self.seen.truncate(keep);
        self.reserved = len;
        Ok(keep)
    }
    fn next_tokens(
        &mut self,
        tokens: &[u32],
        start: usize,
        first_row: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError> {
        if start > self.seen.len() {
            return Err(SpecError::Protocol(format!(
                "fake forward at {start} with {} cached",
                self.seen.len()
            )));
        }
        crate::decoder::check_reservation(start + tokens.len(), self.reserved)?;
        if let Some(t) = tokens.iter().find(|&&t| t >= self.model.vocab) {
            return Err(SpecError::Protocol(format!(
                "token {t} outside the fake vocabulary"
            )));
        }
        if self.model.us_per_token > 0 {
            // Simulated compute, so that timing-dependent interleavings of the workers get exercised.
            std::thread::sleep(Duration::from_micros(
                self.model.us_per_token * (1 + tokens.len() as u64 / 4),
            ));
        }
        self.seen.truncate(start);
        let mut out = Vec::with_capacity(tokens.len().saturating_sub(first_row));
        for (i, &t) in tokens.iter().enumerate() {
            self.seen.push(t);
            if i >= first_row {
                out.push(if sampler.is_plain_greedy() && !sampler.records() {
                    self.model.next(&self.seen)
                } else {
                    sampler.choose(&self.model.logits(&self.seen), &self.seen)
                });
            }
        }
        Ok(out)
    }
    /// As any other forward: the fake model has one arithmetic.
    fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError> {
        let last = tokens.len().saturating_sub(1);
        self.next_tokens(tokens, start, last, &mut Sampler::default())
            .map(drop)
    }
    fn truncate(&mut self, len: usize) {
        self.seen.truncate(len);
    }
    /// The fake model's tokens do not depend on batching.
    fn set_batching(&mut self, _: amusd_model::Batching) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::{Decoder, Drafter, Verifier};
    use crate::generate::{autoregressive, speculative};
    use crate::policy::StopCriteria;
    use crate::run_worth::ForwardCost;
    use crate::sampling::{Dry, LogitBias, Penalties, RequestSampling, SamplingParams};
    use proptest::prelude::*;
    use std::ops::ControlFlow;

    /// No penalty, or some of each kind over a window or the whole sequence.
    fn any_penalties() -> impl Strategy<Value = Penalties> {
        prop_oneof![
            Just(Penalties::OFF),
            (
                prop_oneof![Just(1.0f32), 0.5f32..2.0],
                -1.0f32..1.0,
                -1.0f32..1.0,
                prop_oneof![Just(u32::MAX), 1u32..40],
            )
                .prop_map(|(repeat, frequency, presence, last_n)| Penalties {
                    repeat,
                    frequency,
                    presence,
                    last_n,
                }),
        ]
    }

    /// DRY off, or on with a few breakers among the fake models' small ids.
    fn any_dry() -> impl Strategy<Value = Dry> {
        prop_oneof![
            Just(Dry::OFF),
            (
                0.1f32..3.0,
                1.0f32..3.0,
                0u32..4,
                prop_oneof![Just(u32::MAX), 1u32..60],
                proptest::collection::vec(0u32..64, 0..6),
            )
                .prop_map(|(multiplier, base, allowed_length, last_n, breakers)| Dry {
                    multiplier,
                    base,
                    allowed_length,
                    last_n,
                    breakers: Dry::breaker_bits(breakers),
                }),
        ]
    }

    /// No bias, or a few tokens of a small vocabulary biased either way (or banned): enough to
    /// move the fake model's +8 peak now and then.
    pub(crate) fn any_logit_bias() -> impl Strategy<Value = LogitBias> {
        prop_oneof![
            Just(LogitBias::NONE),
            proptest::collection::btree_map(
                0u32..64,
                prop_oneof![-12.0f32..12.0, Just(f32::NEG_INFINITY)],
                1..6
            )
            .prop_map(|m| LogitBias::new(m).unwrap()),
        ]
    }

    /// No grammar, or the fake one ([`crate::constraint::fake`]): token `i` is `≡ i (mod m)`, at
    /// most `len` tokens before the default fake eos (0).
    pub(crate) fn any_grammar() -> impl Strategy<Value = Option<crate::constraint::Grammar>> {
        proptest::option::weighted(
            0.3,
            (1u32..4, 0usize..40).prop_map(|(m, len)| crate::constraint::fake::grammar(m, len, 0)),
        )
    }

    /// The committed tokens follow the request's fake grammar, if it has one.
    fn check_grammar(g: &crate::Generation, s: &RequestSampling) -> Result<(), TestCaseError> {
        let Some(grammar) = &s.grammar else {
            return Ok(());
        };
        let f: Vec<u32> = grammar
            .text
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        for (i, &t) in g.tokens.iter().enumerate() {
            prop_assert!(
                t % f[0] == i as u32 % f[0] && i < f[1] as usize,
                "token {} = {} breaks {}",
                i,
                t,
                grammar.text
            );
        }
        Ok(())
    }

    /// Greedy, or sampling with or without filters (typical-p and XTC among them), with or without penalties, with a sampling or
    /// a greedy draft, with or without the draft's prompt lookup, keeping the previous request's
    /// cache or not.
    pub(crate) fn any_sampling() -> impl Strategy<Value = RequestSampling> {
        (
            (
                prop_oneof![Just(0.0f32), Just(0.3), Just(0.7), Just(1.0), Just(1.5)],
                prop_oneof![Just(0.0f32), 0.1f32..1.0],
            ),
            prop_oneof![Just(0u32), 1u32..20],
            prop_oneof![Just(1.0f32), 0.3f32..1.0],
            (
                (
                    prop_oneof![Just(0.0f32), 0.0f32..0.3],
                    prop_oneof![Just(0.0f32), 0.5f32..3.0],
                ),
                prop_oneof![Just(1.0f32), 0.2f32..1.0],
                prop_oneof![Just(0.0f32), 0.0f32..=1.0],
                0.0f32..0.6,
            ),
            any::<u64>(),
            proptest::bool::weighted(0.2),
            proptest::bool::weighted(0.25),
            any::<bool>(),
            (
                (any_penalties(), any_dry()),
                any_logit_bias(),
                proptest::option::of(0usize..4),
                any_grammar(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (t, dynatemp_range),
                    top_k,
                    top_p,
                    ((min_p, top_n_sigma), typical_p, xtc_probability, xtc_threshold),
                    seed,
                    greedy_draft,
                    no_draft_lookup,
                    cache,
                    ((penalties, dry), logit_bias, logprobs, grammar, prompt_logprobs),
                )| {
                    RequestSampling {
                        params: SamplingParams {
                            temperature: t,
                            dynatemp_range,
                            dynatemp_exponent: 1.0,
                            top_k,
                            top_p,
                            min_p,
                            top_n_sigma,
                            typical_p,
                            xtc_probability,
                            xtc_threshold,
                            seed,
                            penalties,
                            logit_bias,
                            dry,
                        },
                        greedy_draft,
                        no_draft_lookup,
                        cache_prompt: cache,
                        prompt_logprobs: prompt_logprobs && logprobs.is_some(),
                        logprobs,
                        grammar,
                    }
                },
            )
    }

    /// One record per generated token when asked for, each its token's, with the top `k` best
    /// first; none otherwise. The same for the prompt's tokens after its first, when asked for.
    fn check_logprobs(
        g: &crate::Generation,
        s: &RequestSampling,
        prompt: &[u32],
        max_new: usize,
    ) -> Result<(), TestCaseError> {
        let Some(k) = s.logprobs else {
            prop_assert!(g.logprobs.is_empty() && g.prompt_logprobs.is_empty());
            return Ok(());
        };
        // A request that generates nothing runs no model.
        if s.prompt_logprobs && max_new > 0 {
            prop_assert_eq!(g.prompt_logprobs.len(), prompt.len() - 1);
            for (l, &t) in g.prompt_logprobs.iter().zip(&prompt[1..]) {
                prop_assert_eq!(l.chosen.token, t);
                prop_assert!(l.chosen.logprob <= 0.0 && l.top.len() == k);
            }
        } else {
            prop_assert!(g.prompt_logprobs.is_empty());
        }
        prop_assert_eq!(g.logprobs.len(), g.tokens.len());
        for (l, &t) in g.logprobs.iter().zip(&g.tokens) {
            prop_assert_eq!(l.chosen.token, t);
            prop_assert!(l.chosen.logprob <= 0.0);
            prop_assert_eq!(l.top.len(), k);
            prop_assert!(l.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        }
        Ok(())
    }

    pub(crate) fn fake_constraints() -> Option<std::sync::Arc<dyn crate::constraint::Constraints>> {
        Some(std::sync::Arc::new(
            crate::constraint::fake::FakeConstraints,
        ))
    }

    fn prompt(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
        (0..len as u64)
            .map(|i| (mix(seed ^ i) % vocab as u64) as u32)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Synchronous speculative decoding commits exactly the autoregressive tokens, whatever the
        /// draft's error rate, the lookahead and the sampling.
        #[test]
        fn sd_equals_ar(seed: u64, err in 0.0f64..1.0, lookahead in 1usize..12, plen in 1usize..20, max_new in 0usize..80, sampling in any_sampling()) {
            let truth = FakeModel { seed, eos_every: 40, ..Default::default() };
            let draft = FakeModel { err, ..truth.clone() };
            let p = prompt(seed, plen, truth.vocab);
            let stop = StopCriteria { stop_ids: vec![truth.eos], max_new_tokens: max_new };
            let mut v = Verifier::new(FakeDecoder::new(truth.clone())).with_constraints(fake_constraints());
            let ar = autoregressive(&mut v, &p, &stop, &sampling, &mut |_, _| ControlFlow::Continue(())).unwrap();
            // A draft without the grammar proposes what it forbids, and is rejected there.
            let draft_constraints = if seed % 3 == 0 { None } else { fake_constraints() };
            let mut d = Drafter::new(FakeDecoder::new(draft)).with_constraints(draft_constraints);
            let mut streamed = Vec::new();
            let sd = speculative(&mut v, &mut d, &p, &stop, &sampling, lookahead, &mut |t, _| { streamed.extend_from_slice(t); ControlFlow::Continue(()) }).unwrap();
            prop_assert_eq!(&ar.tokens, &sd.tokens);
            prop_assert_eq!(&streamed, &sd.tokens);
            prop_assert_eq!(ar.finish, sd.finish);
            prop_assert_eq!(&ar.logprobs, &sd.logprobs);
            prop_assert_eq!(&ar.prompt_logprobs, &sd.prompt_logprobs);
            check_logprobs(&ar, &sampling, &p, max_new)?;
            check_grammar(&ar, &sampling)?;
            prop_assert!(sd.tokens.len() <= max_new);
            prop_assert!(!sd.tokens.contains(&truth.eos));
        }
    }

    /// A prompt of `period` tokens repeated: lookup finds matches from the first drafted token.
    fn periodic_prompt(seed: u64, period: usize, len: usize, vocab: u32) -> Vec<u32> {
        let p = prompt(seed, period, vocab);
        (0..len).map(|i| p[i % period]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// With prompt lookup drafting alone or ahead of the model (with or without the n-gram
        /// history, which a second request runs with what the first taught it), sd still commits
        /// exactly the autoregressive tokens: on text that repeats itself (`pos=0`, long right
        /// runs broken by the verify model's positional errors: long wrong runs) and on text that
        /// does not.
        #[test]
        fn sd_with_lookup_equals_ar(
            seed: u64, positional: bool, alone: bool, err in 0.0f64..0.3, lookahead in 1usize..8,
            min in 1usize..4, extra in 0usize..3, max_run in 1usize..40, plen in 1usize..60,
            max_new in 0usize..120, sampling in any_sampling(), history: bool,
        ) {
            let truth = FakeModel { seed, vocab: 12, eos_every: 90, positional, err, ..Default::default() };
            let p = periodic_prompt(seed, 7, plen, truth.vocab);
            let stop = StopCriteria { stop_ids: vec![truth.eos], max_new_tokens: max_new };
            let mut v = Verifier::new(FakeDecoder::new(truth.clone())).with_constraints(fake_constraints());
            let ar = autoregressive(&mut v, &p, &stop, &sampling, &mut |_, _| ControlFlow::Continue(())).unwrap();
            check_grammar(&ar, &sampling)?;
            let range = crate::lookup::NgramRange { min, max: min + extra };
            let decoder: Box<dyn Decoder> = if alone {
                Box::new(crate::lookup::NoModel)
            } else {
                Box::new(FakeDecoder::new(FakeModel { err: 0.0, ..truth.clone() }))
            };
            let mut d = Drafter::new(decoder).with_lookup(range, alone, max_run).with_constraints(fake_constraints());
            if history {
                // Taught by other text first, so it also guesses wrong.
                let mut h = crate::history::NgramHistory::new(8);
                h.learn(&prompt(seed ^ 1, 200, truth.vocab), 0);
                d = d.with_history(h);
            }
            for _request in 0..1 + usize::from(history) {
                let mut streamed = Vec::new();
                let sd = speculative(&mut v, &mut d, &p, &stop, &sampling, lookahead, &mut |t, _| { streamed.extend_from_slice(t); ControlFlow::Continue(()) }).unwrap();
                prop_assert_eq!(&ar.tokens, &sd.tokens);
                prop_assert_eq!(&streamed, &sd.tokens);
                prop_assert_eq!(ar.finish, sd.finish);
                prop_assert_eq!(&ar.logprobs, &sd.logprobs);
                check_lookup_metrics(&sd.metrics, alone, &sampling)?;
            }
        }
    }

    /// The lookup's counts are within the totals; all of them without a model, none when the
    /// request turned the lookup off.
    fn check_lookup_metrics(
        m: &crate::Metrics,
        alone: bool,
        sampling: &RequestSampling,
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        prop_assert!(m.accepted_lookup <= m.accepted && m.proposed_lookup <= m.proposed);
        prop_assert!(m.accepted_lookup <= m.proposed_lookup);
        if alone {
            prop_assert_eq!(m.proposed_lookup, m.proposed, "no model, no model tokens");
        } else if sampling.no_draft_lookup {
            prop_assert_eq!(m.proposed_lookup, 0, "the request turned the lookup off");
        }
        Ok(())
    }

    /// Text that repeats itself: the lookup's runs grow to `max_run` and are accepted; where the
    /// verify model's positional errors break the pattern, a long run is rejected part-way.
    #[test]
    fn lookup_runs_grow_on_repeating_text_and_fail_long_where_it_breaks() {
        let truth = FakeModel {
            seed: 5,
            vocab: 6,
            positional: false,
            err: 0.02,
            ..Default::default()
        };
        let p = periodic_prompt(5, 9, 40, truth.vocab);
        let stop = StopCriteria {
            stop_ids: vec![],
            max_new_tokens: 600,
        };
        let sampling = RequestSampling::default();
        let mut v = Verifier::new(FakeDecoder::new(truth.clone()));
        let ar = autoregressive(&mut v, &p, &stop, &sampling, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        let range = crate::lookup::NgramRange { min: 3, max: 4 };
        let mut d = Drafter::new(crate::lookup::NoModel).with_lookup(range, true, 24);
        let sd = speculative(&mut v, &mut d, &p, &stop, &sampling, 4, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ar.tokens, sd.tokens);
        let m = &sd.metrics;
        let longest = m.accepted_per_step.iter().max().copied().unwrap_or(0);
        assert!(
            longest >= 20,
            "runs grow to the cap: longest accepted {longest}"
        );
        assert!(
            m.accepted_lookup * 10 >= sd.tokens.len() * 7,
            "most tokens come from the lookup: {} of {}",
            m.accepted_lookup,
            sd.tokens.len()
        );
        let wasted = m.proposed_lookup - m.accepted_lookup;
        assert!(
            wasted >= 8,
            "some long runs fail part-way: {wasted} tokens rejected"
        );
        assert!(
            m.verify_steps * 3 < sd.tokens.len(),
            "{} steps",
            m.verify_steps
        );
    }

    /// A drafter with the lookup ahead of `draft` (3-4-grams), its rows priced at `cost` of a
    /// forward, drafting `draft`'s text after a periodic prompt to 300 tokens, every draft
    /// committed as is (which is what lets the lookup's gate open); `step` sees the drafter and
    /// each step's new positions. Returns the steps (one forward each) and the tokens drafted.
    fn drafting_committed(
        draft: &FakeModel,
        cost: f64,
        mut step: impl FnMut(&Drafter<FakeDecoder>, std::ops::Range<usize>),
    ) -> (usize, usize) {
        let p = periodic_prompt(draft.seed, 9, 40, draft.vocab);
        let range = crate::lookup::NgramRange { min: 3, max: 4 };
        let mut d = Drafter::new(FakeDecoder::new(draft.clone()))
            .with_lookup(range, false, 16)
            .with_forward_cost(ForwardCost::Fixed(cost));
        d.start(&p, 400, false).unwrap();
        let mut steps = 0;
        while d.seq().len() < 300 {
            let committed = d.seq().to_vec();
            d.sync(&committed);
            let (n, _) = d.extend(committed.len(), 1, 300, &[]).unwrap();
            assert!(n >= 1);
            steps += 1;
            step(&d, committed.len()..d.seq().len());
        }
        (steps, d.seq().len() - p.len())
    }

    fn from_lookup(d: &Drafter<FakeDecoder>, positions: std::ops::Range<usize>) -> usize {
        positions
            .filter(|&pos| d.source(pos) == crate::lookup::Source::Lookup)
            .count()
    }

    /// Ahead of a model, a lookup run is checked by the draft model before it is proposed: every
    /// draft token is the draft model's own greedy choice, so a wrong run never reaches the verify
    /// model; on repeating text most tokens come from runs the model confirmed, several a forward.
    #[test]
    fn a_lookup_run_ahead_of_the_model_proposes_only_the_models_tokens() {
        let draft = FakeModel {
            seed: 5,
            vocab: 6,
            positional: false,
            err: 0.03,
            ..Default::default()
        };
        let mut lookup = 0;
        let (steps, drafted) = drafting_committed(&draft, 0.25, |d, new| {
            for pos in new.clone() {
                assert_eq!(d.seq()[pos], draft.next(&d.seq()[..pos]), "position {pos}");
            }
            lookup += from_lookup(d, new);
            assert_eq!(
                d.decoder.cached(),
                d.seq().len() - 1,
                "the cache holds the agreed run"
            );
        });
        assert!(
            lookup * 3 > drafted,
            "{lookup} of {drafted} from lookup runs"
        );
        assert!(
            steps * 3 < drafted * 2,
            "{steps} forwards for {drafted} tokens"
        );
    }

    /// Where a row costs most of a forward (a compute-bound draft), the model checks only
    /// guesses it has lately agreed with: none on text the lookup cannot predict (each forward
    /// one row wide), runs on text that repeats.
    #[test]
    fn a_dear_row_is_spent_only_on_guesses_the_model_takes() {
        let run = |positional: bool| {
            let draft = FakeModel {
                seed: 8,
                vocab: 6,
                positional,
                err: 0.03,
                ..Default::default()
            };
            let mut lookup = 0;
            let (forwards, n) =
                drafting_committed(&draft, 0.7, |d, new| lookup += from_lookup(d, new));
            (forwards, lookup, n)
        };
        let (forwards, lookup, n) = run(true);
        assert_eq!((forwards, lookup), (n, 0), "unpredictable text");
        let (forwards, lookup, n) = run(false);
        assert!(lookup * 2 > n, "repeating text: {lookup} of {n}");
        assert!(forwards * 2 < n, "{forwards} forwards for {n} tokens");
    }

    /// The n-gram history carries what one request committed over to the next: run again on the
    /// same prompt (text the lookup finds no match in), the draft model confirms the history's
    /// runs several tokens a forward, and every token drafted is still its own.
    #[test]
    fn the_history_drafts_a_second_request_from_what_the_first_committed() {
        let draft = FakeModel {
            seed: 11,
            vocab: 1000,
            ..Default::default()
        };
        let p = prompt(11, 30, draft.vocab);
        let range = crate::lookup::NgramRange::DEFAULT;
        let mut d = Drafter::new(FakeDecoder::new(draft.clone()))
            .with_lookup(range, false, 16)
            .with_history(crate::history::NgramHistory::new(12))
            .with_forward_cost(ForwardCost::Fixed(0.25));
        let mut request = || {
            d.start(&p, 400, false).unwrap();
            let (mut forwards, mut from_history) = (0, 0);
            while d.seq().len() < p.len() + 150 {
                let committed = d.seq().to_vec();
                d.sync(&committed);
                d.extend(committed.len(), 4, 400, &[]).unwrap();
                forwards += 1;
                for pos in committed.len()..d.seq().len() {
                    assert_eq!(d.seq()[pos], draft.next(&d.seq()[..pos]), "position {pos}");
                    from_history += usize::from(d.source(pos) == crate::lookup::Source::History);
                }
            }
            (forwards, from_history, d.seq().len() - p.len())
        };
        let (first, _, _) = request();
        let (second, from_history, drafted) = request();
        assert!(
            first >= 140,
            "{first} forwards: the first request had no history to draft from"
        );
        assert!(second * 3 < first, "{second} forwards against {first}");
        assert!(
            from_history * 3 > drafted * 2,
            "{from_history} of {drafted} from the history"
        );
    }

    #[test]
    fn parses_specs() {
        let m = FakeModel::parse("fake:vocab=100,seed=3,err=0.25,us=10").unwrap();
        assert_eq!((m.vocab, m.seed, m.err, m.us_per_token), (100, 3, 0.25, 10));
        assert!(FakeModel::parse("fake:vocab=1").is_err());
        assert!(FakeModel::parse("fake:bogus=1").is_err());
        assert!(FakeModel::parse("fake:err=2").is_err());
    }

    #[test]
    fn error_rate_is_roughly_honoured() {
        let truth = FakeModel::default();
        let draft = FakeModel {
            err: 0.3,
            ..truth.clone()
        };
        let ctx = prompt(9, 4000, truth.vocab);
        let wrong = (1..ctx.len())
            .filter(|&i| truth.next(&ctx[..i]) != draft.next(&ctx[..i]))
            .count();
        let rate = wrong as f64 / ctx.len() as f64;
        assert!((0.25..0.35).contains(&rate), "{rate}");
    }
}
