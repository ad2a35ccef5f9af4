//! The draft worker's side of a split prefill: taking a job, computing the verify model's first
//! positions block by block, adopting every position once the verify worker hands its own over.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use amusd_model::{BlockHook, KvCache, ModelError};
use amusd_shm::{JobWord, Party, Region, Role, SplitJob, SplitState, KV_EXCHANGE_BYTES};

use super::{drop_job, request_live, take_in, wait_for, Helper, SplitOps, OFFER_WAIT};
use crate::SpecError;

/// The longest the draft worker waits for the verify worker's positions or for a slot: far
/// beyond a block of any prompt the region holds, only so that no wait is endless (the draft
/// worker then drops the job and prefills alone; the verify worker loses nothing).
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// Draft worker, having taken up request `request_id` (`prompt`): if the verify worker posts a
/// job for it, computes the job's first positions with `helper`, waits for the verify worker's
/// and adopts all of them into `ops`'s cache. Returns whether it did; otherwise (no job, or a
/// job dropped) the draft prefills as usual.
pub fn help(
    region: &Region,
    helper: &mut Helper,
    ops: &mut dyn SplitOps,
    prompt: &[u32],
    request_id: u64,
) -> Result<bool, SpecError> {
    if region.verifier() != helper.fingerprint {
        return Ok(false);
    }
    let deadline = Instant::now() + OFFER_WAIT;
    let posted = wait_for(region, (Party::Draft, Role::Draft), deadline, || {
        let (w, job) = (region.split_word(), region.split_job());
        // The fields belong to the word only if no newer job was posted in between.
        (region.split_word() == w && job.request_id == request_id).then_some((w, job))
    });
    let Some((word, job)) = posted else {
        return Ok(false);
    };
    let usable = job.fingerprint == helper.fingerprint
        && (job.layers as usize, job.kv_dim as usize) == helper.shape()
        && (1..=job.layers).contains(&job.slots)
        && job.words() <= KV_EXCHANGE_BYTES / 4
        && job.split <= job.end
        && job.end as usize + 1 == prompt.len();
    let taken = JobWord {
        state: SplitState::Taken,
        ..word
    };
    if word.state != SplitState::Offered || !usable || !region.move_split(word, taken) {
        return Ok(false);
    }
    let (split, end) = (job.split as usize, job.end as usize);
    let (model, scratch) = (&helper.model, &mut helper.cache);
    scratch.reserve(split);
    let mut buf = (Vec::new(), Vec::new());
    // The draft's cache takes each block's own positions as the helper computes them (the helper
    // keeps one block), then, block by block, the verify worker's as it hands them over. A job
    // dropped on the way leaves the draft's cache empty: it prefills the whole prompt itself.
    ops.adopt(&prompt[..end], &mut |layer, cache| {
        if layer == 0 {
            let mut giver = Giver {
                region,
                job,
                word: taken,
                buf: Default::default(),
                adopter: &mut *cache,
            };
            if !model.prefill_hooked(&prompt[..split], 0, scratch, &mut giver)? {
                return Ok(false);
            }
        }
        if !wait_handed(region, &job, taken.seq, layer) {
            return Ok(false);
        }
        take_in(region, &job, (layer, split, end - split), cache, &mut buf)?;
        region.count_adopted(taken.seq, layer as u32 + 1);
        Ok(true)
    })
}

/// Waits until the verify worker has handed block `layer` of job `seq` over; `false` (having
/// dropped the job) if it was dropped or replaced, or its request ended.
fn wait_handed(region: &Region, job: &SplitJob, seq: u32, layer: usize) -> bool {
    let deadline = Instant::now() + HANDOVER_WAIT;
    let seen = wait_for(region, (Party::Draft, Role::Draft), deadline, || {
        let w = region.split_word();
        let over = w.seq != seq || region.shutdown_requested();
        match w.state {
            _ if over || !request_live(region, job.request_id) => Some(false),
            SplitState::Handed if w.blocks > layer as u32 => Some(true),
            SplitState::Taken | SplitState::Handed => None,
            _ => Some(false),
        }
    });
    seen == Some(true) || drop_job(region, seq)
}

/// Waits until the verify worker has taken in every block before `layer` that shares its slot;
/// `false` if the job changed, the verify worker was reaped or the request ended.
fn wait_slot(region: &Region, job: &SplitJob, word: JobWord, layer: usize) -> bool {
    let need = (layer + 1).saturating_sub(job.slots as usize) as u32;
    let deadline = Instant::now() + HANDOVER_WAIT;
    let ready = wait_for(region, (Party::Draft, Role::Draft), deadline, || {
        if region.taken_in(word.seq) >= need {
            return Some(true);
        }
        let gone = region.verifier() != job.fingerprint || region.shutdown_requested();
        let over = gone || !request_live(region, job.request_id) || region.split_word() != word;
        over.then_some(false)
    });
    ready == Some(true)
}

/// The draft worker's hook: publishes each block's positions, counts it and writes it into the
/// draft's own cache (before the next block overwrites it in the helper's), or stops when the job
/// was dropped.
struct Giver<'a> {
    region: &'a Region,
    job: SplitJob,
    word: JobWord,
    buf: (Vec<f32>, Vec<f32>),
    /// The draft's cache, adopting the positions.
    adopter: &'a mut KvCache,
}

impl BlockHook for Giver<'_> {
    fn before_attention(
        &mut self,
        _: usize,
        _: &mut KvCache,
    ) -> Result<ControlFlow<()>, ModelError> {
        Ok(ControlFlow::Continue(()))
    }

    fn after_block(
        &mut self,
        layer: usize,
        cache: &KvCache,
    ) -> Result<ControlFlow<()>, ModelError> {
        let region = self.region;
        region.heartbeat(Role::Draft);
        let live = request_live(region, self.job.request_id);
        if !live || !wait_slot(region, &self.job, self.word, layer) {
            drop_job(region, self.word.seq);
            return Ok(ControlFlow::Break(()));
        }
        let len = self.job.split as usize * self.job.kv_dim as usize;
        let (k, v) = &mut self.buf;
        k.resize(len, 0.0);
        v.resize(len, 0.0);
        cache.read_positions(layer, 0, k, v);
        let publish = |values: bool, data: &[f32]| {
            region
                .write_exchange(self.job.word_of(layer, values, 0), data)
                .map_err(|e| ModelError::Shape(format!("split prefill: {e}")))
        };
        publish(false, k)?;
        publish(true, v)?;
        self.adopter.write_positions(layer, 0, k, v);
        let next = JobWord {
            blocks: layer as u32 + 1,
            ..self.word
        };
        if !region.move_split(self.word, next) {
            return Ok(ControlFlow::Break(()));
        }
        self.word = next;
        Ok(ControlFlow::Continue(()))
    }
}
