//! The region's memory layout: [`Region`] and its sections, the capacity constants and the small
//! enums stored in it as `u32`s.
//!
//! Every field is an atomic, so any access from any process is defined behaviour even when it
//! races (a racing read may be *stale* or part of a *torn* multi-field update, which the protocol
//! methods on [`Region`] detect where it matters; it is never UB). Padding between fields
//! is never read or written.
//!
//! Ownership is by section: each field's doc says which party writes it and which read it, and
//! with which ordering. "Coordinator" means the coordinator process, and the coordinator's writes
//! must come from one thread at a time. Changing anything here changes the layout: bump
//! [`LAYOUT_VERSION`] and the pinned offsets in the layout test.

use std::mem::{align_of, offset_of, size_of};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

use crate::text::ShmText;

/// `b"AMUSDSHM"` read as a little-endian `u64` (so a hex dump of a region starts `AMUSDSHM`).
pub const MAGIC: u64 = u64::from_le_bytes(*b"AMUSDSHM");

/// The layout version; bumped whenever [`Region`]'s layout or the meaning of a field changes.
pub const LAYOUT_VERSION: u32 = 12;

/// Tokens per token buffer (verified and draft); a request's prompt plus its new tokens must fit.
pub const TOKEN_CAPACITY: usize = 8192;

/// Stop tokens a request can carry.
pub const MAX_STOP_TOKENS: usize = 8;

/// Tokens a request's logit bias can name ([`RequestSection::logit_bias`]).
pub const MAX_LOGIT_BIAS: usize = 256;

/// Most likely alternatives a request may ask for per generated token, besides the token itself
/// ([`LogprobBuffer`]); OpenAI's `top_logprobs` limit.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Bytes of a request's grammar ([`GrammarSection::text`]): a JSON schema, a regular expression,
/// a Lark or a GBNF grammar.
pub const GRAMMAR_TEXT_LEN: usize = 128 * 1024;

/// Words of DRY's sequence-breaker bit set ([`DrySection::breakers`]): one bit per token of a
/// vocabulary of up to 262,144 (Gemma's).
pub const MAX_BREAKER_WORDS: usize = 4096;

/// Events per metric ring.
pub const EVENT_CAPACITY: usize = 4096;

/// Bytes of [`KvExchange`]: the keys and values of a prompt's positions split between the workers
/// ([`SplitSection`]), `2 * kv_dim * 4` bytes a position and block (SmolLM2-135M: 1,536). Holds
/// every block of a prompt of up to 1,092 positions there, and a ring of fewer blocks at a time
/// beyond (one block of up to 32,768). Reserved only as a split uses it
/// ([`crate::Region::reserve_exchange`]).
pub const KV_EXCHANGE_BYTES: usize = 48 << 20;

/// Bytes of the region reserved at creation: everything before [`KvExchange`].
pub const FIXED_REGION_BYTES: usize = offset_of!(Region, kv);

/// Bytes of the header that [`crate::validate_header`] reads.
pub const HEADER_LEN: usize = size_of::<Header>();

/// Byte size of the whole region (`size_of::<Region>()`).
pub const REGION_SIZE: usize = size_of::<Region>();

/// Bytes of [`RequestSection::error_text`] and [`WorkerStatus::last_error`].
pub const ERROR_TEXT_LEN: usize = 256;
/// Bytes of [`WorkerStatus::device`].
pub const DEVICE_TEXT_LEN: usize = 32;
/// Bytes of [`WorkerStatus::model`].
pub const MODEL_TEXT_LEN: usize = 96;

// ---------------------------------------------------------------------------------------------
// Enums stored as u32
// ---------------------------------------------------------------------------------------------

macro_rules! u32_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum $name { $($(#[$vm])* $v = $n),+ }

        impl $name {
            /// Decode a value read from the region; `None` for values this build never writes.
            pub fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($n => Some(Self::$v),)+
                    _ => None,
                }
            }
            /// The value stored in the region.
            pub fn as_u32(self) -> u32 {
                self as u32
            }
        }
    };
}

u32_enum! {
    /// [`RequestSection::state`].
    pub enum RequestState {
        /// No request yet (a fresh region).
        Idle = 0,
        /// The request's fields and prompt are published; workers should work on it.
        Running = 1,
        /// Finished normally (finish reason Stop or Length).
        Done = 2,
        /// Finished abnormally (finish reason Error or Cancelled; see `error_text`).
        Failed = 3,
    }
}

u32_enum! {
    /// [`RequestSection::finish_reason`].
    pub enum FinishReason {
        /// Not finished.
        None = 0,
        /// A stop token was committed.
        Stop = 1,
        /// `max_new_tokens` were committed.
        Length = 2,
        /// A worker or the coordinator failed; `error_text` says why.
        Error = 3,
        /// The client went away or the coordinator cancelled it.
        Cancelled = 4,
    }
}

u32_enum! {
    /// The state of a split prefill job, in [`SplitSection::job`].
    pub enum SplitState {
        /// No job since the region was created.
        Empty = 0,
        /// The verify worker posted the job; the draft worker may take it.
        Offered = 1,
        /// The draft worker computes positions `0..split`, counting the blocks it has published.
        Taken = 2,
        /// The verify worker took in every block and published positions `split..end`.
        Handed = 3,
        /// Given up by either worker (the draft late or stalled, the request cancelled): neither
        /// reads the other's positions any more.
        Dropped = 4,
    }
}

u32_enum! {
    /// [`WorkerStatus::state`].
    pub enum WorkerState {
        /// No worker process has registered in this block.
        Absent = 0,
        /// The process has started and attached.
        Starting = 1,
        /// Loading its model onto its device.
        Loading = 2,
        /// Loaded and idle, waiting for a request.
        Ready = 3,
        /// Working on a request.
        Busy = 4,
        /// Reaped by the coordinator (see `exit_status`).
        Dead = 5,
    }
}

