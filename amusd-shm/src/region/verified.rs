//! The verified buffer and its log-probability rows: the verify worker appends committed tokens;
//! the draft worker and the coordinator read them.

use std::sync::atomic::Ordering;

use super::{load_range, seq_read, store_range};
use crate::error::ShmError;
use crate::futex::futex_wake;
use crate::layout::*;

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

impl Region {
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
}
