//! Protocol primitives on [`Region`]: request submission and reading, verified-token publication,
//! draft appends/rewrites and seqlock reads, bells, worker status, and the metric rings.
//!
//! These methods implement *how* each party publishes and reads, with the orderings documented on
//! the fields; *what* to publish and when (acceptance, rollback policy, restarts) belongs to the
//! worker and coordinator crates.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::ShmError;
use crate::futex::{futex_wake, wait_for_change, wait_for_change_with, Spin};
use crate::layout::*;

/// How long a seqlock reader retries before giving up with [`ShmError::Unstable`]. A rewrite
/// copies at most a few KiB, so a healthy writer is out of its odd window in microseconds; a
/// reader that sees it odd for this long is looking at a writer that was descheduled for a long
/// time or killed mid-rewrite.
pub const SEQLOCK_READ_BUDGET: Duration = Duration::from_millis(20);

/// How many of a ring's most recent events can be read: one less than [`EVENT_CAPACITY`], because
/// the slot of the oldest one is the slot the writer fills next (and may be filling right now).
pub const READABLE_EVENTS: usize = EVENT_CAPACITY - 1;

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

/// A consistent slice of the verified buffer tied to a request (see [`Region::verified_snapshot`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSnapshot {
    /// The request the tokens belong to.
    pub request_id: u64,
    /// `verified_len` at the time of the read (clamped).
    pub len: usize,
    /// The first position copied (`min(from, len)`).
    pub from: usize,
    /// `tokens[from..min(len, to)]`.
    pub tokens: Vec<u32>,
}

/// A consistent slice of the draft buffer (see [`Region::read_draft`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DraftSnapshot {
    /// The request the draft belongs to.
    pub request_id: u64,
    /// The (even) epoch it was read at: equal epochs mean no rewrite happened in between.
    pub epoch: u32,
    /// `draft_len` (clamped to [`TOKEN_CAPACITY`]).
    pub len: usize,
    /// The first position copied (`min(from, len)`).
    pub from: usize,
    /// Draft tokens at positions `from..min(len, from + max)`.
    pub tokens: Vec<u32>,
    /// Where each of `tokens` came from (a value this build never writes reads as the model).
    pub sources: Vec<TokenSource>,
}

/// A copy of a worker's status block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Which worker.
    pub role: Role,
    /// Its pid (0 if never registered).
    pub pid: u32,
    /// Its state; `None` if the field holds a value this build never writes.
    pub state: Option<WorkerState>,
    /// Last heartbeat (CLOCK_MONOTONIC ms).
    pub heartbeat_ms: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Exit status of its last incarnation.
    pub exit_status: ExitStatus,
    /// The request it holds (0 = none).
    pub request_id: u64,
    /// Counters.
    pub steps: u64,
    /// Tokens drafted or committed.
    pub tokens: u64,
    /// Rollbacks.
    pub rollbacks: u64,
    /// Tokens proposed to verification.
    pub proposed: u64,
    /// Tokens accepted.
    pub accepted: u64,
    /// Device.
    pub device: String,
    /// Model.
    pub model: String,
    /// Last error.
    pub last_error: String,
}

/// A copy of one metric event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventRecord {
    /// The event's index in its ring's history (assigned by `push`).
    pub seq: u64,
    /// Start, CLOCK_MONOTONIC µs.
    pub t_start_us: u64,
    /// End, CLOCK_MONOTONIC µs.
    pub t_end_us: u64,
    /// Request.
    pub request_id: u64,
    /// Kind.
    pub kind: EventKind,
    /// Position.
    pub position: u32,
    /// Count.
    pub count: u32,
    /// Accepted.
    pub accepted: u32,
}

/// Events read by [`EventRing::events_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventBatch {
    /// The events, oldest first.
    pub events: Vec<EventRecord>,
    /// The cursor to pass next time.
    pub next: u64,
    /// Events in the requested range that were overwritten before they could be read.
    pub lost: u64,
}

/// Seqlock open: make the word odd. If it already is odd (a writer was killed mid-update), skip to
/// the next odd value so readers that captured nothing stable keep retrying and the closing store
/// leaves it even: a completed update repairs the word.
fn seq_open(word: &AtomicU32) -> u32 {
    let e = word.load(Ordering::Relaxed);
    let odd = if e & 1 == 0 {
        e.wrapping_add(1)
    } else {
        e.wrapping_add(2)
    };
    word.store(odd, Ordering::Relaxed);
    // Orders the odd store before the data stores that follow, for any reader that sees one of
    // them (its fence(Acquire) pairs with this).
    fence(Ordering::Release);
    odd
}

/// Seqlock close: the even store that publishes the data stores before it.
fn seq_close(word: &AtomicU32, odd: u32) -> u32 {
    let even = odd.wrapping_add(1);
    word.store(even, Ordering::Release);
    even
}

/// Run a seqlock read of `body` against `word` until it is consistent or the budget is spent.
fn seq_read<T>(
    word: &AtomicU32,
    what: &'static str,
    mut body: impl FnMut(u32) -> T,
) -> Result<T, ShmError> {
    let start = Instant::now();
    let mut tries = 0u32;
    loop {
        let s1 = word.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            let value = body(s1);
            fence(Ordering::Acquire);
            let s2 = word.load(Ordering::Relaxed);
            if s1 == s2 {
                return Ok(value);
            }
        }
        tries += 1;
        if tries < 64 {
            std::hint::spin_loop();
        } else {
            let waited = start.elapsed();
            if waited >= SEQLOCK_READ_BUDGET {
                return Err(ShmError::Unstable {
                    what,
                    word: word.load(Ordering::Relaxed),
                    waited_us: waited.as_micros() as u64,
                });
            }
            std::thread::yield_now();
        }
    }
}

fn load_range(slots: &[AtomicU32], from: usize, to: usize) -> Vec<u32> {
    let to = to.min(slots.len());
    let from = from.min(to);
    slots[from..to]
        .iter()
        .map(|t| t.load(Ordering::Relaxed))
        .collect()
}

/// Stores the sources of `n` slots from `from`; slots past `sources` get [`TokenSource::Model`].
fn store_sources(slots: &[AtomicU32], from: usize, n: usize, sources: &[TokenSource]) {
    for (i, slot) in slots[from..from + n].iter().enumerate() {
        let s = sources.get(i).copied().unwrap_or(TokenSource::Model);
        slot.store(s.as_u32(), Ordering::Relaxed);
    }
}

fn store_range(slots: &[AtomicU32], from: usize, tokens: &[u32]) {
    for (slot, t) in slots[from..from + tokens.len()].iter().zip(tokens) {
        slot.store(*t, Ordering::Relaxed);
    }
}