u32_enum! {
    /// [`Event::kind`]. 0 is "never written".
    pub enum EventKind {
        /// The draft worker drafted `count` tokens at `position`.
        DraftToken = 1,
        /// The draft worker rolled back to `position`, discarding `count` drafted tokens.
        Rollback = 2,
        /// The verify worker checked `count` proposed tokens at `position`, `accepted` of them.
        VerifyStep = 3,
        /// A plain autoregressive step (`count` tokens committed at `position`).
        ArStep = 4,
        /// The verify worker took up a request with `count` committed tokens, `accepted` of them
        /// already cached ([`RequestSection::cache_prompt`], layout 6). An instant (start =
        /// end): the prefill of the rest runs in the steps that follow (in chunks, then with the
        /// first verification), which carry its time.
        Prefill = 5,
        /// The draft worker's prompt lookup drafted `count` tokens at `position` at once (layout
        /// 3).
        LookupDraft = 6,
        /// Of the `VerifyStep` just before it (same `position`): `count` of its proposed tokens
        /// came from prompt lookup, `accepted` of them were accepted (layout 3). Pushed only when
        /// `count > 0`.
        LookupVerified = 7,
        /// The verify worker prefilled the prompt's positions `position..position + count` while
        /// the draft worker computed `0..position` for it ([`SplitSection`], layout 11).
        SplitPrefill = 8,
    }
}

u32_enum! {
    /// [`DraftBuffer::sources`]: where a draft token came from (layout 3).
    pub enum TokenSource {
        /// The draft model (and every prompt or adopted committed token).
        Model = 0,
        /// Prompt lookup: copied from what followed an earlier occurrence of the context's suffix.
        Lookup = 1,
        /// The n-gram history across requests: what usually followed the context's last tokens
        /// in earlier committed text (layout 5).
        History = 2,
    }
}

/// The two worker processes; indexes [`Region::workers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Role {
    /// The draft worker (small model, proposes tokens).
    Draft = 0,
    /// The verify worker (target model, commits tokens).
    Verify = 1,
}

impl Role {
    /// Both roles, in index order.
    pub const ALL: [Role; 2] = [Role::Draft, Role::Verify];

    /// Index into [`Region::workers`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name (`"draft"`, `"verify"`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Draft => "draft",
            Role::Verify => "verify",
        }
    }
}

/// The three processes; indexes [`Control::bells`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Party {
    /// The coordinator (creates the region, owns the request section).
    Coordinator = 0,
    /// The draft worker.
    Draft = 1,
    /// The verify worker.
    Verify = 2,
}

impl Party {
    /// Index into [`Control::bells`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl From<Role> for Party {
    fn from(r: Role) -> Party {
        match r {
            Role::Draft => Party::Draft,
            Role::Verify => Party::Verify,
        }
    }
}

