//! The AMUSD shared-memory region: its layout, its creation and validation, lock-free publication
//! between the three amusd processes, and futex waits.
//!
//! AMUSD runs speculative decoding asynchronously: a **coordinator** process creates one CPU
//! shared-memory region ([`Shm::create`]) and starts a **draft worker** and a **verify worker**,
//! each pinned to its own device, which attach to it ([`Shm::attach`]). The coordinator publishes
//! a request (prompt in the verified buffer); the draft worker keeps drafting ahead into the draft
//! buffer, rolling back when verification disagrees; the verify worker reads draft snapshots,
//! verifies them with the target model and appends the committed tokens to the verified buffer.
//! This crate owns the bytes they share and the primitives to publish and read them correctly; the
//! decisions (what to draft, accept, roll back, restart) live in `amusd-spec` and the binaries.
//!
//! # Why not `shared_memory` + `raw_sync`
//!
//! The `shared_memory` (last release 2022) and `raw_sync` (2020) crates are unmaintained, and
//! `raw_sync`'s mutexes are plain process-shared pthread mutexes, not robust ones: a worker
//! SIGKILLed (by the OOM killer, a CUDA fault, the coordinator's own restart logic) while holding
//! one leaves it locked forever and deadlocks the other side. Workers here are *expected* to die at
//! arbitrary points and be restarted. So this crate uses:
//!
//! * `nix` `shm_open` + `ftruncate` + `mmap(MAP_SHARED)` directly;
//! * a `#[repr(C)]` layout made only of atomics ([`Region`]), so every access from every process is
//!   defined behaviour, even racing or torn;
//! * lock-free, single-writer publication with explicit orderings: a writer stores data, then a
//!   length or sequence word with Release; a reader loads that word with Acquire, then the data.
//!   Sections that are rewritten in place (the draft buffer on rollback, the request section) are
//!   seqlocks whose readers retry a bounded number of times and then report
//!   [`ShmError::Unstable`] instead of spinning forever; a writer's next complete update repairs a
//!   sequence word left odd by its killed predecessor;
//! * futex wait/wake (without `FUTEX_PRIVATE_FLAG`, the words are shared between processes) for
//!   sleeping, after a brief spin (see [`futex`] for why).
//!
//! There is no lock anywhere, so nothing can be left locked by a process killed at any instruction.
//!
//! # The protocol in brief
//!
//! * Each field has exactly one writer at a time; its doc comment (in [`layout`]) names the writer,
//!   the readers and the orderings.
//! * Coordinator: [`Region::submit_request`] / [`Region::finish_request`] (seqlock on
//!   `control.request_word`, which is also the workers' futex word while idle),
//!   [`Region::request_shutdown`]. Before submitting the next request it waits until the verify
//!   worker has let go of the previous one ([`Region::worker_request`]).
//! * Verify worker: [`Region::read_draft`] (seqlock snapshot), [`Region::publish_verified`]
//!   (append-only; Release store of `verified_len`, then wake).
//! * Draft worker: [`Region::read_verified`], [`Region::draft_append`] (Release store of
//!   `draft_len`) and [`Region::draft_rewrite`] (seqlock on `draft_epoch`).
//! * Workers report in their [`WorkerStatus`] block and push [`EventRecord`]s into their
//!   [`EventRing`]; the coordinator reads both.
//! * Every publishing method wakes the futex word it changed and rings the *bell* of every reader
//!   ([`Region::ring`]); a party waiting for several things at once sleeps on its own bell
//!   ([`Region::wait_bell`]), loading it before checking its conditions, so no wakeup is lost.
//! * Every length or index read from the region is clamped or checked before use: a corrupt region
//!   yields wrong values or errors, never out-of-bounds accesses.
//!
//! Linux only (futexes, `/dev/shm`, `/proc`).

#[cfg(not(target_os = "linux"))]
compile_error!("amusd-shm uses Linux futexes and /dev/shm");

mod error;
pub mod futex;
pub mod layout;
mod region;
mod shm;
mod split;
mod text;

pub use error::ShmError;
pub use futex::{
    futex_wait, futex_wake, now_ms, now_ns, now_us, unix_ms, wait_for_change, wait_for_change_with,
    wait_until, wait_until_with, Spin, WaitResult,
};
pub use layout::{
    Control, DraftBuffer, DrySection, Event, EventKind, EventRing, ExitStatus, FinishReason,
    GrammarSection, Header, KvExchange, Party, Region, RequestSection, RequestState, Role,
    SplitSection, SplitState, TokenSource, VerifiedBuffer, WorkerState, WorkerStatus,
    DEVICE_TEXT_LEN, ERROR_TEXT_LEN, EVENT_CAPACITY, FIXED_REGION_BYTES, GRAMMAR_TEXT_LEN,
    HEADER_LEN, KV_EXCHANGE_BYTES, LAYOUT_VERSION, MAGIC, MAX_BREAKER_WORDS, MAX_LOGIT_BIAS,
    MAX_STOP_TOKENS, MAX_TOP_LOGPROBS, MODEL_TEXT_LEN, REGION_SIZE, TOKEN_CAPACITY,
};
pub use region::{
    DraftSnapshot, EventBatch, EventRecord, RequestSnapshot, RequestSpec, SamplingFields,
    VerifiedSnapshot, WorkerSnapshot, READABLE_EVENTS, SEQLOCK_READ_BUDGET,
};
pub use shm::{
    escape_name, parse_header, validate_header, HeaderInfo, RegionInfo, Shm, UnlinkOnDrop,
    NAME_PREFIX,
};
pub use split::{JobWord, SplitJob};
pub use text::ShmText;
