//! The verify worker's side of a split prefill: posting a job, prefilling from `split` while
//! taking the draft worker's blocks in, handing its own positions over.

use std::ops::ControlFlow;
use std::time::Instant;

use amusd_model::{BlockHook, KvCache, ModelError};
use amusd_shm::{JobWord, Party, Region, Role, Spin, SplitJob, SplitState, KV_EXCHANGE_BYTES};

use super::{balanced_split, drop_job, request_live, take_in, wait_for, SplitOps};
use super::{MIN_SPLIT_POSITIONS, POLL, STALL, TAKE_GRACE};
use crate::SpecError;

/// Verify worker, taking up request `request_id` (`prompt`, of which its cache keeps `kept`
/// positions; `resumed` when more than the prompt is committed, after a restart): posts a job
/// splitting the prompt's prefill if the draft worker can help and it is worth it (returns the
/// job's word; its prefill recomputes the kept positions), or else a dropped job, so that the
/// draft worker does not wait for one. Nothing when the draft worker cannot help.
pub fn offer(
    region: &Region,
    own: Option<u64>,
    ops: Option<&mut dyn SplitOps>,
    request: (u64, usize, usize, bool),
) -> Result<Option<JobWord>, SpecError> {
    offer_within(region, own, ops, request, KV_EXCHANGE_BYTES / 4)
}

/// [`offer`], using at most `capacity` f32 words of the exchange (tests make it small).
pub(super) fn offer_within(
    region: &Region,
    own: Option<u64>,
    ops: Option<&mut dyn SplitOps>,
    (request_id, prompt_len, kept, resumed): (u64, usize, usize, bool),
    capacity: usize,
) -> Result<Option<JobWord>, SpecError> {
    let (Some(own), Some(ops)) = (own, ops) else {
        return Ok(None);
    };
    if region.helper() != own {
        return Ok(None);
    }
    let end = prompt_len.saturating_sub(1);
    let split = balanced_split(end, ops.context_cost());
    let (layers, kv_dim) = ops.shape();
    let mut job = SplitJob {
        request_id,
        fingerprint: own,
        split: split as u32,
        end: end as u32,
        layers: layers as u32,
        kv_dim: kv_dim as u32,
        slots: 0,
    };
    // Every block at once where the exchange holds them; else a ring of slots.
    job.slots = job.slots_within(capacity);
    // Splitting recomputes the kept positions: worth it while the verify worker's share is
    // less than what it would prefill alone.
    let worth = !resumed && end >= MIN_SPLIT_POSITIONS && end - split < end - kept;
    // A full /dev/shm: no split, rather than a SIGBUS at some store.
    let fits = || job.slots > 0 && region.reserve_exchange(job.words() * 4).is_ok();
    if worth && fits() {
        return Ok(Some(region.post_split(&job, SplitState::Offered)?));
    }
    let none = SplitJob {
        split: 0,
        end: 0,
        ..job
    };
    region.post_split(&none, SplitState::Dropped)?;
    Ok(None)
}

fn with_state(w: JobWord, state: SplitState) -> JobWord {
    JobWord { state, ..w }
}

/// Verify worker: runs the prefill of the job `word` posted for `prompt`: positions
/// `split..end`, taking the draft worker's `..split` in block by block, then hands its own
/// positions over. Returns whether it prefilled; `false` when the job was dropped before, and
/// the cache is then empty (the caller prefills alone). A job dropped during the handover
/// leaves the cache whole: only the draft worker goes without.
pub fn verify_prefill(
    region: &Region,
    ops: &mut dyn SplitOps,
    prompt: &[u32],
    word: JobWord,
) -> Result<bool, SpecError> {
    let job = region.split_job();
    let (split, end) = (job.split as usize, job.end as usize);
    let now = Instant::now();
    let mut taker = Taker {
        region,
        job,
        word,
        posted: now,
        progress: now,
        buf: Default::default(),
    };
    match ops.prefill_after(prompt, split, end, &mut taker) {
        Ok(true) => {}
        Ok(false) => return Ok(false),
        Err(e) => {
            region.move_split(taker.word, with_state(taker.word, SplitState::Dropped));
            return Err(e);
        }
    }
    hand_over(region, &*ops, &job, taker.word)?;
    Ok(true)
}

