//! A prompt's prefill split between the workers ([`SplitSection`], [`KvExchange`]): posting,
//! taking, counting, handing over and dropping a job, and copying positions through the exchange.
//! When to split and what to compute is the workers' (`amusd-spec`'s `split` module).

use std::sync::atomic::Ordering;

use crate::error::ShmError;
use crate::layout::*;

/// A split prefill job's fields ([`SplitSection`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitJob {
    pub request_id: u64,
    pub fingerprint: u64,
    /// Positions `0..split` are the draft worker's.
    pub split: u32,
    /// Positions `split..end` are the verify worker's.
    pub end: u32,
    pub layers: u32,
    pub kv_dim: u32,
    /// Blocks the exchange holds at once (`1..=layers`); block `l` lives in slot `l % slots`.
    pub slots: u32,
}

impl SplitJob {
    /// f32 words of one slot: one block's keys and values of `0..end`.
    fn slot_words(&self) -> usize {
        2 * self.end as usize * self.kv_dim as usize
    }

    /// The most slots that `capacity` f32 words hold, up to one a block (0: not even one).
    pub fn slots_within(&self, capacity: usize) -> u32 {
        let fit = capacity / self.slot_words().max(1);
        fit.min(self.layers as usize) as u32
    }

    /// f32 words of the exchange the job uses.
    pub fn words(&self) -> usize {
        self.slots as usize * self.slot_words()
    }

    /// The exchange word where `block`'s keys (`values == false`) or values of `position` start.
    pub fn word_of(&self, block: usize, values: bool, position: usize) -> usize {
        let (end, kv_dim) = (self.end as usize, self.kv_dim as usize);
        let slot = block % self.slots.max(1) as usize;
        ((2 * slot + usize::from(values)) * end + position) * kv_dim
    }
}

/// One value of [`SplitSection::job`], unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobWord {
    pub seq: u32,
    pub state: SplitState,
    /// Blocks whose positions `0..split` the draft worker has published.
    pub blocks: u32,
}

impl JobWord {
    fn pack(self) -> u64 {
        (self.seq as u64) << 32 | (self.state.as_u32() as u64) << 16 | self.blocks as u64 & 0xFFFF
    }

    fn unpack(w: u64) -> Self {
        Self {
            seq: (w >> 32) as u32,
            // A state this build never writes reads as dropped: nobody acts on it.
            state: SplitState::from_u32((w >> 16) as u32 & 0xFFFF).unwrap_or(SplitState::Dropped),
            blocks: w as u32 & 0xFFFF,
        }
    }
}

impl Region {
    /// Draft worker: what it can compute for a split (0: nothing).
    pub fn advertise_helper(&self, fingerprint: u64) {
        self.split.helper.store(fingerprint, Ordering::Release);
    }

    /// Verify worker: the draft worker's [`Self::advertise_helper`].
    pub fn helper(&self) -> u64 {
        self.split.helper.load(Ordering::Acquire)
    }

    /// Verify worker: whether it can split (its model's fingerprint, 0 for no).
    pub fn announce_verifier(&self, fingerprint: u64) {
        self.split.verifier.store(fingerprint, Ordering::Release);
    }

    /// Draft worker: the verify worker's [`Self::announce_verifier`].
    pub fn verifier(&self) -> u64 {
        self.split.verifier.load(Ordering::Acquire)
    }

    /// The current job word.
    pub fn split_word(&self) -> JobWord {
        JobWord::unpack(self.split.job.load(Ordering::Acquire))
    }

    /// The current job's fields (meaningful once a job was posted; read after [`Self::split_word`]).
    pub fn split_job(&self) -> SplitJob {
        let s = &self.split;
        let r = Ordering::Relaxed;
        SplitJob {
            request_id: s.request_id.load(r),
            fingerprint: s.fingerprint.load(r),
            split: s.split.load(r),
            end: s.end.load(r),
            layers: s.layers.load(r),
            kv_dim: s.kv_dim.load(r),
            slots: s.slots.load(r),
        }
    }

    /// Verify worker: it has copied the first `blocks` blocks of job `seq` out of the exchange
    /// (rings the draft worker, which may wait to reuse a slot).
    pub fn count_taken_in(&self, seq: u32, blocks: u32) {
        let w = (seq as u64) << 32 | blocks as u64;
        self.split.taken_in.store(w, Ordering::Release);
        self.ring(Party::Draft);
    }