/// A worker's exit as recorded in [`WorkerStatus::exit_status`].
///
/// Encoding (so that the zeroed region means "not reaped"): `0` = not reaped, `1..=256` = exited
/// with code `value - 1`, `-1..=-127` = killed by signal `-value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// Not reaped (still running, or never started).
    NotReaped,
    /// Exited with this code (0..=255).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// The stored value.
    pub fn encode(self) -> i32 {
        match self {
            ExitStatus::NotReaped => 0,
            ExitStatus::Code(c) => c.clamp(0, 255) + 1,
            ExitStatus::Signal(s) => -s.clamp(1, 127),
        }
    }

    /// Decode a stored value (out-of-range values are clamped into the nearest meaning).
    pub fn decode(v: i32) -> ExitStatus {
        match v {
            0 => ExitStatus::NotReaped,
            v if v > 0 => ExitStatus::Code(v.min(256) - 1),
            v => ExitStatus::Signal(v.max(-127).wrapping_neg()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sections
// ---------------------------------------------------------------------------------------------

/// Identity and validation data. Written once by the coordinator in `Shm::create`, before any
/// worker is started, with `magic` stored **last** with Release; readers load `magic` with Acquire
/// first, so a half-initialised region never validates. Never written afterwards.
#[repr(C, align(64))]
pub struct Header {
    /// [`MAGIC`]. Writer: coordinator (last, Release). Readers: everyone, Acquire, first.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`]. Writer: coordinator (before magic). Readers: workers, `amusd dump`.
    pub version: AtomicU32,
    /// [`TOKEN_CAPACITY`]. Writer: coordinator (before magic). Readers: workers, `amusd dump`.
    pub token_capacity: AtomicU32,
    /// `size_of::<Region>()`. Writer: coordinator (before magic). Readers: workers, `amusd dump`.
    pub region_size: AtomicU64,
    /// The coordinator's euid. Writer: coordinator (before magic). Readers: `amusd dump`.
    pub owner_uid: AtomicU32,
    /// The coordinator's pid. Writer: coordinator (before magic). Readers: workers (to notice
    /// the coordinator's death), `Shm::list`/`gc`.
    pub coordinator_pid: AtomicU32,
    /// Wall-clock creation time, Unix ms. Writer: coordinator (before magic). Readers: dumps.
    pub created_unix_ms: AtomicU64,
    /// The coordinator's start time in clock ticks since boot (`/proc/<pid>/stat` field 22; 0 if
    /// unknown), so `Shm::list` can tell the coordinator from a later process reusing its pid.
    /// Writer: coordinator (before magic). Readers: `Shm::list`/`gc`.
    pub coordinator_start_ticks: AtomicU64,
}

/// Process-wide control words.
#[repr(C, align(64))]
pub struct Control {
    /// 1 = workers must exit. Writer: coordinator, Release, then `request_word` is bumped and
    /// woken and both workers' bells are rung. Readers: workers, Acquire.
    pub shutdown: AtomicU32,
    /// Sequence word (seqlock and futex word) of the request section: odd while the coordinator
    /// rewrites the request section (and the prompt in the verified buffer), even when it is
    /// stable; it changes (by 2) on every submit, finish and shutdown. Writer: coordinator, Release
    /// on the closing (even) store, then `futex_wake`. Readers: workers, Acquire, futex-wait on it
    /// when idle.
    pub request_word: AtomicU32,
    /// Door bells, indexed by [`Party`]: a party that has several things to wait for sleeps on its
    /// own bell. Writers: every publishing method rings (fetch_add 1, Release, then `futex_wake`)
    /// the bell of each reader of what it published, *after* publishing. Reader: the bell's owner,
    /// Acquire, *before* checking its conditions (see [`crate::Region::wait_bell`]).
    pub bells: [AtomicU32; 3],
}

/// The current request. Writer: the coordinator only, inside the `request_word` seqlock (all
/// fields Relaxed, `state` Release, closed by the even `request_word` store with Release). Readers:
/// both workers, with [`crate::Region::read_request`] (seqlock read, retried).
#[repr(C, align(64))]
pub struct RequestSection {
    /// Request id (nonzero; changes per request). Writer: coordinator, Relaxed inside the request
    /// seqlock. Readers: workers, seqlock read.
    pub request_id: AtomicU64,
    /// [`RequestState`]. Writer: coordinator (Running on submit, Done/Failed on finish), Release,
    /// inside the request seqlock after the other fields. Readers: workers, Acquire.
    pub state: AtomicU32,
    /// Prompt length in tokens; the prompt is `verified.tokens[..prompt_len]`. Writer:
    /// coordinator, Relaxed inside the request seqlock. Readers: workers, seqlock read (clamped to
    /// [`TOKEN_CAPACITY`]).
    pub prompt_len: AtomicU32,
    /// Maximum tokens to generate after the prompt. Writer: coordinator, Relaxed inside the
    /// request seqlock. Readers: workers, seqlock read.
    pub max_new_tokens: AtomicU32,
    /// Number of valid entries in `stop_tokens`. Writer: coordinator, Relaxed inside the request
    /// seqlock. Readers: workers, seqlock read (clamped to [`MAX_STOP_TOKENS`]).
    pub n_stop_tokens: AtomicU32,
    /// Token ids that end generation. Writer: coordinator, Relaxed inside the request seqlock.
    /// Readers: workers, seqlock read.
    pub stop_tokens: [AtomicU32; MAX_STOP_TOKENS],
    /// [`FinishReason`]; `None` while running. Writer: coordinator, Relaxed inside the request
    /// seqlock, before `state`. Readers: workers (seqlock read), `amusd dump`.
    pub finish_reason: AtomicU32,
    /// Why the request failed (empty otherwise). Writer: coordinator, inside the request seqlock,
    /// before `state`. Readers: workers (seqlock read), `amusd dump`.
    pub error_text: ShmText<ERROR_TEXT_LEN>,
    /// The sampling noise's seed (layout 2). Writer: coordinator, Relaxed inside the request
    /// seqlock, at submit. Readers: workers, seqlock read, when they take up the request (a worker
    /// started for this request reads this request's values, never another's), `amusd dump`.
    pub sampling_seed: AtomicU64,
    /// The temperature as f32 bits; 0.0 is greedy (layout 2). Writer: coordinator, Relaxed inside
    /// the request seqlock, at submit. Readers: as `sampling_seed`.
    pub temperature_bits: AtomicU32,
    /// top-k, 0 = off (layout 2). Writer: coordinator, Relaxed inside the request seqlock, at
    /// submit. Readers: as `sampling_seed`.
    pub top_k: AtomicU32,
    /// top-p as f32 bits, 1.0 = off (layout 2). Writer: coordinator, Relaxed inside the request
    /// seqlock, at submit. Readers: as `sampling_seed`.
    pub top_p_bits: AtomicU32,
    /// min-p as f32 bits, 0.0 = off (layout 2). Writer: coordinator, Relaxed inside the request
    /// seqlock, at submit. Readers: as `sampling_seed`.
    pub min_p_bits: AtomicU32,
    /// 1: the draft proposes its greedy tokens instead of sampling with the request's noise (the
    /// scheme of llama.cpp, kept for comparison); 0: it samples as the verify model does (layout
    /// 2). Writer: coordinator, Relaxed inside the request seqlock, at submit. Readers: the draft
    /// worker (seqlock read, at take-up), `amusd dump`.
    pub greedy_draft: AtomicU32,
    /// 1: the draft model drafts alone for this request, its prompt lookup left out (bench runs
    /// compare the two on the same workers this way); 0: the lookup runs ahead of the model, if
    /// the draft worker has one (layout 4). Writer: coordinator, Relaxed inside the request
    /// seqlock, at submit. Readers: the draft worker (seqlock read, at take-up), `amusd dump`.
    pub no_draft_lookup: AtomicU32,
    /// 1: each worker keeps the cached positions whose tokens begin this request's prompt (what
    /// its previous request left: a conversation's earlier turns) and prefills only the rest; 0:
    /// each prefills the whole prompt (layout 6). Changes no committed token. Writer:
    /// coordinator, Relaxed inside the request seqlock, at submit. Readers: both workers (seqlock
    /// read, at take-up), `amusd dump`.
    pub cache_prompt: AtomicU32,
    /// The repeat penalty as f32 bits, 1.0 = off (layout 7). Writer: coordinator, Relaxed inside
    /// the request seqlock, at submit. Readers: both workers (seqlock read, at take-up), `amusd
    /// dump`.
    pub repeat_penalty_bits: AtomicU32,
    /// The frequency penalty as f32 bits, 0.0 = off (layout 7). Writer and readers: as
    /// `repeat_penalty_bits`.
    pub frequency_penalty_bits: AtomicU32,
    /// The presence penalty as f32 bits, 0.0 = off (layout 7). Writer and readers: as
    /// `repeat_penalty_bits`.
    pub presence_penalty_bits: AtomicU32,
    /// The penalties' window: the last this many tokens before a position; 0 = off, `u32::MAX` =
    /// the whole sequence (layout 7). Writer and readers: as `repeat_penalty_bits`.
    pub penalty_last_n: AtomicU32,
    /// How many entries of `logit_bias` hold (layout 8). Writer: coordinator, Relaxed inside the
    /// request seqlock, at submit. Readers: both workers (seqlock read, at take-up, clamped to
    /// [`MAX_LOGIT_BIAS`]), `amusd dump`.
    pub n_logit_bias: AtomicU32,
    /// The logit bias: entry `i < n_logit_bias` is a token id (low 32 bits) and the f32 bits of
    /// what its logit gains (high 32 bits), ids ascending (layout 8). Writer and readers: as
    /// `n_logit_bias`.
    pub logit_bias: [AtomicU64; MAX_LOGIT_BIAS],
    /// 0: no log-probabilities; `1 + k`: the verify worker writes each committed token's and its
    /// `k` most likely alternatives' into [`LogprobBuffer`] (layout 8). Writer and readers: as
    /// `n_logit_bias` (readers clamp `k` to [`MAX_TOP_LOGPROBS`]).
    pub logprobs: AtomicU32,
    /// 1: with `logprobs`, the verify worker also scores the prompt's tokens (but the first),
    /// writing their rows into [`LogprobBuffer`] at their positions before its first commit; 0:
    /// not (layout 9). Writer and readers: as `n_logit_bias`.
    pub prompt_logprobs: AtomicU32,
    /// typical-p as f32 bits, 1.0 = off (layout 10). Writer: coordinator, Relaxed inside the
    /// request seqlock, at submit. Readers: as `sampling_seed`.
    pub typical_p_bits: AtomicU32,
    /// XTC's probability as f32 bits, 0.0 = off (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub xtc_probability_bits: AtomicU32,
    /// XTC's threshold as f32 bits (layout 10). Writer and readers: as `typical_p_bits`.
    pub xtc_threshold_bits: AtomicU32,
    /// DRY's multiplier as f32 bits, 0.0 = off (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub dry_multiplier_bits: AtomicU32,
    /// DRY's base as f32 bits (layout 10). Writer and readers: as `typical_p_bits`.
    pub dry_base_bits: AtomicU32,
    /// DRY's allowed run length (layout 10). Writer and readers: as `typical_p_bits`.
    pub dry_allowed_length: AtomicU32,
    /// DRY's window; 0 = off, `u32::MAX` = the whole sequence (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub dry_last_n: AtomicU32,
    /// The dynamic temperature's range as f32 bits, 0.0 = off (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub dynatemp_range_bits: AtomicU32,
    /// The dynamic temperature's exponent as f32 bits (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub dynatemp_exponent_bits: AtomicU32,
    /// top-n-sigma as f32 bits, 0.0 or less = off (layout 10). Writer and readers: as
    /// `typical_p_bits`.
    pub top_n_sigma_bits: AtomicU32,
}

/// The running request's DRY sequence breakers (layout 10): which tokens end a repeated run, as
/// the coordinator found them in its tokenizer (workers hold no tokenizer for this). Part of the
/// request, kept apart as [`GrammarSection`] is.
#[repr(C, align(8))]
pub struct DrySection {
    /// How many words of `breakers` hold (the rest read as 0). Writer: coordinator, Relaxed
    /// inside the request seqlock, at submit. Readers: both workers (seqlock read, at take-up,
    /// clamped to [`MAX_BREAKER_WORDS`]), `amusd dump`.
    pub n_words: AtomicU32,
    /// Bit `t % 64` of word `t / 64` is set for each breaker token `t`. Writer and readers: as
    /// `n_words`.
    pub breakers: [AtomicU64; MAX_BREAKER_WORDS],
}

/// The running request's grammar, if it has one: the generated text must follow it (constrained
/// decoding). Part of the request: kept apart only so that the request section's own offsets stay
/// as they were.
#[repr(C, align(8))]
pub struct GrammarSection {
    /// 0: no grammar; else the grammar's kind (`amusd-spec`'s `GrammarKind` codes: 1 any JSON
    /// object, 2 a JSON schema, 3 a regular expression, 4 a Lark grammar, 5 a GBNF grammar since
    /// layout 10). Writer: coordinator,
    /// Relaxed inside the request seqlock, at submit. Readers: both workers (seqlock read, at
    /// take-up), `amusd dump`.
    pub kind: AtomicU32,
    /// The grammar's text (empty for any JSON object). Writer and readers: as `kind`; the
    /// coordinator refuses a longer one than [`GRAMMAR_TEXT_LEN`] rather than truncate it.
    pub text: ShmText<GRAMMAR_TEXT_LEN>,
}

/// Log-probabilities of the committed tokens, when the request asks for them
/// ([`RequestSection::logprobs`]): `rows[p][0]` is the token at position `p` and its log-probability,
/// `rows[p][1..=k]` the `k` most likely tokens at `p`, most likely first (token `u32::MAX` past
/// the last one, where the vocabulary is smaller than `k`); each entry a token id (low 32 bits)
/// and the f32 bits of its log-probability (high 32 bits). Writer: the verify
/// worker, Relaxed, for the positions it commits, *before* the Release store of
/// [`VerifiedBuffer::verified_len`] that covers them (a replacement worker rewrites no committed
/// position), and with [`RequestSection::prompt_logprobs`] for prompt positions `1..prompt_len`
/// while it prefills, before its first commit (a replacement worker scores the prompt again and
/// writes the same values). Readers: the coordinator, Relaxed, below an Acquire-loaded
/// `verified_len`; the prompt's rows once the request has ended.
#[repr(C, align(64))]
pub struct LogprobBuffer {
    pub rows: [[AtomicU64; 1 + MAX_TOP_LOGPROBS]; TOKEN_CAPACITY],
}

/// The committed sequence: prompt plus verified tokens. Append-only within a request.
#[repr(C, align(64))]
pub struct VerifiedBuffer {
    /// Number of committed tokens, counting the prompt; futex word. Writers: the coordinator (sets
    /// it to `prompt_len` inside the request seqlock, Release, before `state = Running`), then only
    /// the verify worker (after storing the new tokens: Release store, then `futex_wake`). Readers:
    /// draft worker and coordinator, Acquire, then read `tokens` below it (clamped to
    /// [`TOKEN_CAPACITY`]).
    pub verified_len: AtomicU32,
    /// Committed tokens by position; `tokens[..prompt_len]` is the prompt. Writers: as
    /// `verified_len`, always Relaxed *before* the Release store of `verified_len` that covers
    /// them; a slot below `verified_len` is never rewritten within a request. Readers: draft worker
    /// and coordinator, Relaxed, below an Acquire-loaded `verified_len`.
    pub tokens: [AtomicU32; TOKEN_CAPACITY],
}

/// The draft worker's current sequence. Writer: the draft worker only. Reader: the verify worker
/// (and dumps), with [`crate::Region::read_draft`] (seqlock read).
#[repr(C, align(64))]
pub struct DraftBuffer {
    /// The request this draft belongs to. Writer: draft worker, inside a rewrite (Relaxed,
    /// covered by the closing `draft_epoch` Release). Reader: verify worker, in a seqlock read.
    pub draft_request_id: AtomicU64,
    /// Seqlock word: odd while a rewrite (rollback or reset) rewrites slots. Writer: draft worker:
    /// odd store (Relaxed) + `fence(Release)` before a rewrite, even store with Release after it.
    /// Reader: verify worker, Acquire before and (after `fence(Acquire)`) again after a read.
    /// A draft worker killed mid-rewrite leaves it odd: readers then fail with
    /// [`crate::ShmError::Unstable`] instead of spinning forever; the coordinator repairs it when
    /// it reaps the dead worker (`Region::repair_draft_epoch`, emptying the draft while it has no
    /// writer), and so would the restarted draft worker's first rewrite.
    pub draft_epoch: AtomicU32,
    /// Length of the draft sequence (prompt copy plus drafted tokens); futex word for the verify
    /// worker. Writer: draft worker: Release after the slots of an append, then `futex_wake`;
    /// Relaxed inside a rewrite. Reader: verify worker, Acquire (clamped to [`TOKEN_CAPACITY`]).
    pub draft_len: AtomicU32,
    /// The draft sequence by position. Writer: draft worker: appends store slots at and above
    /// `draft_len` (Relaxed) before the Release store of the new `draft_len`; rewrites store any
    /// slot (Relaxed) inside the odd epoch. Reader: verify worker, Relaxed, in a seqlock read.
    pub tokens: [AtomicU32; TOKEN_CAPACITY],
    /// [`TokenSource`] of each slot of `tokens` (layout 3), so the verify worker can count accepted
    /// tokens by source. Writer: draft worker, with the slot in `tokens` and under the same rules
    /// (appends before the Release store of `draft_len`, rewrites inside the odd epoch). Reader:
    /// verify worker, Relaxed, in the same seqlock read as the tokens.
    pub sources: [AtomicU32; TOKEN_CAPACITY],
}

/// One worker's status block. Writer: the worker itself (Relaxed unless said otherwise), except
/// `restarts`, `exit_status` and the `Dead` state, which the coordinator writes after reaping the
/// worker (when no worker process can be writing the block). Readers: the coordinator, `amusd
/// dump`.
#[repr(C, align(64))]
pub struct WorkerStatus {
    /// The worker's pid. Writer: the worker, Relaxed, when it registers, before the Release store
    /// of `state = Starting`. Readers: coordinator (Acquire on `state` first), dumps.
    pub pid: AtomicU32,
    /// [`WorkerState`]. Writers: the worker (Starting, Loading, Ready, Busy), Release, then rings
    /// the coordinator's bell; the coordinator (Dead), Release, after reaping. Reader: the
    /// coordinator, Acquire.
    pub state: AtomicU32,
    /// Last sign of life, CLOCK_MONOTONIC milliseconds (system-wide, so comparable across
    /// processes). Writer: the worker, Relaxed, at least once per step. Reader: the coordinator.
    pub heartbeat_ms: AtomicU64,
    /// Times the coordinator restarted this worker. Writer: coordinator, Relaxed, before spawning
    /// the replacement (process creation orders it). Readers: dumps, the worker.
    pub restarts: AtomicU32,
    /// [`ExitStatus`] encoded. Writer: coordinator, Relaxed, after reaping, before the Release
    /// store of `state = Dead`. Readers: dumps, coordinator.
    pub exit_status: AtomicI32,
    /// The request the worker is working on, 0 when none. Writer: the worker, Release, when it
    /// takes up a request and when it lets go of it (then rings the coordinator's bell). Reader:
    /// the coordinator, Acquire: it must not submit the next request while the verify worker still
    /// holds the previous one (the verify worker is the verified buffer's writer while running).
    pub request_id: AtomicU64,
    /// Model steps run. Writer: the worker, Relaxed `fetch_add`. Readers: coordinator, dumps
    /// (counters are statistics: no ordering with anything else).
    pub steps: AtomicU64,
    /// Tokens produced: drafted (draft worker) or committed (verify worker). Writer: the worker,
    /// Relaxed `fetch_add`. Readers: coordinator, dumps.
    pub tokens: AtomicU64,
    /// Draft rollbacks performed. Writer: the draft worker, Relaxed `fetch_add`. Readers:
    /// coordinator, dumps.
    pub rollbacks: AtomicU64,
    /// Draft tokens proposed to verification. Writer: the verify worker, Relaxed `fetch_add`.
    /// Readers: coordinator, dumps.
    pub proposed: AtomicU64,
    /// Draft tokens accepted by verification. Writer: the verify worker, Relaxed `fetch_add`.
    /// Readers: coordinator, dumps.
    pub accepted: AtomicU64,
    /// The device the worker runs on (e.g. `cuda:0`). Writer: the worker, at registration
    /// (bytes, then length with Release; see [`ShmText`]). Readers: coordinator, dumps.
    pub device: ShmText<DEVICE_TEXT_LEN>,
    /// The model the worker serves. Writer: the worker, at registration ([`ShmText`] ordering).
    /// Readers: coordinator, dumps.
    pub model: ShmText<MODEL_TEXT_LEN>,
    /// The worker's last error. Writer: the worker ([`ShmText`] ordering), before it sets a state
    /// or exits because of the error. Readers: coordinator (copies it into the request's
    /// `error_text`), dumps.
    pub last_error: ShmText<ERROR_TEXT_LEN>,
}

/// One metric event (a ring slot). Writer: the ring's single writer (draft worker for
/// `draft_events`, verify worker for `verify_events`), every field Relaxed, between a
/// `fence(Release)` and the Release store of the ring's `head` that publishes the slot. Readers:
/// coordinator and dumps, Relaxed, between an Acquire load of `head` and a `fence(Acquire)` +
/// reload of `head` that tells them whether the slot was overwritten meanwhile.
#[repr(C)]
pub struct Event {
    /// The event's index in the ring's history (`head` before it was pushed), so a reader can
    /// double-check a slot. Writer: ring writer, Relaxed. Readers: coordinator, dumps.
    pub seq: AtomicU64,
    /// Start time, CLOCK_MONOTONIC µs. Writer: ring writer, Relaxed. Readers: coordinator, dumps.
    pub t_start_us: AtomicU64,
    /// End time, CLOCK_MONOTONIC µs. Writer: ring writer, Relaxed. Readers: coordinator, dumps.
    pub t_end_us: AtomicU64,
    /// The request it belongs to. Writer: ring writer, Relaxed. Readers: coordinator, dumps.
    pub request_id: AtomicU64,
    /// [`EventKind`] (0 = never written). Writer: ring writer, Relaxed. Readers: coordinator,
    /// dumps.
    pub kind: AtomicU32,
    /// Sequence position the event starts at. Writer: ring writer, Relaxed. Readers: coordinator,
    /// dumps.
    pub position: AtomicU32,
    /// Tokens drafted / rolled back / proposed / committed / prefilled. Writer: ring writer,
    /// Relaxed. Readers: coordinator, dumps.
    pub count: AtomicU32,
    /// Tokens accepted (VerifyStep). Writer: ring writer, Relaxed. Readers: coordinator, dumps.
    pub accepted: AtomicU32,
}

/// A single-writer ring of metric events. Writer: one worker (the draft worker for
/// `draft_events`, the verify worker for `verify_events`). Readers: the coordinator, dumps, with
/// [`EventRing::recent_events`]/[`EventRing::events_since`], which drop any slot that may have
/// been overwritten while they read it. The last `EVENT_CAPACITY - 1` events are readable.
#[repr(C, align(64))]
pub struct EventRing {
    /// Events ever pushed; event `i` lives in `events[i % EVENT_CAPACITY]`. Writer: the ring's
    /// worker, Release, after the slot. Readers: Acquire before reading slots, and again (after a
    /// `fence(Acquire)`) to discard overwritten slots.
    pub head: AtomicU64,
    /// The slots. Writer: the ring's worker (see [`Event`]). Readers: coordinator, dumps.
    pub events: [Event; EVENT_CAPACITY],
}

/// A prompt's prefill split between the workers (layout 11; the ring of slots, layout 12): the
/// draft worker computes the verify model's keys and values for positions `0..split` (with the
/// verify model's arithmetic), block by block, while the verify worker computes `split..end` and
/// takes each block's first positions in just before that block attends; then the verify worker
/// publishes its positions block by block and the draft worker adopts all of them instead of
/// prefilling the prompt itself. The positions live in [`KvExchange`], in `slots` slots of one
/// block each, block `l` in slot `s = l % slots`: its keys of position `p` at word
/// `(2 * s * end + p) * kv_dim`, its values at `((2 * s + 1) * end + p) * kv_dim`, f32 bits.
/// Where `slots < layers` a slot is reused: a worker writes block `l` only once the other has
/// copied block `l - slots` out (`taken_in`, `adopted`).
///
/// A job is one value of `job`, and every change of it is a compare-and-swap on the whole word,
/// so a worker acting on a job another has dropped, or on an older job, changes nothing.
#[repr(C, align(64))]
pub struct SplitSection {
    /// What the draft worker can compute: a fingerprint of the verify model it holds (the model
    /// file's identity, its arithmetic and this build), 0 for nothing. Writer: the draft
    /// worker, Release, once loaded; the coordinator stores 0 when it reaps the draft worker.
    /// Reader: the verify worker, Acquire, before posting a job.
    pub helper: AtomicU64,
    /// `seq << 32 | state << 16 | blocks`: the job number (the verify worker's count of jobs),
    /// its [`SplitState`], and the blocks published: while `Taken`, the blocks whose positions
    /// `0..split` the draft worker wrote; while `Handed`, those whose `split..end` the verify
    /// worker wrote. Writers, by compare-and-swap only: the verify worker posts a job (any state
    /// to `(seq + 1, Offered, 0)`, Release, after the job's fields below), hands it over (`Taken`
    /// to `(Handed, 0)`), counts each block it hands (Release, after the block's positions) or
    /// drops it; the draft worker takes it, counts each block (Release, after the block's
    /// positions) or drops it. Readers: both workers, Acquire, before reading the exchange.
    pub job: AtomicU64,
    /// The request the job belongs to. Writer: the verify worker, Relaxed, before posting the
    /// job. Reader: the draft worker, after an Acquire load of `job` showing the job.
    pub request_id: AtomicU64,
    /// The fingerprint of the verify worker's model: the draft worker takes the job only if it
    /// equals its `helper`. Writer, reader: as `request_id`.
    pub fingerprint: AtomicU64,
    /// Positions the draft worker computes, from 0. Writer, reader: as `request_id`.
    pub split: AtomicU32,
    /// Positions both compute together (`split..end` by the verify worker): all of the prompt
    /// but its last token, which each worker runs with its first step. Writer, reader: as
    /// `request_id`.
    pub end: AtomicU32,
    /// Blocks of the model. Writer, reader: as `request_id`.
    pub layers: AtomicU32,
    /// Key (and value) values of a position in one block. Writer, reader: as `request_id`.
    pub kv_dim: AtomicU32,
    /// The fingerprint of the verify worker's model when it can split (0: it cannot): it then
    /// posts a job for every request it takes up, `Dropped` where it will not split, so the
    /// draft worker knows what to wait for. Writer: the verify worker, Release, once loaded; the
    /// coordinator stores 0 when it reaps the verify worker. Reader: the draft worker, Acquire.
    pub verifier: AtomicU64,
    /// Blocks the exchange holds at once, `1..=layers`. Writer, reader: as `request_id`.
    pub slots: AtomicU32,
    /// `seq << 32 | blocks`: the blocks of job `seq` whose positions `0..split` the verify worker
    /// has copied out of the exchange. Writer: the verify worker, Release, after copying.
    /// Reader: the draft worker, Acquire, before it writes a block into a reused slot.
    pub taken_in: AtomicU64,
    /// `seq << 32 | blocks`: the blocks of job `seq` that the draft worker has adopted (copied
    /// out of the exchange). Writer: the draft worker, Release, after copying. Reader: the
    /// verify worker, Acquire, before it writes a block into a reused slot.
    pub adopted: AtomicU64,
}

/// The keys and values a split prefill hands over ([`SplitSection`]). Writers: the draft worker
/// (positions `0..split`, block by block, Relaxed, before the Release compare-and-swap of `job`
/// that counts the block), the verify worker (positions `split..end`, block by block, Relaxed,
/// before the Release compare-and-swap that counts the handed block). Readers: the other worker,
/// Relaxed, after an Acquire load of `job` that shows the block counted. A writer reuses a slot
/// only after an Acquire load of the reader's count (`taken_in`, `adopted`) shows its block
/// copied out. Neither writes positions of a job after dropping it, and the verify worker posts
/// no job while the draft worker could still read one: it writes only for a job the draft
/// worker took and has finished.
#[repr(C, align(4096))]
pub struct KvExchange {
    pub words: [AtomicU32; KV_EXCHANGE_BYTES / 4],
}

/// The whole shared-memory region. See the crate docs for the protocol, and each field for who
/// writes it.
#[repr(C)]
pub struct Region {
    /// Identity and validation; written once by the coordinator at creation.
    pub header: Header,
    /// Shutdown flag, the request sequence word and the door bells.
    pub control: Control,
    /// The current request; written by the coordinator.
    pub request: RequestSection,
    /// Prompt plus committed tokens; written by the coordinator (prompt) and the verify worker.
    pub verified: VerifiedBuffer,
    /// The draft worker's sequence; written by the draft worker.
    pub draft: DraftBuffer,
    /// Worker status blocks, indexed by [`Role`]; written by each worker (and the coordinator
    /// after reaping one).
    pub workers: [WorkerStatus; 2],
    /// Metric events of the draft worker.
    pub draft_events: EventRing,
    /// Metric events of the verify worker.
    pub verify_events: EventRing,
    /// Log-probabilities of the committed tokens; written by the verify worker (layout 8).
    pub logprobs: LogprobBuffer,
    /// The request's grammar, part of the request section (layout 9).
    pub grammar: GrammarSection,
    /// The request's DRY sequence breakers, part of the request section (layout 10).
    pub dry: DrySection,
    /// A prompt's prefill split between the workers (layout 11).
    pub split: SplitSection,
    /// The keys and values a split prefill hands over; last, and reserved only as used.
    pub kv: KvExchange,
}

// ---------------------------------------------------------------------------------------------
// Compile-time checks of what the code relies on
// ---------------------------------------------------------------------------------------------

// The atomics have the size/alignment of their plain integers (so the validator can read a header
// from plain bytes at `offset_of!` positions).
const _: () = assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
const _: () = assert!(size_of::<AtomicU32>() == 4 && align_of::<AtomicU32>() == 4);
// The header is one cache line and its fields are where `validate_header` reads them.
const _: () = assert!(size_of::<Header>() == 64);
const _: () = assert!(offset_of!(Header, magic) == 0);
const _: () = assert!(offset_of!(Header, version) == 8);
const _: () = assert!(offset_of!(Header, token_capacity) == 12);
const _: () = assert!(offset_of!(Header, region_size) == 16);
const _: () = assert!(offset_of!(Header, owner_uid) == 24);
const _: () = assert!(offset_of!(Header, coordinator_pid) == 28);
const _: () = assert!(offset_of!(Header, created_unix_ms) == 32);
const _: () = assert!(offset_of!(Header, coordinator_start_ticks) == 40);
const _: () = assert!(offset_of!(Region, header) == 0);
// Token counts and positions are stored in u32s.
const _: () = assert!(TOKEN_CAPACITY <= u32::MAX as usize / 2);
// The region fits in a page-aligned mapping (mmap gives page alignment), and what creation
// reserves is modest.
const _: () = assert!(align_of::<Region>() <= 4096);
const _: () = assert!(FIXED_REGION_BYTES <= 4 << 20);
const _: () = assert!(size_of::<Region>() == FIXED_REGION_BYTES + KV_EXCHANGE_BYTES);
// The hot futex words are in separate sections, each starting on its own cache line.
const _: () = assert!(offset_of!(Region, verified) % 64 == 0);
const _: () = assert!(offset_of!(Region, draft) % 64 == 0);
const _: () = assert!(offset_of!(Region, control) % 64 == 0);
// The ring index arithmetic uses a power of two.
const _: () = assert!(EVENT_CAPACITY.is_power_of_two());

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the layout. If this fails you changed the layout: bump LAYOUT_VERSION and update the
    /// numbers here.
    #[test]
    fn layout_is_pinned() {
        assert_eq!(LAYOUT_VERSION, 12);
        assert_eq!(MAGIC.to_le_bytes(), *b"AMUSDSHM");
        assert_eq!(MAGIC, 0x4d48_5344_5355_4d41);
        assert_eq!(size_of::<Region>(), 2_035_712 + KV_EXCHANGE_BYTES);
        assert_eq!(FIXED_REGION_BYTES, 2_035_712);
        assert_eq!(align_of::<Region>(), 4096);
        assert_eq!(HEADER_LEN, 64);

        assert_eq!(offset_of!(Region, control), 64);
        assert_eq!(offset_of!(Region, request), 128);
        assert_eq!(offset_of!(Region, verified), 2_624);
        assert_eq!(offset_of!(Region, draft), 35_456);
        assert_eq!(offset_of!(Region, workers), 101_056);
        assert_eq!(offset_of!(Region, draft_events), 102_080);
        assert_eq!(offset_of!(Region, verify_events), 298_752);
        assert_eq!(offset_of!(Region, logprobs), 495_424);
        assert_eq!(offset_of!(Region, grammar), 1_871_680);
        assert_eq!(offset_of!(GrammarSection, kind), 0);
        assert_eq!(offset_of!(GrammarSection, text), 8);
        assert_eq!(size_of::<GrammarSection>(), 8 + 8 + GRAMMAR_TEXT_LEN);
        assert_eq!(
            offset_of!(Region, dry),
            1_871_680 + 8 + 8 + GRAMMAR_TEXT_LEN
        );
        assert_eq!(offset_of!(DrySection, breakers), 8);
        assert_eq!(size_of::<DrySection>(), 8 + 8 * MAX_BREAKER_WORDS);
        assert_eq!(offset_of!(Region, split), 2_035_584);
        assert_eq!(offset_of!(Region, kv), 2_035_712);
        assert_eq!(offset_of!(SplitSection, helper), 0);
        assert_eq!(offset_of!(SplitSection, job), 8);
        assert_eq!(offset_of!(SplitSection, request_id), 16);
        assert_eq!(offset_of!(SplitSection, fingerprint), 24);
        assert_eq!(offset_of!(SplitSection, split), 32);
        assert_eq!(offset_of!(SplitSection, end), 36);
        assert_eq!(offset_of!(SplitSection, layers), 40);
        assert_eq!(offset_of!(SplitSection, kv_dim), 44);
        assert_eq!(offset_of!(SplitSection, verifier), 48);
        assert_eq!(offset_of!(SplitSection, slots), 56);
        assert_eq!(offset_of!(SplitSection, taken_in), 64);
        assert_eq!(offset_of!(SplitSection, adopted), 72);
        assert_eq!(size_of::<SplitSection>(), 128);

        assert_eq!(offset_of!(Control, shutdown), 0);
        assert_eq!(offset_of!(Control, request_word), 4);
        assert_eq!(offset_of!(Control, bells), 8);

        assert_eq!(offset_of!(RequestSection, request_id), 0);
        assert_eq!(offset_of!(RequestSection, state), 8);
        assert_eq!(offset_of!(RequestSection, prompt_len), 12);
        assert_eq!(offset_of!(RequestSection, max_new_tokens), 16);
        assert_eq!(offset_of!(RequestSection, n_stop_tokens), 20);
        assert_eq!(offset_of!(RequestSection, stop_tokens), 24);
        assert_eq!(offset_of!(RequestSection, finish_reason), 56);
        assert_eq!(offset_of!(RequestSection, error_text), 64);
        assert_eq!(offset_of!(RequestSection, sampling_seed), 328);
        assert_eq!(offset_of!(RequestSection, temperature_bits), 336);
        assert_eq!(offset_of!(RequestSection, top_k), 340);
        assert_eq!(offset_of!(RequestSection, top_p_bits), 344);
        assert_eq!(offset_of!(RequestSection, min_p_bits), 348);
        assert_eq!(offset_of!(RequestSection, greedy_draft), 352);
        assert_eq!(offset_of!(RequestSection, no_draft_lookup), 356);
        assert_eq!(offset_of!(RequestSection, cache_prompt), 360);
        assert_eq!(offset_of!(RequestSection, repeat_penalty_bits), 364);
        assert_eq!(offset_of!(RequestSection, frequency_penalty_bits), 368);
        assert_eq!(offset_of!(RequestSection, presence_penalty_bits), 372);
        assert_eq!(offset_of!(RequestSection, penalty_last_n), 376);
        assert_eq!(offset_of!(RequestSection, n_logit_bias), 380);
        assert_eq!(offset_of!(RequestSection, logit_bias), 384);
        assert_eq!(offset_of!(RequestSection, logprobs), 2432);
        assert_eq!(offset_of!(RequestSection, prompt_logprobs), 2436);
        assert_eq!(offset_of!(RequestSection, typical_p_bits), 2440);
        assert_eq!(offset_of!(RequestSection, xtc_probability_bits), 2444);
        assert_eq!(offset_of!(RequestSection, xtc_threshold_bits), 2448);
        assert_eq!(offset_of!(RequestSection, dry_multiplier_bits), 2452);
        assert_eq!(offset_of!(RequestSection, dry_base_bits), 2456);
        assert_eq!(offset_of!(RequestSection, dry_allowed_length), 2460);
        assert_eq!(offset_of!(RequestSection, dry_last_n), 2464);
        assert_eq!(offset_of!(RequestSection, dynatemp_range_bits), 2468);
        assert_eq!(offset_of!(RequestSection, dynatemp_exponent_bits), 2472);
        assert_eq!(offset_of!(RequestSection, top_n_sigma_bits), 2476);
        assert_eq!(size_of::<RequestSection>(), 2496);
        assert_eq!(size_of::<LogprobBuffer>(), TOKEN_CAPACITY * 21 * 8);

        assert_eq!(offset_of!(VerifiedBuffer, verified_len), 0);
        assert_eq!(offset_of!(VerifiedBuffer, tokens), 4);

        assert_eq!(offset_of!(DraftBuffer, draft_request_id), 0);
        assert_eq!(offset_of!(DraftBuffer, draft_epoch), 8);
        assert_eq!(offset_of!(DraftBuffer, draft_len), 12);
        assert_eq!(offset_of!(DraftBuffer, tokens), 16);
        assert_eq!(offset_of!(DraftBuffer, sources), 32_784);

        assert_eq!(size_of::<WorkerStatus>(), 512);
        assert_eq!(offset_of!(WorkerStatus, pid), 0);
        assert_eq!(offset_of!(WorkerStatus, state), 4);
        assert_eq!(offset_of!(WorkerStatus, heartbeat_ms), 8);
        assert_eq!(offset_of!(WorkerStatus, restarts), 16);
        assert_eq!(offset_of!(WorkerStatus, exit_status), 20);
        assert_eq!(offset_of!(WorkerStatus, request_id), 24);
        assert_eq!(offset_of!(WorkerStatus, steps), 32);
        assert_eq!(offset_of!(WorkerStatus, accepted), 64);
        assert_eq!(offset_of!(WorkerStatus, device), 72);
        assert_eq!(offset_of!(WorkerStatus, model), 112);
        assert_eq!(offset_of!(WorkerStatus, last_error), 216);

        assert_eq!(size_of::<Event>(), 48);
        assert_eq!(offset_of!(EventRing, head), 0);
        assert_eq!(offset_of!(EventRing, events), 8);

        assert_eq!(size_of::<ShmText<32>>(), 40);
        assert_eq!(size_of::<ShmText<96>>(), 104);
        assert_eq!(size_of::<ShmText<256>>(), 264);
    }

    #[test]
    fn enums_roundtrip() {
        for v in 0..10 {
            if let Some(s) = RequestState::from_u32(v) {
                assert_eq!(s.as_u32(), v);
            }
            if let Some(s) = WorkerState::from_u32(v) {
                assert_eq!(s.as_u32(), v);
            }
            if let Some(s) = FinishReason::from_u32(v) {
                assert_eq!(s.as_u32(), v);
            }
            if let Some(s) = EventKind::from_u32(v) {
                assert_eq!(s.as_u32(), v);
            }
        }
        assert_eq!(RequestState::from_u32(4), None);
        assert_eq!(WorkerState::from_u32(6), None);
        assert_eq!(EventKind::from_u32(0), None);
    }

    #[test]
    fn exit_status_encoding() {
        for e in [
            ExitStatus::NotReaped,
            ExitStatus::Code(0),
            ExitStatus::Code(1),
            ExitStatus::Code(255),
            ExitStatus::Signal(9),
            ExitStatus::Signal(15),
        ] {
            assert_eq!(ExitStatus::decode(e.encode()), e);
        }
        assert_eq!(ExitStatus::decode(0), ExitStatus::NotReaped);
        assert_eq!(ExitStatus::decode(i32::MAX), ExitStatus::Code(255));
        assert_eq!(ExitStatus::decode(i32::MIN), ExitStatus::Signal(127));
    }
}