/// Publishes the verify worker's positions `split..end` block by block, each once the draft
/// worker has adopted the block whose slot it reuses. Stops when the job is dropped (the draft
/// worker's request ended) or the draft worker stalls or is reaped: it then prefills alone.
fn hand_over(
    region: &Region,
    ops: &dyn SplitOps,
    job: &SplitJob,
    taken: JobWord,
) -> Result<(), SpecError> {
    let mut word = JobWord {
        state: SplitState::Handed,
        blocks: 0,
        ..taken
    };
    if !region.move_split(taken, word) {
        return Ok(());
    }
    let (split, slots) = (job.split as usize, job.slots as usize);
    let len = (job.end as usize - split) * job.kv_dim as usize;
    let (mut k, mut v) = (vec![0.0; len], vec![0.0; len]);
    for layer in 0..job.layers as usize {
        let need = (layer + 1).saturating_sub(slots) as u32;
        if !wait_adopted(region, job, word, need) {
            drop_job(region, word.seq);
            return Ok(());
        }
        ops.read_positions(layer, split, &mut k, &mut v);
        region.write_exchange(job.word_of(layer, false, split), &k)?;
        region.write_exchange(job.word_of(layer, true, split), &v)?;
        let next = JobWord {
            blocks: layer as u32 + 1,
            ..word
        };
        if !region.move_split(word, next) {
            return Ok(());
        }
        word = next;
    }
    Ok(())
}

/// Waits until the draft worker has adopted `need` blocks of the job `word`; `false` if the
/// job changed, the draft worker was reaped or made no progress for [`STALL`].
fn wait_adopted(region: &Region, job: &SplitJob, word: JobWord, need: u32) -> bool {
    let deadline = Instant::now() + STALL;
    let ready = wait_for(region, (Party::Verify, Role::Verify), deadline, || {
        if region.adopted(word.seq) >= need {
            return Some(true);
        }
        let gone = region.helper() != job.fingerprint || !request_live(region, job.request_id);
        (gone || region.split_word() != word).then_some(false)
    });
    ready == Some(true)
}

/// The verify worker's hook: waits for each block of the draft worker's positions and takes
/// them in, or drops the job.
struct Taker<'a> {
    region: &'a Region,
    job: SplitJob,
    /// The job as last seen.
    word: JobWord,
    posted: Instant,
    /// When the draft worker last published a block.
    progress: Instant,
    buf: (Vec<f32>, Vec<f32>),
}

impl Taker<'_> {
    /// Waits until the draft worker has published `blocks` blocks; `false` if the job was
    /// dropped (by either side).
    fn wait_blocks(&mut self, blocks: u32) -> bool {
        let region = self.region;
        loop {
            let bell = region.bell_value(Party::Verify);
            let w = region.split_word();
            if w.seq != self.word.seq || w.state == SplitState::Dropped {
                return false;
            }
            if w.state == SplitState::Taken && w.blocks != self.word.blocks {
                self.progress = Instant::now();
            }
            self.word = w;
            if w.state == SplitState::Taken && w.blocks >= blocks {
                return true;
            }
            let deadline = match w.state {
                SplitState::Offered => self.posted + TAKE_GRACE,
                _ => self.progress + STALL,
            };
            let now = Instant::now();
            // The coordinator clears the draft worker's word when it reaps it: no need to wait.
            let helper_gone = region.helper() != self.job.fingerprint;
            if now >= deadline || helper_gone || !request_live(region, self.job.request_id) {
                if region.move_split(w, with_state(w, SplitState::Dropped)) {
                    return false;
                }
                continue;
            }
            region.heartbeat(Role::Verify);
            let wait = (deadline - now).min(POLL);
            region.wait_bell_with(Party::Verify, bell, Some(wait), Spin::DEFAULT);
        }
    }
}

impl BlockHook for Taker<'_> {
    fn before_attention(
        &mut self,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<ControlFlow<()>, ModelError> {
        if !request_live(self.region, self.job.request_id) {
            drop_job(self.region, self.word.seq);
            return Ok(ControlFlow::Break(()));
        }
        if !self.wait_blocks(layer as u32 + 1) {
            return Ok(ControlFlow::Break(()));
        }
        let at = (layer, 0, self.job.split as usize);
        take_in(self.region, &self.job, at, cache, &mut self.buf)
            .map_err(|e| ModelError::Shape(format!("split prefill: {e}")))?;
        (self.region).count_taken_in(self.word.seq, layer as u32 + 1);
        Ok(ControlFlow::Continue(()))
    }

    fn after_block(&mut self, _: usize, _: &KvCache) -> Result<ControlFlow<()>, ModelError> {
        self.region.heartbeat(Role::Verify);
        Ok(ControlFlow::Continue(()))
    }
}