    /// Draft worker: the blocks of job `seq` the verify worker has copied out (0 for another job).
    pub fn taken_in(&self, seq: u32) -> u32 {
        progress_of(self.split.taken_in.load(Ordering::Acquire), seq)
    }

    /// Draft worker: it has adopted the first `blocks` blocks of job `seq` (rings the verify
    /// worker, which may wait to reuse a slot).
    pub fn count_adopted(&self, seq: u32, blocks: u32) {
        let w = (seq as u64) << 32 | blocks as u64;
        self.split.adopted.store(w, Ordering::Release);
        self.ring(Party::Verify);
    }

    /// Verify worker: the blocks of job `seq` the draft worker has adopted (0 for another job).
    pub fn adopted(&self, seq: u32) -> u32 {
        progress_of(self.split.adopted.load(Ordering::Acquire), seq)
    }

    /// Verify worker: posts `job` as the next job in `state` (`Offered`, or `Dropped` to say
    /// that this request is not split), and rings the draft worker. Returns its word. The
    /// verify worker is the only one that posts, so this never races another post.
    pub fn post_split(&self, job: &SplitJob, state: SplitState) -> Result<JobWord, ShmError> {
        self.exchange_range(0, job.words())?;
        let s = &self.split;
        let r = Ordering::Relaxed;
        s.request_id.store(job.request_id, r);
        s.fingerprint.store(job.fingerprint, r);
        s.split.store(job.split, r);
        s.end.store(job.end, r);
        s.layers.store(job.layers, r);
        s.kv_dim.store(job.kv_dim, r);
        s.slots.store(job.slots, r);
        // A CAS loop rather than a store: the draft worker may still change the old job's word.
        let mut cur = s.job.load(Ordering::Acquire);
        loop {
            let next = JobWord {
                seq: JobWord::unpack(cur).seq.wrapping_add(1),
                state,
                blocks: 0,
            };
            match s
                .job
                .compare_exchange(cur, next.pack(), Ordering::AcqRel, r)
            {
                Ok(_) => {
                    self.ring(Party::Draft);
                    return Ok(next);
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Either worker: moves the job from `from` to `to` if it still is `from`, and rings the
    /// other worker. Returns whether it did.
    pub fn move_split(&self, from: JobWord, to: JobWord) -> bool {
        let done = (self.split.job)
            .compare_exchange(from.pack(), to.pack(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if done {
            self.ring(Party::Draft);
            self.ring(Party::Verify);
        }
        done
    }

    /// Reserves the first `bytes` of the KV exchange, so that storing there cannot raise SIGBUS
    /// on a full /dev/shm: [`ShmError::NoSpace`] instead, before anything is stored (Linux 5.14's
    /// `MADV_POPULATE_WRITE`; on older kernels an error too, and the workers do not split).
    /// Pages stay reserved until the region is unlinked; reserving them again is cheap.
    pub fn reserve_exchange(&self, bytes: usize) -> Result<(), ShmError> {
        let len = bytes.min(KV_EXCHANGE_BYTES).next_multiple_of(4096);
        let at = self.kv.words.as_ptr() as *mut libc::c_void;
        // SAFETY: `at..at + len` lies inside the exchange (`len` clamped to its size), which is
        // page-aligned (`KvExchange` is `align(4096)`) and mapped writable for as long as `self`
        // is borrowed; populating pages changes no byte of them.
        let done = unsafe { libc::madvise(at, len, libc::MADV_POPULATE_WRITE) };
        if done != 0 {
            return Err(ShmError::ExchangeUnreserved {
                bytes: len,
                error: nix::errno::Errno::last(),
            });
        }
        Ok(())
    }

    /// Stores `values` at exchange words `at..` (bounds checked).
    pub fn write_exchange(&self, at: usize, values: &[f32]) -> Result<(), ShmError> {
        let words = self.exchange_range(at, values.len())?;
        for (w, v) in words.iter().zip(values) {
            w.store(v.to_bits(), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Loads exchange words `at..at + out.len()` into `out` (bounds checked).
    pub fn read_exchange(&self, at: usize, out: &mut [f32]) -> Result<(), ShmError> {
        let words = self.exchange_range(at, out.len())?;
        for (v, w) in out.iter_mut().zip(words) {
            *v = f32::from_bits(w.load(Ordering::Relaxed));
        }
        Ok(())
    }

    fn exchange_range(
        &self,
        at: usize,
        len: usize,
    ) -> Result<&[std::sync::atomic::AtomicU32], ShmError> {
        at.checked_add(len)
            .and_then(|end| self.kv.words.get(at..end))
            .ok_or(ShmError::ExchangeOverflow {
                at,
                len,
                capacity: self.kv.words.len(),
            })
    }
}

/// The count in a `seq << 32 | blocks` word, if it is job `seq`'s (else none yet: 0).
fn progress_of(word: u64, seq: u32) -> u32 {
    if (word >> 32) as u32 == seq {
        word as u32
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> SplitJob {
        SplitJob {
            request_id: 7,
            fingerprint: 0xfeed,
            split: 3,
            end: 5,
            layers: 2,
            kv_dim: 4,
            slots: 2,
        }
    }

    #[test]
    fn a_job_moves_only_from_the_state_it_is_in() {
        let r = Region::new_boxed();
        assert_eq!(r.split_word().state, SplitState::Empty);
        let offered = r.post_split(&job(), SplitState::Offered).unwrap();
        assert_eq!(
            (offered.seq, offered.state, offered.blocks),
            (1, SplitState::Offered, 0)
        );
        assert_eq!(r.split_job(), job());
        let taken = JobWord {
            state: SplitState::Taken,
            ..offered
        };
        assert!(r.move_split(offered, taken));
        // The verify worker's drop of the offer comes too late: the job was taken.
        let dropped = JobWord {
            state: SplitState::Dropped,
            ..offered
        };
        assert!(!r.move_split(offered, dropped));
        let one = JobWord { blocks: 1, ..taken };
        assert!(r.move_split(taken, one));
        assert_eq!(r.split_word(), one);
        // A newer job ends the old one: its taker's next count changes nothing.
        let next = r.post_split(&job(), SplitState::Offered).unwrap();
        assert_eq!(next.seq, 2);
        assert!(!r.move_split(one, JobWord { blocks: 2, ..one }));
        assert_eq!(r.split_word(), next);
    }

    #[test]
    fn positions_go_through_the_exchange_at_their_words() {
        let r = Region::new_boxed();
        let j = job();
        assert_eq!(j.words(), 2 * 2 * 5 * 4);
        assert_eq!(j.word_of(1, true, 2), (3 * 5 + 2) * 4);
        let values: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        r.write_exchange(j.word_of(1, false, 3), &values).unwrap();
        let mut back = vec![0.0; 8];
        r.read_exchange(j.word_of(1, false, 3), &mut back).unwrap();
        assert_eq!(back, values);
        let last = KV_EXCHANGE_BYTES / 4;
        assert!(r.write_exchange(last - 2, &values).is_err());
        assert!(r.read_exchange(usize::MAX, &mut back).is_err());
        let too_big = SplitJob { end: 1 << 20, ..j };
        assert!(r.post_split(&too_big, SplitState::Offered).is_err());
    }

    #[test]
    fn a_small_exchange_holds_a_ring_of_blocks() {
        let j = SplitJob { layers: 5, ..job() };
        // A slot is 2 * 5 * 4 = 40 words.
        assert_eq!(j.slots_within(200), 5);
        assert_eq!(j.slots_within(1000), 5);
        assert_eq!(j.slots_within(119), 2);
        assert_eq!(j.slots_within(39), 0);
        let ring = SplitJob { slots: 2, ..j };
        assert_eq!(ring.words(), 80);
        // Blocks 0, 2 and 4 share slot 0.
        assert_eq!(ring.word_of(4, true, 1), ring.word_of(0, true, 1));
        assert_eq!(ring.word_of(3, false, 0), 2 * 5 * 4);
    }

    #[test]
    fn each_side_counts_its_copies_for_one_job() {
        let r = Region::new_boxed();
        assert_eq!((r.taken_in(1), r.adopted(1)), (0, 0));
        r.count_taken_in(1, 3);
        r.count_adopted(1, 2);
        assert_eq!((r.taken_in(1), r.adopted(1)), (3, 2));
        // Another job's counts read as none.
        assert_eq!((r.taken_in(2), r.adopted(0)), (0, 0));
    }
}