impl Region {
    /// A zeroed region on the heap, with its header initialised as `Shm::create` does: for tests
    /// and for running all three parties as threads of one process.
    pub fn new_boxed() -> Box<Region> {
        // SAFETY: all-zero bytes are a valid value of every atomic, hence of Region (which is
        // only atomics and arrays of them).
        let r = unsafe { Box::<Region>::new_zeroed().assume_init() };
        r.init_header(
            nix::unistd::geteuid().as_raw(),
            std::process::id(),
            crate::futex::unix_ms(),
            crate::shm::process_start_ticks(std::process::id()).unwrap_or(0),
        );
        r
    }

    /// Write the header of a zeroed region, `magic` last with Release.
    pub(crate) fn init_header(&self, uid: u32, pid: u32, created_unix_ms: u64, start_ticks: u64) {
        let h = &self.header;
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.token_capacity
            .store(TOKEN_CAPACITY as u32, Ordering::Relaxed);
        h.region_size.store(REGION_SIZE as u64, Ordering::Relaxed);
        h.owner_uid.store(uid, Ordering::Relaxed);
        h.coordinator_pid.store(pid, Ordering::Relaxed);
        h.created_unix_ms.store(created_unix_ms, Ordering::Relaxed);
        h.coordinator_start_ticks
            .store(start_ticks, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// The header's fields as the bytes `validate_header` reads (magic loaded first, Acquire).
    pub fn header_bytes(&self) -> [u8; HEADER_LEN] {
        use std::mem::offset_of;
        let h = &self.header;
        let mut b = [0u8; HEADER_LEN];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(Header, magic),
            &h.magic.load(Ordering::Acquire).to_ne_bytes(),
        );
        let r = Ordering::Relaxed;
        put(
            offset_of!(Header, version),
            &h.version.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, token_capacity),
            &h.token_capacity.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, region_size),
            &h.region_size.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, owner_uid),
            &h.owner_uid.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, coordinator_pid),
            &h.coordinator_pid.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, created_unix_ms),
            &h.created_unix_ms.load(r).to_ne_bytes(),
        );
        put(
            offset_of!(Header, coordinator_start_ticks),
            &h.coordinator_start_ticks.load(r).to_ne_bytes(),
        );
        b
    }

    /// The coordinator's pid, from the header.
    pub fn coordinator_pid(&self) -> u32 {
        self.header.coordinator_pid.load(Ordering::Relaxed)
    }

    /// Whether the coordinator named by the header is alive: its pid is a valid pid, exists, and
    /// (when the header records it) has the recorded start time, so a reused pid does not count.
    pub fn coordinator_alive(&self) -> bool {
        let ticks = self.header.coordinator_start_ticks.load(Ordering::Relaxed);
        crate::shm::process_alive(self.coordinator_pid(), ticks) == Some(true)
    }

    // -----------------------------------------------------------------------------------------
    // Bells and shutdown
    // -----------------------------------------------------------------------------------------

    /// `party`'s bell word.
    pub fn bell(&self, party: Party) -> &AtomicU32 {
        &self.control.bells[party.index()]
    }

    /// Load `party`'s bell (Acquire). Do this *before* checking what you wait for, then pass the
    /// value to [`wait_bell`](Self::wait_bell).
    pub fn bell_value(&self, party: Party) -> u32 {
        self.bell(party).load(Ordering::Acquire)
    }

    /// Ring `party`'s bell: increment it (Release) and wake its sleeper. Call *after* publishing.
    pub fn ring(&self, party: Party) {
        let b = self.bell(party);
        b.fetch_add(1, Ordering::Release);
        futex_wake(b);
    }

    /// Sleep (spinning briefly first) until `party`'s bell differs from `seen` or `timeout`
    /// passes. Returns the new bell value, `None` on timeout. The pattern for a party with several
    /// things to wait for:
    ///
    /// ```
    /// # use amusd_shm::{Region, Party};
    /// # use std::time::Duration;
    /// # let region = Region::new_boxed();
    /// # let mut rounds = 0;
    /// loop {
    ///     let seen = region.bell_value(Party::Draft);
    ///     if region.shutdown_requested() { break; }
    ///     // ... check the request, verified_len, ...; if there is work, do it and `continue` ...
    ///     # rounds += 1; if rounds == 2 { break; }
    ///     region.wait_bell(Party::Draft, seen, Some(Duration::from_millis(1)));
    /// }
    /// ```
    pub fn wait_bell(&self, party: Party, seen: u32, timeout: Option<Duration>) -> Option<u32> {
        wait_for_change(self.bell(party), seen, timeout)
    }

    /// [`wait_bell`](Self::wait_bell) with an explicit spin policy (e.g. [`Spin::NONE`] for an
    /// idle loop that polls with short timeouts and should not burn CPU spinning each time).
    pub fn wait_bell_with(
        &self,
        party: Party,
        seen: u32,
        timeout: Option<Duration>,
        spin: Spin,
    ) -> Option<u32> {
        wait_for_change_with(self.bell(party), seen, timeout, spin)
    }

    /// Coordinator: ask the workers to exit (sets `shutdown`, bumps and wakes `request_word`,
    /// rings both workers' bells).
    pub fn request_shutdown(&self) {
        self.control.shutdown.store(1, Ordering::Release);
        // +2 keeps the parity, so this is safe even against a concurrent seqlock writer.
        self.control.request_word.fetch_add(2, Ordering::Release);
        futex_wake(&self.control.request_word);
        self.ring(Party::Draft);
        self.ring(Party::Verify);
    }

    /// Whether the coordinator asked the workers to exit.
    pub fn shutdown_requested(&self) -> bool {
        self.control.shutdown.load(Ordering::Acquire) != 0
    }

    // -----------------------------------------------------------------------------------------
    // Request section (coordinator writes, workers read)
    // -----------------------------------------------------------------------------------------

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
    /// [`SEQLOCK_READ_BUDGET`], or [`ShmError::Corrupt`] for out-of-domain enum values.
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

    // -----------------------------------------------------------------------------------------
    // Verified buffer (verify worker appends; draft worker and coordinator read)
    // -----------------------------------------------------------------------------------------

    /// `verified_len` (Acquire), clamped to [`TOKEN_CAPACITY`].
    pub fn verified_len(&self) -> usize {
        (self.verified.verified_len.load(Ordering::Acquire) as usize).min(TOKEN_CAPACITY)
    }

    /// Verify worker: append committed `tokens` at position `from`, which must equal the current
    /// `verified_len` (append-only). Stores the tokens (Relaxed), then `verified_len` (Release),
    /// wakes `verified_len` and rings the draft worker's and coordinator's bells. Returns the new
    /// length. Only valid while the verify worker holds the running request.
    pub fn publish_verified(&self, from: usize, tokens: &[u32]) -> Result<usize, ShmError> {
        let cur = self.verified.verified_len.load(Ordering::Relaxed) as usize;
        if from != cur {
            return Err(ShmError::VerifiedOutOfOrder {
                expected: cur,
                got: from,
            });
        }
        let end = cur + tokens.len();
        if end > TOKEN_CAPACITY {
            return Err(ShmError::CapacityExceeded {
                what: "verified tokens",
                needed: end,
                capacity: TOKEN_CAPACITY,
            });
        }
        store_range(&self.verified.tokens, cur, tokens);
        self.verified
            .verified_len
            .store(end as u32, Ordering::Release);
        futex_wake(&self.verified.verified_len);
        self.ring(Party::Draft);
        self.ring(Party::Coordinator);
        Ok(end)
    }

    /// Verify worker: the log-probability rows of positions `from..` ([`LogprobBuffer`]), each the
    /// committed token's entry then its alternatives', at most `1 + MAX_TOP_LOGPROBS` (token id,
    /// f32 bits); call before [`publish_verified`](Self::publish_verified) covers them.
    pub fn store_logprobs(&self, from: usize, rows: &[Vec<(u32, u32)>]) -> Result<(), ShmError> {
        if from + rows.len() > TOKEN_CAPACITY {
            return Err(ShmError::CapacityExceeded {
                what: "log-probabilities",
                needed: from + rows.len(),
                capacity: TOKEN_CAPACITY,
            });
        }
        for (slots, row) in self.logprobs.rows[from..].iter().zip(rows) {
            for (slot, &(token, bits)) in slots.iter().zip(row) {
                slot.store(u64::from(token) | u64::from(bits) << 32, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Coordinator: the log-probability rows of positions `from..to`, `width` entries each (the
    /// token's and `width - 1` alternatives'); the positions must be below an Acquire-loaded
    /// `verified_len` ([`verified_len`](Self::verified_len), [`read_verified`](Self::read_verified)).
    pub fn read_logprobs(&self, from: usize, to: usize, width: usize) -> Vec<Vec<(u32, u32)>> {
        let (to, width) = (to.min(TOKEN_CAPACITY), width.min(1 + MAX_TOP_LOGPROBS));
        (self.logprobs.rows[from.min(to)..to].iter())
            .map(|slots| {
                (slots[..width].iter())
                    .map(|e| {
                        let e = e.load(Ordering::Relaxed);
                        (e as u32, (e >> 32) as u32)
                    })
                    .collect()
            })
            .collect()
    }

    /// Committed tokens at positions `from..min(to, verified_len)` (`verified_len` loaded with
    /// Acquire; everything clamped to [`TOKEN_CAPACITY`]). Within one request this is always
    /// consistent; use [`verified_snapshot`](Self::verified_snapshot) to also learn which request
    /// the tokens belong to.
    pub fn read_verified(&self, from: usize, to: usize) -> Vec<u32> {
        let len = self.verified_len();
        load_range(&self.verified.tokens, from, to.min(len))
    }

    /// Like [`read_verified`](Self::read_verified), but consistent with the request id: a seqlock
    /// read on `request_word`, so tokens from before and after a new submission are never mixed.
    pub fn verified_snapshot(&self, from: usize, to: usize) -> Result<VerifiedSnapshot, ShmError> {
        seq_read(&self.control.request_word, "verified buffer", |_| {
            let request_id = self.request.request_id.load(Ordering::Relaxed);
            let len = self.verified_len();
            let from = from.min(len);
            VerifiedSnapshot {
                request_id,
                len,
                from,
                tokens: load_range(&self.verified.tokens, from, to.min(len)),
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // Draft buffer (draft worker writes; verify worker reads)
    // -----------------------------------------------------------------------------------------

    /// `draft_len` (Acquire), clamped to [`TOKEN_CAPACITY`].
    pub fn draft_len(&self) -> usize {
        (self.draft.draft_len.load(Ordering::Acquire) as usize).min(TOKEN_CAPACITY)
    }

    /// `draft_epoch` (Acquire).
    pub fn draft_epoch(&self) -> u32 {
        self.draft.draft_epoch.load(Ordering::Acquire)
    }

    /// Draft worker: append `tokens` at the end of the draft. Stores the slots (Relaxed), then
    /// `draft_len` (Release), wakes `draft_len` and rings the verify worker's bell. Returns the new
    /// length. Fails if the buffer would overflow, or if the epoch is odd (a previous draft worker
    /// died mid-rewrite: begin with [`draft_rewrite`](Self::draft_rewrite)).
    pub fn draft_append(&self, tokens: &[u32]) -> Result<usize, ShmError> {
        self.draft_append_from(tokens, &[])
    }

    /// [`draft_append`](Self::draft_append) with each token's source (`sources[i]` for
    /// `tokens[i]`; tokens without one are [`TokenSource::Model`]), stored with the slots.
    pub fn draft_append_from(
        &self,
        tokens: &[u32],
        sources: &[TokenSource],
    ) -> Result<usize, ShmError> {
        let d = &self.draft;
        let epoch = d.draft_epoch.load(Ordering::Relaxed);
        if epoch & 1 == 1 {
            return Err(ShmError::DraftMidRewrite { epoch });
        }
        let cur = d.draft_len.load(Ordering::Relaxed) as usize;
        let end = cur.saturating_add(tokens.len());
        if end > TOKEN_CAPACITY {
            return Err(ShmError::CapacityExceeded {
                what: "draft tokens",
                needed: end,
                capacity: TOKEN_CAPACITY,
            });
        }
        store_range(&d.tokens, cur, tokens);
        store_sources(&d.sources, cur, tokens.len(), sources);
        d.draft_len.store(end as u32, Ordering::Release);
        futex_wake(&d.draft_len);
        self.ring(Party::Verify);
        Ok(end)
    }

    /// Draft worker: replace the draft from position `from` on with `tokens` (so the new length
    /// is `from + tokens.len()`), and set the draft's request id. This is the rollback (keep a
    /// prefix, draft anew after it) and the reset (`from = 0`, for a new request or after a
    /// restart). Runs as a seqlock write on `draft_epoch` (odd, `fence(Release)`, Relaxed stores,
    /// even with Release), then wakes `draft_len` and rings the verify worker's bell. `from` may
    /// be at most the current `draft_len`, except that `from = 0` is always allowed. Returns the
    /// new length.
    ///
    /// A rewrite always leaves the epoch even, so it also repairs an epoch left odd by a draft
    /// worker killed mid-rewrite.
    pub fn draft_rewrite(
        &self,
        request_id: u64,
        from: usize,
        tokens: &[u32],
    ) -> Result<usize, ShmError> {
        self.draft_rewrite_from(request_id, from, tokens, &[])
    }

    /// [`draft_rewrite`](Self::draft_rewrite) with each token's source, as
    /// [`draft_append_from`](Self::draft_append_from).
    pub fn draft_rewrite_from(
        &self,
        request_id: u64,
        from: usize,
        tokens: &[u32],
        sources: &[TokenSource],
    ) -> Result<usize, ShmError> {
        let d = &self.draft;
        let cur = (d.draft_len.load(Ordering::Relaxed) as usize).min(TOKEN_CAPACITY);
        if from > cur {
            return Err(ShmError::DraftRewriteBeyondEnd { from, len: cur });
        }
        let end = from + tokens.len();
        if end > TOKEN_CAPACITY {
            return Err(ShmError::CapacityExceeded {
                what: "draft tokens",
                needed: end,
                capacity: TOKEN_CAPACITY,
            });
        }
        let odd = seq_open(&d.draft_epoch);
        d.draft_request_id.store(request_id, Ordering::Relaxed);
        store_range(&d.tokens, from, tokens);
        store_sources(&d.sources, from, tokens.len(), sources);
        d.draft_len.store(end as u32, Ordering::Relaxed);
        seq_close(&d.draft_epoch, odd);
        futex_wake(&d.draft_len);
        self.ring(Party::Verify);
        Ok(end)
    }

    /// Coordinator, after reaping the draft worker and before starting its replacement: if the dead
    /// worker left the epoch odd (killed mid-rewrite), empty the draft and make the epoch even, so
    /// the verify worker does not spin [`SEQLOCK_READ_BUDGET`] on every step until the replacement
    /// rewrites. Safe because the draft buffer has no writer while its worker is dead. Returns
    /// whether a repair was needed.
    pub fn repair_draft_epoch(&self) -> bool {
        let d = &self.draft;
        if d.draft_epoch.load(Ordering::Acquire) & 1 == 0 {
            return false;
        }
        let odd = seq_open(&d.draft_epoch);
        d.draft_request_id.store(0, Ordering::Relaxed);
        d.draft_len.store(0, Ordering::Relaxed);
        seq_close(&d.draft_epoch, odd);
        futex_wake(&d.draft_len);
        self.ring(Party::Verify);
        true
    }

    /// Verify worker: a consistent snapshot of the draft at positions `from..min(len, from+max)`
    /// (seqlock read on `draft_epoch`; retried). Fails with [`ShmError::Unstable`] after
    /// [`SEQLOCK_READ_BUDGET`] if the epoch stays odd or keeps changing, e.g. because the draft
    /// worker was killed mid-rewrite (its restarted successor repairs the epoch with its first
    /// rewrite).
    pub fn read_draft(&self, from: usize, max: usize) -> Result<DraftSnapshot, ShmError> {
        let d = &self.draft;
        seq_read(&d.draft_epoch, "draft buffer", |epoch| {
            let request_id = d.draft_request_id.load(Ordering::Relaxed);
            // Acquire: appends publish slots with a Release store of draft_len, outside the epoch.
            let len = self.draft_len();
            let from = from.min(len);
            let to = from.saturating_add(max).min(len);
            DraftSnapshot {
                request_id,
                epoch,
                len,
                from,
                tokens: load_range(&d.tokens, from, to),
                sources: load_range(&d.sources, from, to)
                    .into_iter()
                    .map(|v| TokenSource::from_u32(v).unwrap_or(TokenSource::Model))
                    .collect(),
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // Worker status
    // -----------------------------------------------------------------------------------------

    /// `role`'s status block.
    pub fn worker(&self, role: Role) -> &WorkerStatus {
        &self.workers[role.index()]
    }

    /// Worker: register this process in `role`'s block: pid, heartbeat, device and model text,
    /// cleared `last_error` and `request_id`, then `state = Starting` (Release) and ring the
    /// coordinator's bell.
    pub fn register_worker(&self, role: Role, device: &str, model: &str) {
        let w = self.worker(role);
        w.pid.store(std::process::id(), Ordering::Relaxed);
        w.heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
        w.device.set(device);
        w.model.set(model);
        w.last_error.clear();
        w.request_id.store(0, Ordering::Relaxed);
        self.set_worker_state(role, WorkerState::Starting);
    }

    /// Set `role`'s state (Release; also refreshes its heartbeat) and ring the coordinator's bell.
    /// Workers set Starting..Busy; the coordinator sets Dead after reaping (see
    /// [`mark_worker_dead`](Self::mark_worker_dead)).
    pub fn set_worker_state(&self, role: Role, state: WorkerState) {
        let w = self.worker(role);
        w.heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
        w.state.store(state.as_u32(), Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// `role`'s state (Acquire); `None` for a value this build never writes.
    pub fn worker_state(&self, role: Role) -> Option<WorkerState> {
        WorkerState::from_u32(self.worker(role).state.load(Ordering::Acquire))
    }

    /// Worker: record the request it holds (0 = none) with Release and ring the coordinator's
    /// bell. The verify worker must set 0 (or another id) after its last `publish_verified` for a
    /// request; the coordinator waits for that before submitting the next request.
    pub fn set_worker_request(&self, role: Role, request_id: u64) {
        self.worker(role)
            .request_id
            .store(request_id, Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// The request `role` holds (Acquire; 0 = none).
    pub fn worker_request(&self, role: Role) -> u64 {
        self.worker(role).request_id.load(Ordering::Acquire)
    }

    /// Worker: heartbeat (CLOCK_MONOTONIC ms, Relaxed).
    pub fn heartbeat(&self, role: Role) {
        self.worker(role)
            .heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since `role`'s last heartbeat (0 if it is in the future; `None` if never).
    pub fn heartbeat_age_ms(&self, role: Role) -> Option<u64> {
        let hb = self.worker(role).heartbeat_ms.load(Ordering::Relaxed);
        (hb != 0).then(|| crate::futex::now_ms().saturating_sub(hb))
    }

    /// Coordinator, after reaping `role`'s process: record `exit`, then `state = Dead` (Release),
    /// clear the held request, ring the coordinator's own bell (for other coordinator threads).
    pub fn mark_worker_dead(&self, role: Role, exit: ExitStatus) {
        let w = self.worker(role);
        w.exit_status.store(exit.encode(), Ordering::Relaxed);
        w.request_id.store(0, Ordering::Relaxed);
        w.state.store(WorkerState::Dead.as_u32(), Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// Coordinator, before spawning a replacement: count the restart (Relaxed).
    pub fn count_restart(&self, role: Role) -> u32 {
        self.worker(role).restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A copy of `role`'s status block (fields individually loaded; not a consistent snapshot).
    pub fn worker_snapshot(&self, role: Role) -> WorkerSnapshot {
        let w = self.worker(role);
        let r = Ordering::Relaxed;
        WorkerSnapshot {
            role,
            pid: w.pid.load(r),
            state: WorkerState::from_u32(w.state.load(Ordering::Acquire)),
            heartbeat_ms: w.heartbeat_ms.load(r),
            restarts: w.restarts.load(r),
            exit_status: ExitStatus::decode(w.exit_status.load(r)),
            request_id: w.request_id.load(Ordering::Acquire),
            steps: w.steps.load(r),
            tokens: w.tokens.load(r),
            rollbacks: w.rollbacks.load(r),
            proposed: w.proposed.load(r),
            accepted: w.accepted.load(r),
            device: w.device.get(),
            model: w.model.get(),
            last_error: w.last_error.get(),
        }
    }

    /// `role`'s metric ring.
    pub fn events(&self, role: Role) -> &EventRing {
        match role {
            Role::Draft => &self.draft_events,
            Role::Verify => &self.verify_events,
        }
    }
}

impl EventRing {
    /// Events pushed so far (Acquire).
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The ring's single writer: append `ev` (its `seq` is ignored and assigned). Stores the slot
    /// (Relaxed, after a `fence(Release)` that orders it after the previous `head` store), then
    /// `head + 1` (Release). Returns the event's seq.
    pub fn push(&self, ev: &EventRecord) -> u64 {
        let h = self.head.load(Ordering::Relaxed);
        // Any reader that sees one of the slot stores below also sees head >= h (pairs with the
        // reader's fence(Acquire)), so it knows this slot's previous event is being overwritten.
        fence(Ordering::Release);
        let s = &self.events[(h % EVENT_CAPACITY as u64) as usize];
        let r = Ordering::Relaxed;
        s.seq.store(h, r);
        s.t_start_us.store(ev.t_start_us, r);
        s.t_end_us.store(ev.t_end_us, r);
        s.request_id.store(ev.request_id, r);
        s.kind.store(ev.kind.as_u32(), r);
        s.position.store(ev.position, r);
        s.count.store(ev.count, r);
        s.accepted.store(ev.accepted, r);
        self.head.store(h.wrapping_add(1), Ordering::Release);
        h
    }

    /// Read events `lo..hi` (requires `hi <= head` as loaded with Acquire, `hi - lo <= CAP`),
    /// dropping those whose slot may have been overwritten during the read.
    fn read_range(&self, lo: u64, hi: u64) -> Vec<EventRecord> {
        let r = Ordering::Relaxed;
        let mut raw = Vec::with_capacity((hi - lo) as usize);
        for i in lo..hi {
            let s = &self.events[(i % EVENT_CAPACITY as u64) as usize];
            raw.push((
                i,
                s.seq.load(r),
                s.t_start_us.load(r),
                s.t_end_us.load(r),
                s.request_id.load(r),
                s.kind.load(r),
                s.position.load(r),
                s.count.load(r),
                s.accepted.load(r),
            ));
        }
        fence(Ordering::Acquire);
        let h2 = self.head.load(Ordering::Relaxed);
        // Event i's slot is next written by event i + CAP, which starts only once head reaches
        // i + CAP. If we saw none of that write, h2 < i + CAP.
        let intact_from = h2.saturating_add(1).saturating_sub(EVENT_CAPACITY as u64);
        raw.into_iter()
            .filter(|e| e.0 >= intact_from && e.1 == e.0)
            .filter_map(|e| {
                Some(EventRecord {
                    seq: e.1,
                    t_start_us: e.2,
                    t_end_us: e.3,
                    request_id: e.4,
                    kind: EventKind::from_u32(e.5)?,
                    position: e.6,
                    count: e.7,
                    accepted: e.8,
                })
            })
            .collect()
    }

    /// The last `n` (at most [`READABLE_EVENTS`]) events, oldest first, without any whose slot
    /// was overwritten while reading.
    pub fn recent_events(&self, n: usize) -> Vec<EventRecord> {
        let hi = self.head();
        let n = n.min(READABLE_EVENTS) as u64;
        self.read_range(hi.saturating_sub(n), hi)
    }

    /// Events from index `cursor` on (at most `max`), oldest first, for a reader that drains the
    /// ring incrementally; `lost` counts those already overwritten.
    pub fn events_since(&self, cursor: u64, max: usize) -> EventBatch {
        let head = self.head();
        let oldest = head.saturating_sub(READABLE_EVENTS as u64);
        let lo = cursor.clamp(oldest, head);
        let hi = lo.saturating_add(max.min(READABLE_EVENTS) as u64).min(head);
        let events = self.read_range(lo, hi);
        let first = events.first().map_or(hi, |e| e.seq);
        EventBatch {
            lost: (lo - cursor.min(lo)) + (first - lo),
            next: hi,
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn region() -> Arc<Region> {
        Arc::from(Region::new_boxed())
    }

    #[test]
    fn coordinator_repairs_an_epoch_left_odd_by_a_killed_draft_worker() {
        let r = region();
        r.draft_rewrite(4, 0, &[1, 2, 3]).unwrap();
        assert!(!r.repair_draft_epoch(), "an even epoch needs no repair");
        assert_eq!(r.read_draft(0, 8).unwrap().tokens, vec![1, 2, 3]);
        // A draft worker killed between the odd and the even store of a rewrite.
        seq_open(&r.draft.draft_epoch);
        assert!(matches!(r.read_draft(0, 8), Err(ShmError::Unstable { .. })));
        assert!(r.repair_draft_epoch());
        let d = r.read_draft(0, 8).unwrap();
        assert_eq!((d.request_id, d.len, d.epoch % 2), (0, 0, 0));
        // The replacement's appends work again.
        r.draft_rewrite(4, 0, &[1]).unwrap();
        r.draft_append(&[5]).unwrap();
        assert_eq!(r.read_draft(0, 8).unwrap().tokens, vec![1, 5]);
    }

    #[test]
    fn logprob_rows_roundtrip() {
        let r = region();
        let rows = vec![
            vec![
                (7, (-0.5f32).to_bits()),
                (7, (-0.5f32).to_bits()),
                (2, (-1.5f32).to_bits()),
            ],
            vec![
                (9, (-3.0f32).to_bits()),
                (4, (-0.1f32).to_bits()),
                (9, (-3.0f32).to_bits()),
            ],
        ];
        r.store_logprobs(3, &rows).unwrap();
        assert_eq!(r.read_logprobs(3, 5, 3), rows);
        assert_eq!(r.read_logprobs(4, 5, 1), vec![vec![rows[1][0]]]);
        assert!(matches!(
            r.store_logprobs(TOKEN_CAPACITY - 1, &rows),
            Err(ShmError::CapacityExceeded { .. })
        ));
    }

    #[test]
    fn request_roundtrip_and_errors() {
        let r = region();
        let snap = r.read_request().unwrap();
        assert_eq!(snap.state, RequestState::Idle);
        assert_eq!(snap.request_id, 0);

        let spec = RequestSpec {
            request_id: 9,
            prompt: &[1, 2, 3],
            max_new_tokens: 100,
            stop_tokens: &[2, 7],
            sampling: SamplingFields {
                seed: u64::MAX - 1,
                temperature_bits: 0.7f32.to_bits(),
                dynatemp_range_bits: 0.3f32.to_bits(),
                dynatemp_exponent_bits: 2.0f32.to_bits(),
                top_k: 40,
                top_p_bits: 0.9f32.to_bits(),
                min_p_bits: 0.05f32.to_bits(),
                top_n_sigma_bits: 1.5f32.to_bits(),
                typical_p_bits: 0.95f32.to_bits(),
                xtc_probability_bits: 0.5f32.to_bits(),
                xtc_threshold_bits: 0.2f32.to_bits(),
                dry_multiplier_bits: 0.8f32.to_bits(),
                dry_base_bits: 2.0f32.to_bits(),
                dry_allowed_length: 3,
                dry_last_n: 500,
                dry_breakers: vec![0, 1 << 63, 5],
                repeat_penalty_bits: 1.1f32.to_bits(),
                frequency_penalty_bits: (-0.5f32).to_bits(),
                presence_penalty_bits: 0.25f32.to_bits(),
                penalty_last_n: u32::MAX,
                greedy_draft: true,
                no_draft_lookup: true,
                cache_prompt: true,
                logit_bias: vec![(5, 2.5f32.to_bits()), (49151, f32::NEG_INFINITY.to_bits())],
                logprobs: 4,
                prompt_logprobs: true,
                grammar_kind: 2,
                grammar: r#"{"type": "object", "title": "caf\u00e9 ☕"}"#.into(),
            },
        };
        let too_long = SamplingFields {
            grammar_kind: 3,
            grammar: "a".repeat(GRAMMAR_TEXT_LEN + 1),
            ..SamplingFields::GREEDY
        };
        assert!(matches!(
            r.submit_request(&RequestSpec {
                sampling: too_long,
                ..spec.clone()
            }),
            Err(ShmError::GrammarTooLong { given, max: GRAMMAR_TEXT_LEN }) if given == GRAMMAR_TEXT_LEN + 1
        ));
        let too_many = SamplingFields {
            logit_bias: vec![(1, 0); MAX_LOGIT_BIAS + 1],
            ..SamplingFields::GREEDY
        };
        assert!(matches!(
            r.submit_request(&RequestSpec {
                sampling: too_many,
                ..spec.clone()
            }),
            Err(ShmError::TooManyLogitBias {
                given: 257,
                max: 256
            })
        ));
        let w0 = r.request_word();
        r.submit_request(&spec).unwrap();
        assert_eq!(r.request_word(), w0 + 2);
        let snap = r.read_request().unwrap();
        assert_eq!(snap.request_id, 9);
        assert_eq!(snap.state, RequestState::Running);
        assert_eq!(snap.prompt_len, 3);
        assert_eq!(snap.max_new_tokens, 100);
        assert_eq!(snap.stop_tokens, vec![2, 7]);
        assert_eq!(snap.sampling, spec.sampling);
        assert_eq!(snap.finish_reason, FinishReason::None);
        assert_eq!(r.verified_len(), 3);
        assert_eq!(r.read_verified(0, usize::MAX), vec![1, 2, 3]);

        assert!(matches!(
            r.submit_request(&RequestSpec {
                request_id: 10,
                ..spec.clone()
            }),
            Err(ShmError::RequestRunning { request_id: 9 })
        ));
        assert!(matches!(
            r.finish_request(8, FinishReason::Stop, ""),
            Err(ShmError::NotCurrentRequest { given: 8, .. })
        ));
        r.finish_request(9, FinishReason::Error, "verify worker died: CUDA OOM")
            .unwrap();
        let snap = r.read_request().unwrap();
        assert_eq!(snap.state, RequestState::Failed);
        assert_eq!(snap.finish_reason, FinishReason::Error);
        assert_eq!(snap.error_text, "verify worker died: CUDA OOM");

        assert!(matches!(
            r.submit_request(&RequestSpec {
                request_id: 0,
                ..spec.clone()
            }),
            Err(ShmError::InvalidRequestId)
        ));
        assert!(matches!(
            r.submit_request(&RequestSpec {
                request_id: 11,
                stop_tokens: &[0; 9],
                ..spec.clone()
            }),
            Err(ShmError::TooManyStopTokens { given: 9, max: 8 })
        ));
        assert!(matches!(
            r.submit_request(&RequestSpec {
                request_id: 11,
                max_new_tokens: TOKEN_CAPACITY as u32,
                ..spec.clone()
            }),
            Err(ShmError::CapacityExceeded { .. })
        ));
        // A second request replaces the prompt and the finish state.
        r.submit_request(&RequestSpec {
            request_id: 12,
            prompt: &[5],
            max_new_tokens: 1,
            stop_tokens: &[],
            sampling: SamplingFields::GREEDY,
        })
        .unwrap();
        let snap = r.read_request().unwrap();
        assert_eq!((snap.request_id, snap.prompt_len), (12, 1));
        assert_eq!(
            snap.sampling,
            SamplingFields::GREEDY,
            "the grammar is cleared too"
        );
        assert_eq!(snap.finish_reason, FinishReason::None);
        assert_eq!(snap.error_text, "");
        assert!(snap.stop_tokens.is_empty());
        r.finish_request(12, FinishReason::Length, "").unwrap();
        assert_eq!(r.request_state(), Some(RequestState::Done));

        assert!(!r.shutdown_requested());
        r.request_shutdown();
        assert!(r.shutdown_requested());
        assert!(r.read_request().unwrap().shutdown);
    }

    #[test]
    fn corrupt_values_are_reported_not_trusted() {
        let r = region();
        r.request.state.store(77, Ordering::Relaxed);
        assert!(matches!(
            r.read_request(),
            Err(ShmError::Corrupt {
                field: "request.state",
                value: 77
            })
        ));
        r.request.state.store(0, Ordering::Relaxed);
        r.request.prompt_len.store(u32::MAX, Ordering::Relaxed);
        r.request.n_stop_tokens.store(u32::MAX, Ordering::Relaxed);
        let s = r.read_request().unwrap();
        assert_eq!(s.prompt_len, TOKEN_CAPACITY);
        assert_eq!(s.stop_tokens.len(), MAX_STOP_TOKENS);

        r.verified.verified_len.store(u32::MAX, Ordering::Relaxed);
        assert_eq!(r.verified_len(), TOKEN_CAPACITY);
        assert_eq!(r.read_verified(0, usize::MAX).len(), TOKEN_CAPACITY);
        assert_eq!(r.read_verified(usize::MAX, 3).len(), 0);
        r.draft.draft_len.store(u32::MAX, Ordering::Relaxed);
        let d = r.read_draft(TOKEN_CAPACITY - 2, usize::MAX).unwrap();
        assert_eq!((d.len, d.tokens.len()), (TOKEN_CAPACITY, 2));
        r.worker(Role::Draft).state.store(99, Ordering::Relaxed);
        assert_eq!(r.worker_state(Role::Draft), None);
        r.events(Role::Draft)
            .head
            .store(u64::MAX, Ordering::Relaxed);
        // All slots are zero (seq 0, kind 0): nothing valid, nothing out of bounds.
        assert!(r.events(Role::Draft).recent_events(10).is_empty());
        let b = r.events(Role::Draft).events_since(0, 10);
        assert!(b.events.is_empty());
    }

    #[test]
    fn verified_is_append_only() {
        let r = region();
        r.submit_request(&RequestSpec {
            request_id: 1,
            prompt: &[10, 11],
            max_new_tokens: 10,
            stop_tokens: &[],
            sampling: SamplingFields::GREEDY,
        })
        .unwrap();
        assert_eq!(r.publish_verified(2, &[12, 13]).unwrap(), 4);
        assert!(matches!(
            r.publish_verified(3, &[99]),
            Err(ShmError::VerifiedOutOfOrder {
                expected: 4,
                got: 3
            })
        ));
        assert_eq!(r.read_verified(1, 3), vec![11, 12]);
        let s = r.verified_snapshot(1, 100).unwrap();
        assert_eq!((s.request_id, s.len, s.from), (1, 4, 1));
        assert_eq!(s.tokens, vec![11, 12, 13]);
        let big = vec![0; TOKEN_CAPACITY];
        assert!(matches!(
            r.publish_verified(4, &big),
            Err(ShmError::CapacityExceeded { .. })
        ));
    }

    #[test]
    fn draft_sources_travel_with_their_tokens() {
        use TokenSource::{Lookup, Model};
        let r = region();
        r.draft_rewrite_from(2, 0, &[1, 2, 3], &[Model, Model, Lookup])
            .unwrap();
        r.draft_append_from(&[4, 5], &[Lookup]).unwrap();
        let s = r.read_draft(1, 10).unwrap();
        assert_eq!(s.tokens, vec![2, 3, 4, 5]);
        assert_eq!(
            s.sources,
            vec![Model, Lookup, Lookup, Model],
            "unsaid: model"
        );
        // A rollback rewrites the sources with the tokens.
        r.draft_rewrite_from(2, 2, &[30], &[Model]).unwrap();
        r.draft_append(&[6]).unwrap();
        assert_eq!(r.read_draft(0, 10).unwrap().sources, vec![Model; 4]);
    }

    #[test]
    fn draft_append_rewrite_and_repair() {
        let r = region();
        assert_eq!(r.draft_rewrite(5, 0, &[1, 2, 3]).unwrap(), 3);
        assert_eq!(r.draft_append(&[4, 5]).unwrap(), 5);
        let s = r.read_draft(1, 3).unwrap();
        assert_eq!(s.tokens, vec![2, 3, 4]);
        assert_eq!((s.request_id, s.len, s.from, s.epoch), (5, 5, 1, 2));
        // Roll back to 3 and draft two new tokens.
        assert_eq!(r.draft_rewrite(5, 3, &[40, 50]).unwrap(), 5);
        let s = r.read_draft(0, 100).unwrap();
        assert_eq!(s.tokens, vec![1, 2, 3, 40, 50]);
        assert_eq!(s.epoch, 4);
        assert!(matches!(
            r.draft_rewrite(5, 6, &[]),
            Err(ShmError::DraftRewriteBeyondEnd { from: 6, len: 5 })
        ));
        assert_eq!(r.read_draft(9, 3).unwrap().tokens, Vec::<u32>::new());

        // A writer killed mid-rewrite leaves the epoch odd: readers give up (bounded), appends
        // refuse, and the next rewrite repairs it.
        r.draft.draft_epoch.store(7, Ordering::Relaxed);
        let t = Instant::now();
        assert!(matches!(
            r.read_draft(0, 10),
            Err(ShmError::Unstable {
                what: "draft buffer",
                word: 7,
                ..
            })
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            r.draft_append(&[1]),
            Err(ShmError::DraftMidRewrite { epoch: 7 })
        ));
        r.draft_rewrite(6, 0, &[9]).unwrap();
        let s = r.read_draft(0, 10).unwrap();
        assert_eq!((s.request_id, s.epoch, s.tokens), (6, 10, vec![9]));
    }

    /// Token at position p (13 bits) written in generation g (19 bits; = rewrites so far).
    fn tok(p: usize, g: u32) -> u32 {
        assert!(p < 1 << 13 && g < 1 << 19);
        ((p as u32) << 19) | g
    }

    #[test]
    fn draft_seqlock_readers_never_see_torn_snapshots() {
        let r = region();
        r.draft_rewrite(1, 0, &[]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(7);
                let mut gen = 1u32; // rewrites done == epoch / 2
                let mut len = 0usize;
                let mut ops = 0u64;
                while !stop.load(Ordering::Relaxed) || ops < 20_000 {
                    ops += 1;
                    if rng.gen_bool(0.3) || len + 8 > 4096 {
                        gen += 1;
                        let from = rng.gen_range(0..=len);
                        let n = rng.gen_range(0..64);
                        let toks: Vec<u32> = (from..from + n).map(|p| tok(p, gen)).collect();
                        len = r.draft_rewrite(gen as u64, from, &toks).unwrap();
                    } else {
                        let n = rng.gen_range(1..8);
                        let toks: Vec<u32> = (len..len + n).map(|p| tok(p, gen)).collect();
                        len = r.draft_append(&toks).unwrap();
                    }
                    if ops > 2_000_000 || gen >= (1 << 19) - 2 {
                        break;
                    }
                }
                ops
            })
        };
        let mut snapshots = 0u64;
        let mut nonempty = 0u64;
        let mut epochs = std::collections::BTreeSet::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1500) {
            let from = (snapshots as usize * 37) % 600;
            match r.read_draft(from, 512) {
                Ok(s) => {
                    snapshots += 1;
                    epochs.insert(s.epoch);
                    assert_eq!(s.epoch % 2, 0);
                    let gen = s.epoch / 2;
                    assert_eq!(s.request_id, gen as u64, "request id torn from epoch");
                    let mut prev_gen = 0;
                    for (i, &t) in s.tokens.iter().enumerate() {
                        let p = s.from + i;
                        assert_eq!((t >> 19) as usize, p, "token at wrong position");
                        let g = t & ((1 << 19) - 1);
                        assert!(g <= gen, "token from a rewrite after the snapshot");
                        assert!(g >= prev_gen, "mixed generations: torn snapshot");
                        prev_gen = g;
                    }
                    if !s.tokens.is_empty() {
                        nonempty += 1;
                    }
                }
                Err(ShmError::Unstable { .. }) => {} // a descheduled writer; retry
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let ops = writer.join().unwrap();
        assert!(snapshots > 100 && nonempty > 10, "{snapshots} snapshots");
        assert!(
            epochs.len() > 10,
            "reader saw too few epochs to mean anything"
        );
        eprintln!(
            "seqlock: {ops} writer ops, {snapshots} snapshots over {} epochs",
            epochs.len()
        );
    }

    #[test]
    fn verified_snapshot_never_mixes_requests() {
        // The coordinator submits requests with prompts derived from the request id while a
        // reader takes snapshots: every snapshot's tokens must belong to its request id.
        let r = region();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut id = 0u64;
                while !stop.load(Ordering::Relaxed) || id < 2000 {
                    id += 1;
                    let n = 1 + (id as usize * 131) % 3000;
                    let prompt: Vec<u32> =
                        (0..n).map(|p| (id as u32) ^ ((p as u32) << 12)).collect();
                    r.submit_request(&RequestSpec {
                        request_id: id,
                        prompt: &prompt,
                        max_new_tokens: 0,
                        stop_tokens: &[],
                        sampling: SamplingFields::GREEDY,
                    })
                    .unwrap();
                    r.finish_request(id, FinishReason::Length, "").unwrap();
                }
            })
        };
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed() < Duration::from_millis(500) {
            if let Ok(s) = r.verified_snapshot(0, 3000) {
                n += 1;
                for (p, &tk) in s.tokens.iter().enumerate() {
                    assert_eq!(tk, (s.request_id as u32) ^ ((p as u32) << 12));
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(n > 10);
    }

    fn ev(i: u64) -> EventRecord {
        EventRecord {
            seq: 0,
            t_start_us: i * 3,
            t_end_us: i * 3 + 1,
            request_id: i ^ 0x5555,
            kind: [
                EventKind::DraftToken,
                EventKind::VerifyStep,
                EventKind::Rollback,
            ][(i % 3) as usize],
            position: (i as u32).wrapping_mul(7),
            count: (i % 17) as u32,
            accepted: (i % 13) as u32,
        }
    }

    fn check_ev(e: &EventRecord) {
        let want = EventRecord {
            seq: e.seq,
            ..ev(e.seq)
        };
        assert_eq!(*e, want, "half-written event");
    }

    #[test]
    fn ring_basics() {
        let r = region();
        let ring = r.events(Role::Verify);
        assert!(ring.recent_events(5).is_empty());
        for i in 0..10 {
            assert_eq!(ring.push(&ev(i)), i);
        }
        let got = ring.recent_events(4);
        assert_eq!(
            got.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![6, 7, 8, 9]
        );
        got.iter().for_each(check_ev);
        let b = ring.events_since(0, 100);
        assert_eq!((b.events.len(), b.next, b.lost), (10, 10, 0));
        for i in 10..(10 + EVENT_CAPACITY as u64) {
            ring.push(&ev(i));
        }
        // head = 4106: events 3..10 were overwritten and 10's slot is the next to be written.
        let b = ring.events_since(3, 100);
        assert_eq!(b.lost, 8);
        assert_eq!(b.events[0].seq, 11);
        assert_eq!(b.next, 111);
        let all = ring.recent_events(usize::MAX);
        assert_eq!(all.len(), READABLE_EVENTS);
        assert_eq!(all.last().unwrap().seq, 10 + EVENT_CAPACITY as u64 - 1);
        all.iter().for_each(check_ev);
    }

    #[test]
    fn ring_reader_never_returns_half_written_events() {
        let r = region();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (r, stop) = (r.clone(), stop.clone());
            std::thread::spawn(move || {
                let ring = r.events(Role::Draft);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) || i < 100_000 {
                    ring.push(&ev(i));
                    i += 1;
                }
                i
            })
        };
        let ring = r.events(Role::Draft);
        let t = Instant::now();
        let (mut reads, mut seen, mut cursor, mut lost) = (0u64, 0u64, 0u64, 0u64);
        while t.elapsed() < Duration::from_millis(800) {
            let got = ring.recent_events(EVENT_CAPACITY);
            for w in got.windows(2) {
                assert_eq!(w[0].seq + 1, w[1].seq, "gap inside the intact range");
            }
            got.iter().for_each(check_ev);
            let b = ring.events_since(cursor, 1000);
            b.events.iter().for_each(check_ev);
            assert_eq!(
                b.events.first().map(|e| e.seq),
                (b.next > cursor + b.lost).then_some(cursor + b.lost)
            );
            lost += b.lost;
            cursor = b.next;
            seen += got.len() as u64;
            reads += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let pushed = writer.join().unwrap();
        assert!(reads > 10 && seen > 0);
        eprintln!("ring: {pushed} pushed, {reads} reads, drain lost {lost}");
    }

    #[test]
    fn worker_status_and_bells() {
        let r = region();
        let seen = r.bell_value(Party::Coordinator);
        r.register_worker(Role::Verify, "cuda:0", "llama-3.1-8b-instruct.Q8_0.gguf");
        assert!(r.bell_value(Party::Coordinator) != seen);
        assert_eq!(r.worker_state(Role::Verify), Some(WorkerState::Starting));
        r.set_worker_state(Role::Verify, WorkerState::Ready);
        r.set_worker_request(Role::Verify, 3);
        r.worker(Role::Verify).steps.fetch_add(2, Ordering::Relaxed);
        r.worker(Role::Verify)
            .last_error
            .set("CUDA error: out of memory");
        let s = r.worker_snapshot(Role::Verify);
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.state, Some(WorkerState::Ready));
        assert_eq!((s.request_id, s.steps), (3, 2));
        assert_eq!(s.device, "cuda:0");
        assert_eq!(s.model, "llama-3.1-8b-instruct.Q8_0.gguf");
        assert_eq!(s.last_error, "CUDA error: out of memory");
        assert!(r.heartbeat_age_ms(Role::Verify).unwrap() < 10_000);
        assert_eq!(r.heartbeat_age_ms(Role::Draft), None);
        assert_eq!(r.count_restart(Role::Verify), 1);
        r.mark_worker_dead(Role::Verify, ExitStatus::Signal(9));
        let s = r.worker_snapshot(Role::Verify);
        assert_eq!(s.state, Some(WorkerState::Dead));
        assert_eq!(s.exit_status, ExitStatus::Signal(9));
        assert_eq!((s.restarts, s.request_id), (1, 0));

        // A bell wakes a waiter in another thread.
        let seen = r.bell_value(Party::Draft);
        let waiter = {
            let r = r.clone();
            std::thread::spawn(move || {
                r.wait_bell(Party::Draft, seen, Some(Duration::from_secs(20)))
            })
        };
        r.submit_request(&RequestSpec {
            request_id: 1,
            prompt: &[1],
            max_new_tokens: 1,
            stop_tokens: &[],
            sampling: SamplingFields::GREEDY,
        })
        .unwrap();
        assert!(waiter.join().unwrap().is_some());
    }
}
