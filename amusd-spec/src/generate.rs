//! In-process generation: autoregressive (`ar`) and synchronous speculative decoding (`sd`).

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;

use crate::decoder::{Decoder, Drafter, Verifier};
use crate::logprobs::Logprobs;
use crate::lookup::Source;
use crate::policy::{accept, Finish, StopCriteria};
use crate::sampling::RequestSampling;
use crate::SpecError;

/// Timings and acceptance figures of one generation. Times in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// From the start of the request to the first generated token (prefill included).
    pub ttft: f64,
    /// From the first commit to the last; `decode_time / decode_tokens` is the per-token decode
    /// cost, the same definition for every strategy.
    pub decode_time: f64,
    /// Tokens committed after the first commit: the tokens `decode_time` produced (a first commit
    /// of several tokens lands inside the ttft, and must not count again).
    pub decode_tokens: usize,
    /// From the start of the request to the last token, prompt processing included.
    pub total_time: f64,
    /// Draft tokens offered to the verify model (sd: every drafted token; amusd: the valid draft
    /// tokens beyond the committed ones that a verify step took).
    pub proposed: usize,
    /// Of those, the ones the verify model accepted.
    pub accepted: usize,
    pub verify_steps: usize,
    pub rollbacks: usize,
    /// Seconds spent in each draft forward.
    pub draft_times: Vec<f64>,
    /// Seconds spent in each verify forward.
    pub verify_times: Vec<f64>,
    /// Draft tokens accepted by each verify step.
    pub accepted_per_step: Vec<usize>,
    /// Of `proposed`, the tokens drafted by prompt lookup (the rest came from the draft model).
    pub proposed_lookup: usize,
    /// Of `accepted`, the tokens drafted by prompt lookup.
    pub accepted_lookup: usize,
    /// Prompt tokens the verify model found cached from the previous request and did not prefill
    /// again ([`crate::RequestSampling::cache_prompt`]).
    pub cached_prompt_tokens: usize,
    /// Prompt positions the draft worker computed for the verify model, which prefilled the
    /// rest meanwhile (amusd's split prefill, [`crate::split`]); 0 when the verify model
    /// prefilled alone.
    pub split_prompt_tokens: usize,
}

impl Metrics {
    /// Decode ms per token after the first commit; the total time when nothing followed it.
    pub fn ms_per_token(&self) -> f64 {
        if self.decode_tokens > 0 {
            1e3 * self.decode_time / self.decode_tokens as f64
        } else {
            1e3 * self.total_time
        }
    }

    /// Tokens per second end to end: generated tokens over the whole request, prompt included.
    pub fn e2e_tokens_per_s(&self) -> f64 {
        if self.total_time > 0.0 {
            self.new_tokens as f64 / self.total_time
        } else {
            0.0
        }
    }

    /// Draft forward passes (one per drafted token, whether or not it was ever offered).
    pub fn draft_forwards(&self) -> usize {
        self.draft_times.len()
    }

    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }

    /// Mean tokens committed per verify forward.
    pub fn tokens_per_step(&self) -> f64 {
        if self.verify_steps == 0 {
            0.0
        } else {
            self.new_tokens as f64 / self.verify_steps as f64
        }
    }
}

/// The result of one generation.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Each token's log-probabilities, if the request asked for them ([`crate::logprobs`]);
    /// empty otherwise.
    #[serde(skip)]
    pub logprobs: Vec<Logprobs>,
    /// The prompt's tokens' log-probabilities from its second token on, if the request asked
    /// for them ([`crate::RequestSampling::prompt_logprobs`]); empty otherwise.
    #[serde(skip)]
    pub prompt_logprobs: Vec<Logprobs>,
    pub finish: Finish,
    pub metrics: Metrics,
}

/// Receives each batch of committed tokens as it lands, with their log-probabilities (as many, or
/// none when the request did not ask, [`crate::RequestSampling::logprobs`]); `ControlFlow::Break`
/// cancels the request (it ends with [`Finish::Cancelled`]).
pub type OnTokens<'a> = dyn FnMut(&[u32], &[Logprobs]) -> ControlFlow<()> + 'a;

