//! The request section: the coordinator submits and ends a request under a seqlock; the workers
//! read it.

use std::sync::atomic::Ordering;

use super::{load_range, seq_close, seq_open, seq_read, store_range};
use crate::error::ShmError;
use crate::futex::futex_wake;
use crate::layout::*;

/// What the coordinator submits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpec<'a> {
    /// Nonzero, different from the previous request's.
    pub request_id: u64,
    /// The prompt's tokens.
    pub prompt: &'a [u32],
    /// Tokens to generate at most.
    pub max_new_tokens: u32,
    /// At most [`MAX_STOP_TOKENS`] token ids that end generation.
    pub stop_tokens: &'a [u32],
    /// How the workers choose tokens.
    pub sampling: SamplingFields,
}

/// A request's sampling parameters as the region carries them: the f32s as their IEEE bits, so
/// they travel exactly. `amusd-spec` gives them their meaning and validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SamplingFields {
    /// The noise's seed.
    pub seed: u64,
    /// Temperature (f32 bits); 0.0 is greedy.
    pub temperature_bits: u32,
    /// The dynamic temperature's range (f32 bits); 0.0 = off.
    pub dynatemp_range_bits: u32,
    /// The dynamic temperature's exponent (f32 bits).
    pub dynatemp_exponent_bits: u32,
    /// top-k; 0 = off.
    pub top_k: u32,
    /// top-p (f32 bits); 1.0 = off.
    pub top_p_bits: u32,
    /// min-p (f32 bits); 0.0 = off.
    pub min_p_bits: u32,
    /// top-n-sigma (f32 bits); 0.0 or less = off.
    pub top_n_sigma_bits: u32,
    /// typical-p (f32 bits); 1.0 = off.
    pub typical_p_bits: u32,
    /// XTC's probability (f32 bits); 0.0 = off.
    pub xtc_probability_bits: u32,
    /// XTC's threshold (f32 bits).
    pub xtc_threshold_bits: u32,
    /// DRY's multiplier (f32 bits); 0.0 = off.
    pub dry_multiplier_bits: u32,
    /// DRY's base (f32 bits).
    pub dry_base_bits: u32,
    /// DRY's allowed run length.
    pub dry_allowed_length: u32,
    /// DRY's window in tokens; 0 = off, `u32::MAX` = the whole sequence.
    pub dry_last_n: u32,
    /// DRY's sequence breakers as a bit set of token ids, at most [`MAX_BREAKER_WORDS`] words.
    pub dry_breakers: Vec<u64>,
    /// Repeat penalty (f32 bits); 1.0 = off.
    pub repeat_penalty_bits: u32,
    /// Frequency penalty (f32 bits); 0.0 = off.
    pub frequency_penalty_bits: u32,
    /// Presence penalty (f32 bits); 0.0 = off.
    pub presence_penalty_bits: u32,
    /// The penalties' window in tokens; 0 = off, `u32::MAX` = the whole sequence.
    pub penalty_last_n: u32,
    /// The draft proposes greedy tokens rather than samples.
    pub greedy_draft: bool,
    /// The draft model drafts alone, without its prompt lookup.
    pub no_draft_lookup: bool,
    /// The workers keep the cached prefix the prompt shares with the previous request.
    pub cache_prompt: bool,
    /// The logit bias: token ids and the f32 bits of their biases, at most
    /// [`MAX_LOGIT_BIAS`].
    pub logit_bias: Vec<(u32, u32)>,
    /// 0: no log-probabilities; `1 + k`: the committed tokens' and their `k` most likely
    /// alternatives' ([`LogprobBuffer`]), `k` at most [`MAX_TOP_LOGPROBS`].
    pub logprobs: u32,
    /// With `logprobs`: the prompt's tokens' too ([`RequestSection::prompt_logprobs`]).
    pub prompt_logprobs: bool,
    /// 0: no grammar; else its kind's code ([`GrammarSection::kind`]).
    pub grammar_kind: u32,
    /// The grammar's text, at most [`GRAMMAR_TEXT_LEN`] bytes.
    pub grammar: String,
}

