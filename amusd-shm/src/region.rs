//! Protocol primitives on [`Region`]: request submission and reading, verified-token publication,
//! draft appends/rewrites and seqlock reads, bells, worker status, and the metric rings.
//!
//! These methods implement *how* each party publishes and reads, with the orderings documented on
//! the fields; *what* to publish and when (acceptance, rollback policy, restarts) belongs to the
//! worker and coordinator crates. One file per section of the region (`region/`); the seqlock
//! and range helpers they share are here.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::ShmError;
use crate::layout::*;

/// How long a seqlock reader retries before giving up with [`ShmError::Unstable`]. A rewrite
/// copies at most a few KiB, so a healthy writer is out of its odd window in microseconds; a
/// reader that sees it odd for this long is looking at a writer that was descheduled for a long
/// time or killed mid-rewrite.
pub const SEQLOCK_READ_BUDGET: Duration = Duration::from_millis(20);

/// How many of a ring's most recent events can be read: one less than [`EVENT_CAPACITY`], because
/// the slot of the oldest one is the slot the writer fills next (and may be filling right now).
pub const READABLE_EVENTS: usize = EVENT_CAPACITY - 1;

mod bells;
mod draft;
mod events;
mod request;
#[cfg(test)]
mod tests;
mod verified;
mod workers;

pub use draft::DraftSnapshot;
pub use events::{EventBatch, EventRecord};
pub use request::{RequestSnapshot, RequestSpec, SamplingFields};
pub use verified::VerifiedSnapshot;
pub use workers::WorkerSnapshot;

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
}