/// Tracks committed tokens, the stop rules, streaming and timing; shared by every strategy.
pub(crate) struct Committer<'a> {
    pub committed: Vec<u32>,
    /// The generated tokens' log-probabilities, when asked for.
    logprobs: Vec<Logprobs>,
    /// The prompt's, when asked for.
    pub prompt_logprobs: Vec<Logprobs>,
    prompt_len: usize,
    stop: &'a StopCriteria,
    on_tokens: &'a mut OnTokens<'a>,
    started: Instant,
    first_token: Option<Instant>,
    /// Tokens of the first commit (they land inside the ttft).
    first_commit: usize,
    pub metrics: Metrics,
    pub finish: Option<Finish>,
}

impl<'a> Committer<'a> {
    pub fn new(prompt: &[u32], stop: &'a StopCriteria, on_tokens: &'a mut OnTokens<'a>) -> Self {
        let metrics = Metrics {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let finish = (stop.max_new_tokens == 0).then_some(Finish::Length);
        Self {
            committed: prompt.to_vec(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            prompt_len: prompt.len(),
            stop,
            on_tokens,
            started: Instant::now(),
            first_token: None,
            first_commit: 0,
            metrics,
            finish,
        }
    }

    pub fn generated(&self) -> usize {
        self.committed.len() - self.prompt_len
    }

    /// Commits what the policy accepted, clipped by the stop rules, with the tokens'
    /// log-probabilities (as many, or none when the request did not ask).
    pub fn push(&mut self, tokens: &[u32], logprobs: &[Logprobs]) {
        let (keep, finish) = self.stop.clip(self.generated(), tokens);
        let logprobs = &logprobs[..keep.min(logprobs.len())];
        self.logprobs.extend_from_slice(logprobs);
        let mut flow = ControlFlow::Continue(());
        if keep > 0 {
            if self.first_token.is_none() {
                self.first_token = Some(Instant::now());
                self.first_commit = keep;
            }
            self.committed.extend_from_slice(&tokens[..keep]);
            flow = (self.on_tokens)(&tokens[..keep], logprobs);
        }
        // A request that ended anyway keeps its own reason.
        let cancelled = flow.is_break().then_some(Finish::Cancelled);
        self.finish = self.finish.or(finish).or(cancelled);
    }

    pub fn done(&self) -> bool {
        self.finish.is_some()
    }

    /// The caller cancelled between commits; a request that ended anyway keeps its own reason.
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(Finish::Cancelled);
    }

    pub fn finish(mut self) -> Generation {
        let end = Instant::now();
        let m = &mut self.metrics;
        m.new_tokens = self.committed.len() - self.prompt_len;
        m.decode_tokens = m.new_tokens.saturating_sub(self.first_commit);
        m.total_time = (end - self.started).as_secs_f64();
        if let Some(first) = self.first_token {
            m.ttft = (first - self.started).as_secs_f64();
            m.decode_time = (end - first).as_secs_f64();
        }
        Generation {
            tokens: self.committed[self.prompt_len..].to_vec(),
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            finish: self.finish.unwrap_or(Finish::Length),
            metrics: self.metrics,
        }
    }
}

/// Plain decoding: one verify-model token per forward pass.
pub fn autoregressive<D: Decoder>(
    verifier: &mut Verifier<D>,
    prompt: &[u32],
    stop: &StopCriteria,
    sampling: &RequestSampling,
    on_tokens: &mut OnTokens<'_>,
) -> Result<Generation, SpecError> {
    check_fits(
        verifier.decoder.capacity(),
        prompt.len(),
        stop.max_new_tokens,
    )?;
    // The last generated token is never fed back, so `prompt + max_new - 1` positions suffice.
    let capacity = prompt.len() + stop.max_new_tokens;
    let kept = verifier.start(prompt, capacity, sampling)?;
    let mut c = Committer::new(prompt, stop, on_tokens);
    c.metrics.cached_prompt_tokens = kept;
    if !c.done() {
        c.prompt_logprobs = score_prompt(verifier, prompt, sampling)?;
    }
    while !c.done() {
        verify_alone(verifier, &mut c)?;
    }
    Ok(c.finish())
}

/// One autoregressive step: the verify model's next token after the committed ones.
fn verify_alone<D: Decoder>(
    verifier: &mut Verifier<D>,
    c: &mut Committer<'_>,
) -> Result<(), SpecError> {
    let t = Instant::now();
    let next = verifier.verify(&c.committed, &[])?;
    c.metrics.verify_times.push(t.elapsed().as_secs_f64());
    c.metrics.verify_steps += 1;
    c.push(&next, &verifier.sampler.take_logprobs());
    verifier.commit(c.committed.len());
    Ok(())
}

/// The prompt's log-probabilities, if the request asks for them: the verify model prefills the
/// prompt (but its last token, as a prefill does) scoring each token it predicts.
fn score_prompt<D: Decoder>(
    verifier: &mut Verifier<D>,
    prompt: &[u32],
    sampling: &RequestSampling,
) -> Result<Vec<Logprobs>, SpecError> {
    match (sampling.prompt_logprobs, sampling.logprobs) {
        (true, Some(k)) => Ok(verifier.prefill_scored(prompt, k, usize::MAX)?.1),
        _ => Ok(Vec::new()),
    }
}

/// Synchronous speculative decoding: the draft proposes `lookahead` tokens, the verify model checks
/// them in one forward pass, the policy commits the matching prefix plus one; repeat.
pub fn speculative<D: Decoder, P: Decoder>(
    verifier: &mut Verifier<D>,
    drafter: &mut Drafter<P>,
    prompt: &[u32],
    stop: &StopCriteria,
    sampling: &RequestSampling,
    lookahead: usize,
    on_tokens: &mut OnTokens<'_>,
) -> Result<Generation, SpecError> {
    let lookahead = lookahead.max(1);
    drafter.set_request(sampling, prompt.len())?;
    // Drafts are clipped to the token budget, so sd fits wherever ar does: the same requests succeed
    // under every strategy.
    check_fits(
        verifier.decoder.capacity(),
        prompt.len(),
        stop.max_new_tokens,
    )?;
    let capacity = prompt.len() + stop.max_new_tokens;
    let kept = verifier.start(prompt, capacity, sampling)?;
    drafter.start(prompt, capacity, sampling.cache_prompt)?;
    let mut c = Committer::new(prompt, stop, on_tokens);
    c.metrics.cached_prompt_tokens = kept;
    if !c.done() {
        c.prompt_logprobs = score_prompt(verifier, prompt, sampling)?;
        // The verify model's prefill commits the first token alone, as in `ar` and `amusd` (and
        // llama.cpp's and vLLM's speculative decoding): a streamed answer starts one prefill
        // after the request, not after the draft's prefill and a round of drafts as well.
        verify_alone(verifier, &mut c)?;
        c.metrics.accepted_per_step.push(0);
    }
    while !c.done() {
        let rollback = drafter.sync(&c.committed);
        c.metrics.rollbacks += rollback.is_some() as usize;
        // Never draft past the budget: those tokens could not be committed anyway.
        let v = c.committed.len();
        let max_len = v + (stop.max_new_tokens - c.generated()).saturating_sub(1);
        loop {
            let t = Instant::now();
            let (n, source) = drafter.extend(v, lookahead, max_len, &stop.stop_ids)?;
            if n == 0 {
                break;
            }
            if source == Source::Model {
                c.metrics.draft_times.push(t.elapsed().as_secs_f64());
            }
            // Nothing after a proposed stop token can be committed.
            if drafter
                .seq()
                .last()
                .is_some_and(|t| stop.stop_ids.contains(t))
            {
                break;
            }
        }
        let draft = drafter.seq()[v..].to_vec();
        let t = Instant::now();
        let verified = verifier.verify(&c.committed, &draft)?;
        c.metrics.verify_times.push(t.elapsed().as_secs_f64());
        let (tokens, n_accepted) = accept(&draft, &verified);
        let from_lookup = |n: usize| {
            (v..v + n)
                .filter(|&p| drafter.source(p) == Source::Lookup)
                .count()
        };
        c.metrics.proposed_lookup += from_lookup(draft.len());
        c.metrics.accepted_lookup += from_lookup(n_accepted);
        c.metrics.verify_steps += 1;
        c.metrics.proposed += draft.len();
        c.metrics.accepted += n_accepted;
        c.metrics.accepted_per_step.push(n_accepted);
        // The committed tokens are the verify model's first ones: their records come first.
        c.push(&tokens, &verifier.sampler.take_logprobs());
        verifier.commit(c.committed.len());
    }
    Ok(c.finish())
}

/// Refuses requests that cannot fit in the model's context, before any work is done. Every strategy
/// reserves exactly `prompt + max_new` positions, so one check serves them all.
pub fn check_fits(capacity: usize, prompt: usize, max_new: usize) -> Result<(), SpecError> {
    if prompt == 0 {
        return Err(SpecError::Protocol(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    crate::decoder::check_reservation(prompt.saturating_add(max_new), capacity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDecoder, FakeModel};

    #[test]
    fn a_callback_that_breaks_cancels_ar_and_sd_after_that_batch() {
        let model = FakeModel::default();
        let stop = StopCriteria {
            stop_ids: Vec::new(),
            max_new_tokens: 50,
        };
        let sampling = RequestSampling::default();
        let mut v = Verifier::new(FakeDecoder::new(model.clone()));
        let mut calls = 0;
        let mut once = |_: &[u32], _: &[crate::logprobs::Logprobs]| {
            calls += 1;
            ControlFlow::Break(())
        };
        let ar = autoregressive(&mut v, &[1, 2, 3], &stop, &sampling, &mut once).unwrap();
        assert_eq!(
            (ar.finish, ar.tokens.len(), calls),
            (Finish::Cancelled, 1, 1)
        );
        let mut d = Drafter::new(FakeDecoder::new(model));
        let mut streamed = Vec::new();
        let sd = speculative(
            &mut v,
            &mut d,
            &[1, 2, 3],
            &stop,
            &sampling,
            4,
            &mut |t, _| {
                streamed.extend_from_slice(t);
                ControlFlow::Break(())
            },
        )
        .unwrap();
        assert_eq!(sd.finish, Finish::Cancelled);
        assert_eq!(sd.tokens, streamed);
        assert!(sd.tokens.len() < 50);
    }

    #[test]
    fn decode_time_counts_only_the_tokens_after_the_first_commit() {
        let model = FakeModel::default();
        let stop = StopCriteria {
            stop_ids: Vec::new(),
            max_new_tokens: 20,
        };
        let sampling = RequestSampling::default();
        let mut v = Verifier::new(FakeDecoder::new(model.clone()));
        let mut d = Drafter::new(FakeDecoder::new(model));
        let mut batches = Vec::new();
        let sd = speculative(
            &mut v,
            &mut d,
            &[1, 2, 3],
            &stop,
            &sampling,
            4,
            &mut |t, _| {
                batches.push(t.len());
                ControlFlow::Continue(())
            },
        )
        .unwrap();
        // The prefill commits the verify model's first token alone; then a perfect draft's rounds
        // commit the lookahead plus the verify model's token.
        assert_eq!(batches[..2], [1, 5]);
        assert_eq!(sd.metrics.decode_tokens, 19);
        assert_eq!(sd.metrics.accepted_per_step[..2], [0, 4]);
        assert_eq!(sd.metrics.accepted_per_step.len(), sd.metrics.verify_steps);
        let ar = autoregressive(&mut v, &[1, 2, 3], &stop, &sampling, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ar.metrics.decode_tokens, 19);
        assert!(ar.metrics.e2e_tokens_per_s() > 0.0);
    }
}