impl SamplingFields {
    /// Greedy decoding, every filter off.
    pub const GREEDY: Self = Self {
        seed: 0,
        temperature_bits: 0,
        dynatemp_range_bits: 0,
        dynatemp_exponent_bits: 0x3f80_0000, // 1.0f32
        top_k: 0,
        top_p_bits: 0x3f80_0000, // 1.0f32
        min_p_bits: 0,
        top_n_sigma_bits: 0,
        typical_p_bits: 0x3f80_0000, // 1.0f32
        xtc_probability_bits: 0,
        xtc_threshold_bits: 0x3dcc_cccd, // 0.1f32
        dry_multiplier_bits: 0,
        dry_base_bits: 0x3fe0_0000, // 1.75f32
        dry_allowed_length: 2,
        dry_last_n: u32::MAX,
        dry_breakers: Vec::new(),
        repeat_penalty_bits: 0x3f80_0000, // 1.0f32
        frequency_penalty_bits: 0,
        presence_penalty_bits: 0,
        penalty_last_n: 64,
        greedy_draft: false,
        no_draft_lookup: false,
        cache_prompt: false,
        logit_bias: Vec::new(),
        logprobs: 0,
        prompt_logprobs: false,
        grammar_kind: 0,
        grammar: String::new(),
    };
}

impl Default for SamplingFields {
    fn default() -> Self {
        Self::GREEDY
    }
}

/// A consistent copy of the request section (see [`Region::read_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSnapshot {
    /// The `request_word` value the snapshot is consistent with (even).
    pub word: u32,
    /// Request id (0 before the first request).
    pub request_id: u64,
    /// State.
    pub state: RequestState,
    /// Prompt length (clamped to [`TOKEN_CAPACITY`]).
    pub prompt_len: usize,
    /// Maximum new tokens.
    pub max_new_tokens: u32,
    /// Stop tokens.
    pub stop_tokens: Vec<u32>,
    /// Finish reason.
    pub finish_reason: FinishReason,
    /// Error text (empty unless failed).
    pub error_text: String,
    /// Sampling parameters.
    pub sampling: SamplingFields,
    /// Whether the coordinator asked the workers to exit.
    pub shutdown: bool,
}

impl Region {
    /// The request sequence word (Acquire); futex-wait on [`Control::request_word`] for changes.
    pub fn request_word(&self) -> u32 {
        self.control.request_word.load(Ordering::Acquire)
    }

    /// The request state (Acquire); `None` for a value this build never writes.
    pub fn request_state(&self) -> Option<RequestState> {
        RequestState::from_u32(self.request.state.load(Ordering::Acquire))
    }

    /// The current request id (Acquire).
    pub fn request_id(&self) -> u64 {
        self.request.request_id.load(Ordering::Acquire)
    }

