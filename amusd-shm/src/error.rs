//! [`ShmError`]: every way creating, attaching to or using the region can fail.
//!
//! Each message is one line that says what is wrong and what to do about it, because these errors
//! end up in worker logs and in `amusd dump` output read by someone who did not write this crate.

use nix::errno::Errno;

/// An error from the shared-memory region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// The name is not a valid POSIX shared-memory name.
    #[error(
        "invalid shared-memory name {name:?}: {reason}; names look like `/amusd-<pid>-<hex>` \
         (`amusd dump` lists them)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// `create` found a region of that name already there.
    #[error(
        "shared-memory region {name} already exists: another amusd is using that name or a \
         crashed one left it behind; list regions with `amusd dump`, remove stale ones with \
         `amusd dump --gc`"
    )]
    AlreadyExists {
        /// The name that exists.
        name: String,
    },

    /// `attach` found no region of that name.
    #[error(
        "no shared-memory region {name}: the amusd coordinator that made it has exited (and \
         removed it) or the name is wrong; `amusd dump` lists the regions there are"
    )]
    NotFound {
        /// The name looked up.
        name: String,
    },

    /// The OS refused to open the region.
    #[error(
        "permission denied opening shared-memory region {name}: run the worker as the same user \
         as the coordinator that created it"
    )]
    PermissionDenied {
        /// The region's name.
        name: String,
    },

    /// The region belongs to another user.
    #[error(
        "shared-memory region {name} is owned by uid {owner_uid} but this process runs as euid \
         {euid}: refusing to share memory with another user; run the worker as uid {owner_uid}"
    )]
    WrongOwner {
        /// The region's name.
        name: String,
        /// The region file's owner.
        owner_uid: u32,
        /// This process's effective uid.
        euid: u32,
    },

    /// The region file is smaller than this build's layout.
    #[error(
        "shared-memory region {name} is {size} bytes, smaller than the {expected} bytes of this \
         amusd's layout: it is truncated, still being created, or from another amusd build; \
         remove it with `amusd dump --gc` if its coordinator is gone"
    )]
    Truncated {
        /// The region's name.
        name: String,
        /// Its size in bytes.
        size: u64,
        /// `size_of::<Region>()`.
        expected: u64,
    },

    /// The region file is larger than this build's layout.
    #[error(
        "shared-memory region {name} is {size} bytes but this amusd's layout is {expected} bytes: \
         it was made by another amusd build; use matching coordinator and worker binaries, or \
         remove it with `amusd dump --gc`"
    )]
    SizeMismatch {
        /// The region's name.
        name: String,
        /// Its size in bytes.
        size: u64,
        /// `size_of::<Region>()`.
        expected: u64,
    },

    /// Fewer bytes than a header were given to the validator.
    #[error(
        "region {name}: only {len} header bytes, an amusd header is {expected}: the region is \
         truncated or was not written by amusd"
    )]
    HeaderTooShort {
        /// The region's name (or `(buffer)`).
        name: String,
        /// Bytes given.
        len: usize,
        /// `HEADER_LEN`.
        expected: usize,
    },

    /// The magic number is wrong.
    #[error(
        "region {name} does not start with the amusd magic (found {found:#018x}, want \
         {expected:#018x}): it is not an amusd region, or its coordinator died before finishing \
         creating it; remove it with `amusd dump --gc`",
        expected = crate::MAGIC
    )]
    BadMagic {
        /// The region's name (or `(buffer)`).
        name: String,
        /// The magic found.
        found: u64,
    },

    /// The layout version differs.
    #[error(
        "region {name} has layout version {found}, this amusd speaks {expected}: it was made by \
         another amusd build; use matching binaries, or remove it with `amusd dump --gc`"
    )]
    WrongVersion {
        /// The region's name (or `(buffer)`).
        name: String,
        /// The version found.
        found: u32,
        /// [`crate::LAYOUT_VERSION`].
        expected: u32,
    },

    /// The header's `region_size` differs from this build's layout.
    #[error(
        "region {name} says it is {found} bytes, this amusd's layout is {expected} bytes: it was \
         made by another amusd build (same version number, different layout); rebuild both \
         sides from one tree, or remove it with `amusd dump --gc`"
    )]
    WrongRegionSize {
        /// The region's name (or `(buffer)`).
        name: String,
        /// The size the header claims.
        found: u64,
        /// `size_of::<Region>()`.
        expected: u64,
    },

    /// The header's `token_capacity` differs from this build's.
    #[error(
        "region {name} holds {found} tokens per buffer, this amusd is built for {expected}: it \
         was made by another amusd build; use matching binaries, or remove it with \
         `amusd dump --gc`"
    )]
    WrongTokenCapacity {
        /// The region's name (or `(buffer)`).
        name: String,
        /// The capacity found.
        found: u32,
        /// [`crate::TOKEN_CAPACITY`].
        expected: u32,
    },

    /// A system call failed. (The OS error is in the message, so not also a `source()`, which
    /// would print it twice in a chain.)
    #[error("{op} failed for shared-memory region {name}: {error}")]
    Os {
        /// The failing operation (`shm_open`, `mmap`, ...).
        op: &'static str,
        /// The region's name.
        name: String,
        /// The OS error.
        error: Errno,
    },

    /// A write would not fit a fixed-capacity buffer.
    #[error(
        "{what} needs {needed} slots but the region holds {capacity}: shorten the prompt or lower \
         max_new_tokens (TOKEN_CAPACITY is fixed at build time)"
    )]
    CapacityExceeded {
        /// Which buffer.
        what: &'static str,
        /// Slots needed.
        needed: usize,
        /// Slots available.
        capacity: usize,
    },

    /// More stop tokens than the request section holds.
    #[error("{given} stop tokens given, the request section holds at most {max}")]
    TooManyStopTokens {
        /// Stop tokens given.
        given: usize,
        /// [`crate::MAX_STOP_TOKENS`].
        max: usize,
    },

    /// More logit-bias entries than the request section holds.
    #[error("a logit bias of {given} tokens given, the request section holds at most {max}")]
    TooManyLogitBias {
        /// Entries given.
        given: usize,
        /// [`crate::MAX_LOGIT_BIAS`].
        max: usize,
    },
    /// A DRY breaker set for a vocabulary larger than the region holds.
    #[error("DRY's sequence breakers need {given} words, the region holds at most {max}")]
    TooManyBreakerWords {
        /// Words given.
        given: usize,
        /// [`crate::MAX_BREAKER_WORDS`].
        max: usize,
    },

    /// A grammar longer than the region holds.
    #[error("a grammar of {given} bytes given, the region holds at most {max}")]
    GrammarTooLong {
        /// Bytes given.
        given: usize,
        /// [`crate::GRAMMAR_TEXT_LEN`].
        max: usize,
    },

    /// Request id 0 is reserved for "no request".
    #[error("request id 0 is reserved for \"no request\"; use ids from 1")]
    InvalidRequestId,

    /// `submit_request` while a request is running.
    #[error(
        "request {request_id} is still running: finish it (finish_request) and wait for both \
         workers to let go of it before submitting another"
    )]
    RequestRunning {
        /// The running request.
        request_id: u64,
    },

    /// An operation named a request that is not the current one, or not running.
    #[error(
        "request {given} is not the running request (current request {current}, state {state})"
    )]
    NotCurrentRequest {
        /// The request named by the caller.
        given: u64,
        /// The region's current request.
        current: u64,
        /// The region's request state (raw value).
        state: u32,
    },

    /// `publish_verified` not appending at the end.
    #[error(
        "verified tokens are append-only: publish at position {expected} (the current \
         verified_len), not {got}"
    )]
    VerifiedOutOfOrder {
        /// The current `verified_len`.
        expected: usize,
        /// The position given.
        got: usize,
    },

    /// `draft_rewrite` starting past the end of the draft.
    #[error("a draft rewrite may start at most at draft_len {len}, not at {from}")]
    DraftRewriteBeyondEnd {
        /// The position given.
        from: usize,
        /// The current `draft_len`.
        len: usize,
    },

    /// The draft buffer was left mid-rewrite.
    #[error(
        "the draft buffer was left mid-rewrite (epoch {epoch} is odd), probably by a draft worker \
         killed during a rollback: begin with draft_rewrite, which repairs it"
    )]
    DraftMidRewrite {
        /// The odd epoch found.
        epoch: u32,
    },

    /// A seqlock read never found a stable snapshot.
    #[error(
        "could not read a consistent {what} after {waited_us} µs (sequence word {word}): its \
         writer is stuck mid-update or was killed during one; the writer repairs it on its next \
         rewrite, retry later"
    )]
    Unstable {
        /// Which section.
        what: &'static str,
        /// The last sequence value seen.
        word: u32,
        /// How long the reader retried.
        waited_us: u64,
    },

    /// `/dev/shm` has no room for the region's pages.
    #[error(
        "no room in /dev/shm for shared-memory region {name} ({size} bytes): free space there \
         (`df -h /dev/shm`; remove stale regions with `amusd dump --gc`) or, in a container, give \
         it more (`docker run --shm-size=256m`)"
    )]
    NoSpace {
        /// The region's name.
        name: String,
        /// Bytes the region needs.
        size: u64,
    },

    /// The KV exchange's pages could not be reserved (a full /dev/shm, or a kernel before
    /// Linux 5.14).
    #[error("cannot reserve {bytes} bytes of the KV exchange in /dev/shm: {error}")]
    ExchangeUnreserved {
        /// Bytes asked for.
        bytes: usize,
        /// Why.
        error: Errno,
    },

    /// Positions of a split prefill past the KV exchange.
    #[error("KV exchange words {at}..+{len} lie past its {capacity} words")]
    ExchangeOverflow {
        /// The first word.
        at: usize,
        /// Words asked for.
        len: usize,
        /// Words the exchange holds.
        capacity: usize,
    },

    /// A value read from the region is out of its domain.
    #[error(
        "region field {field} holds {value}, which this amusd does not understand: the region is \
         corrupt or from another build"
    )]
    Corrupt {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: u64,
    },
}
