//! The draft buffer: the draft worker appends and, after a rollback, rewrites under a seqlock
//! epoch; the verify worker reads consistent snapshots.

use std::sync::atomic::{AtomicU32, Ordering};

use super::{load_range, seq_close, seq_open, seq_read, store_range};
use crate::error::ShmError;
use crate::futex::futex_wake;
use crate::layout::*;

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

impl Region {
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
    /// the verify worker does not spin [`SEQLOCK_READ_BUDGET`](super::SEQLOCK_READ_BUDGET) on every step until the replacement
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
    /// [`SEQLOCK_READ_BUDGET`](super::SEQLOCK_READ_BUDGET) if the epoch stays odd or keeps changing, e.g. because the draft
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
}

/// Stores the sources of `n` slots from `from`; slots past `sources` get [`TokenSource::Model`].
fn store_sources(slots: &[AtomicU32], from: usize, n: usize, sources: &[TokenSource]) {
    for (i, slot) in slots[from..from + n].iter().enumerate() {
        let s = sources.get(i).copied().unwrap_or(TokenSource::Model);
        slot.store(s.as_u32(), Ordering::Relaxed);
    }
}