    /// Coordinator: publish a new request. Writes, inside the `request_word` seqlock, the request
    /// fields, the prompt into the verified buffer and `verified_len = prompt.len()` (Release),
    /// then `state = Running` (Release); closes the seqlock, wakes `request_word` and
    /// `verified_len`, rings both workers' bells.
    ///
    /// Precondition (the coordinator's to ensure): no request is running, and the verify worker
    /// has let go of the previous one (its [`WorkerStatus::request_id`] is no longer that
    /// request), because the verify worker writes the verified buffer while a request runs.
    pub fn submit_request(&self, spec: &RequestSpec<'_>) -> Result<(), ShmError> {
        if spec.request_id == 0 {
            return Err(ShmError::InvalidRequestId);
        }
        let needed = spec.prompt.len() + spec.max_new_tokens as usize;
        if needed > TOKEN_CAPACITY {
            return Err(ShmError::CapacityExceeded {
                what: "prompt + max_new_tokens",
                needed,
                capacity: TOKEN_CAPACITY,
            });
        }
        if spec.stop_tokens.len() > MAX_STOP_TOKENS {
            return Err(ShmError::TooManyStopTokens {
                given: spec.stop_tokens.len(),
                max: MAX_STOP_TOKENS,
            });
        }
        if spec.sampling.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(ShmError::TooManyLogitBias {
                given: spec.sampling.logit_bias.len(),
                max: MAX_LOGIT_BIAS,
            });
        }
        if spec.sampling.dry_breakers.len() > MAX_BREAKER_WORDS {
            return Err(ShmError::TooManyBreakerWords {
                given: spec.sampling.dry_breakers.len(),
                max: MAX_BREAKER_WORDS,
            });
        }
        if spec.sampling.grammar.len() > GRAMMAR_TEXT_LEN {
            return Err(ShmError::GrammarTooLong {
                given: spec.sampling.grammar.len(),
                max: GRAMMAR_TEXT_LEN,
            });
        }
        if self.request.state.load(Ordering::Acquire) == RequestState::Running.as_u32() {
            return Err(ShmError::RequestRunning {
                request_id: self.request.request_id.load(Ordering::Relaxed),
            });
        }
        let rq = &self.request;
        let r = Ordering::Relaxed;
        let odd = seq_open(&self.control.request_word);
        rq.request_id.store(spec.request_id, r);
        rq.prompt_len.store(spec.prompt.len() as u32, r);
        rq.max_new_tokens.store(spec.max_new_tokens, r);
        rq.n_stop_tokens.store(spec.stop_tokens.len() as u32, r);
        for (i, slot) in rq.stop_tokens.iter().enumerate() {
            slot.store(spec.stop_tokens.get(i).copied().unwrap_or(0), r);
        }
        rq.finish_reason.store(FinishReason::None.as_u32(), r);
        rq.error_text.clear();
        self.store_sampling(&spec.sampling);
        store_range(&self.verified.tokens, 0, spec.prompt);
        self.verified
            .verified_len
            .store(spec.prompt.len() as u32, Ordering::Release);
        rq.state
            .store(RequestState::Running.as_u32(), Ordering::Release);
        seq_close(&self.control.request_word, odd);
        futex_wake(&self.control.request_word);
        futex_wake(&self.verified.verified_len);
        self.ring(Party::Draft);
        self.ring(Party::Verify);
        Ok(())
    }

    /// Writes a request's sampling fields; called inside the request seqlock.
    fn store_sampling(&self, sm: &SamplingFields) {
        let (rq, r) = (&self.request, Ordering::Relaxed);
        rq.sampling_seed.store(sm.seed, r);
        rq.temperature_bits.store(sm.temperature_bits, r);
        rq.dynatemp_range_bits.store(sm.dynatemp_range_bits, r);
        rq.dynatemp_exponent_bits
            .store(sm.dynatemp_exponent_bits, r);
        rq.top_k.store(sm.top_k, r);
        rq.top_p_bits.store(sm.top_p_bits, r);
        rq.min_p_bits.store(sm.min_p_bits, r);
        rq.top_n_sigma_bits.store(sm.top_n_sigma_bits, r);
        rq.typical_p_bits.store(sm.typical_p_bits, r);
        rq.xtc_probability_bits.store(sm.xtc_probability_bits, r);
        rq.xtc_threshold_bits.store(sm.xtc_threshold_bits, r);
        rq.dry_multiplier_bits.store(sm.dry_multiplier_bits, r);
        rq.dry_base_bits.store(sm.dry_base_bits, r);
        rq.dry_allowed_length.store(sm.dry_allowed_length, r);
        rq.dry_last_n.store(sm.dry_last_n, r);
        self.dry.n_words.store(sm.dry_breakers.len() as u32, r);
        for (slot, &w) in self.dry.breakers.iter().zip(&sm.dry_breakers) {
            slot.store(w, r);
        }
        rq.repeat_penalty_bits.store(sm.repeat_penalty_bits, r);
        rq.frequency_penalty_bits
            .store(sm.frequency_penalty_bits, r);
        rq.presence_penalty_bits.store(sm.presence_penalty_bits, r);
        rq.penalty_last_n.store(sm.penalty_last_n, r);
        rq.greedy_draft.store(u32::from(sm.greedy_draft), r);
        rq.no_draft_lookup.store(u32::from(sm.no_draft_lookup), r);
        rq.cache_prompt.store(u32::from(sm.cache_prompt), r);
        rq.logprobs
            .store(sm.logprobs.min(1 + MAX_TOP_LOGPROBS as u32), r);
        rq.n_logit_bias.store(sm.logit_bias.len() as u32, r);
        for (slot, &(token, bias)) in rq.logit_bias.iter().zip(&sm.logit_bias) {
            slot.store(u64::from(token) | u64::from(bias) << 32, r);
        }
        rq.prompt_logprobs.store(u32::from(sm.prompt_logprobs), r);
        self.grammar.kind.store(sm.grammar_kind, r);
        self.grammar.text.set(&sm.grammar);
    }

    /// Coordinator: end the running request `request_id` with `reason` (`Stop`/`Length` make it
    /// Done; `Error`/`Cancelled`/`None` make it Failed) and `error_text`. Same publication as
    /// [`submit_request`](Self::submit_request).
    pub fn finish_request(
        &self,
        request_id: u64,
        reason: FinishReason,
        error_text: &str,
    ) -> Result<(), ShmError> {
        let rq = &self.request;
        let current = rq.request_id.load(Ordering::Relaxed);
        let state = rq.state.load(Ordering::Relaxed);
        if current != request_id || state != RequestState::Running.as_u32() {
            return Err(ShmError::NotCurrentRequest {
                given: request_id,
                current,
                state,
            });
        }
        let new_state = match reason {
            FinishReason::Stop | FinishReason::Length => RequestState::Done,
            FinishReason::Error | FinishReason::Cancelled | FinishReason::None => {
                RequestState::Failed
            }
        };
        let odd = seq_open(&self.control.request_word);
        rq.finish_reason.store(reason.as_u32(), Ordering::Relaxed);
        rq.error_text.set(error_text);
        rq.state.store(new_state.as_u32(), Ordering::Release);
        seq_close(&self.control.request_word, odd);
        futex_wake(&self.control.request_word);
        self.ring(Party::Draft);
        self.ring(Party::Verify);
        Ok(())
    }

    /// Workers: a consistent copy of the request section (seqlock read on `request_word`).
    /// Fails with [`ShmError::Unstable`] if the coordinator stays mid-update for
    /// [`SEQLOCK_READ_BUDGET`](super::SEQLOCK_READ_BUDGET), or [`ShmError::Corrupt`] for out-of-domain enum values.
    pub fn read_request(&self) -> Result<RequestSnapshot, ShmError> {
        let rq = &self.request;
        let r = Ordering::Relaxed;
        let (word, id, state, prompt_len, max_new, stops, reason, err, sampling, shutdown) =
            seq_read(&self.control.request_word, "request section", |word| {
                let n_stop = (rq.n_stop_tokens.load(r) as usize).min(MAX_STOP_TOKENS);
                let n_bias = (rq.n_logit_bias.load(r) as usize).min(MAX_LOGIT_BIAS);
                (
                    word,
                    rq.request_id.load(r),
                    rq.state.load(Ordering::Acquire),
                    (rq.prompt_len.load(r) as usize).min(TOKEN_CAPACITY),
                    rq.max_new_tokens.load(r),
                    load_range(&rq.stop_tokens, 0, n_stop),
                    rq.finish_reason.load(r),
                    rq.error_text.get(),
                    SamplingFields {
                        seed: rq.sampling_seed.load(r),
                        temperature_bits: rq.temperature_bits.load(r),
                        dynatemp_range_bits: rq.dynatemp_range_bits.load(r),
                        dynatemp_exponent_bits: rq.dynatemp_exponent_bits.load(r),
                        top_k: rq.top_k.load(r),
                        top_p_bits: rq.top_p_bits.load(r),
                        min_p_bits: rq.min_p_bits.load(r),
                        top_n_sigma_bits: rq.top_n_sigma_bits.load(r),
                        typical_p_bits: rq.typical_p_bits.load(r),
                        xtc_probability_bits: rq.xtc_probability_bits.load(r),
                        xtc_threshold_bits: rq.xtc_threshold_bits.load(r),
                        dry_multiplier_bits: rq.dry_multiplier_bits.load(r),
                        dry_base_bits: rq.dry_base_bits.load(r),
                        dry_allowed_length: rq.dry_allowed_length.load(r),
                        dry_last_n: rq.dry_last_n.load(r),
                        dry_breakers: {
                            let n = (self.dry.n_words.load(r) as usize).min(MAX_BREAKER_WORDS);
                            self.dry.breakers[..n].iter().map(|w| w.load(r)).collect()
                        },
                        repeat_penalty_bits: rq.repeat_penalty_bits.load(r),
                        frequency_penalty_bits: rq.frequency_penalty_bits.load(r),
                        presence_penalty_bits: rq.presence_penalty_bits.load(r),
                        penalty_last_n: rq.penalty_last_n.load(r),
                        greedy_draft: rq.greedy_draft.load(r) != 0,
                        no_draft_lookup: rq.no_draft_lookup.load(r) != 0,
                        cache_prompt: rq.cache_prompt.load(r) != 0,
                        logit_bias: rq.logit_bias[..n_bias]
                            .iter()
                            .map(|e| {
                                let e = e.load(r);
                                (e as u32, (e >> 32) as u32)
                            })
                            .collect(),
                        logprobs: rq.logprobs.load(r).min(1 + MAX_TOP_LOGPROBS as u32),
                        prompt_logprobs: rq.prompt_logprobs.load(r) != 0,
                        grammar_kind: self.grammar.kind.load(r),
                        grammar: self.grammar.text.get(),
                    },
                    self.control.shutdown.load(Ordering::Acquire) != 0,
                )
            })?;
        Ok(RequestSnapshot {
            word,
            request_id: id,
            state: RequestState::from_u32(state).ok_or(ShmError::Corrupt {
                field: "request.state",
                value: state as u64,
            })?,
            prompt_len,
            max_new_tokens: max_new,
            stop_tokens: stops,
            finish_reason: FinishReason::from_u32(reason).ok_or(ShmError::Corrupt {
                field: "request.finish_reason",
                value: reason as u64,
            })?,
            error_text: err,
            sampling,
            shutdown,
        })
    }
}
