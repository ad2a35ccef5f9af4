//! The draft worker's side of a split prefill: taking a job, computing the verify model's first
//! positions block by block, adopting every position once the verify worker hands its own over.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use amusd_model::{BlockHook, KvCache, ModelError};
use amusd_shm::{JobWord, Party, Region, Role, SplitJob, SplitState};

use super::{request_live, take_in, wait_for, Helper, SplitOps, OFFER_WAIT};
use crate::SpecError;

/// The longest the draft worker waits for the verify worker's positions: far beyond any
/// prefill the exchange holds, only so that no wait is endless.
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
        && job.split <= job.end
        && job.end as usize + 1 == prompt.len();
    let taken = JobWord {
        state: SplitState::Taken,
        ..word
    };
    if word.state != SplitState::Offered || !usable || !region.move_split(word, taken) {
        return Ok(false);
    }
    let mut giver = Giver {
        region,
        job,
        word: taken,
        buf: Default::default(),
    };
    let split = job.split as usize;
    helper.cache.reserve(split);
    let model = &helper.model;
    if !model.prefill_hooked(&prompt[..split], 0, &mut helper.cache, &mut giver)? {
        return Ok(false);
    }
    let handed = JobWord {
        state: SplitState::Handed,
        ..giver.word
    };
    if !wait_handover(region, giver.word, handed, request_id) {
        return Ok(false);
    }
    let mut buf = Default::default();
    let end = job.end as usize;
    ops.adopt(&prompt[..end], &mut |layer, cache| {
        take_in(region, &job, (layer, 0, end), cache, &mut buf)
    })?;
    Ok(true)
}

/// Waits for the job `taken` (every block published) to be `handed` over; `false` if it was
/// dropped or replaced, or its request ended (then it drops it).
fn wait_handover(region: &Region, taken: JobWord, handed: JobWord, request_id: u64) -> bool {
    let deadline = Instant::now() + HANDOVER_WAIT;
    let seen = wait_for(region, (Party::Draft, Role::Draft), deadline, || {
        let w = region.split_word();
        if w == handed {
            return Some(true);
        }
        if w != taken || region.shutdown_requested() || !request_live(region, request_id) {
            return Some(false);
        }
        None
    });
    let done = seen == Some(true);
    if !done {
        let dropped = JobWord {
            state: SplitState::Dropped,
            ..taken
        };
        region.move_split(taken, dropped);
    }
    done
}

/// The draft worker's hook: publishes each block's positions and counts it, or stops when the
/// job was dropped.
struct Giver<'a> {
    region: &'a Region,
    job: SplitJob,
    word: JobWord,
    buf: (Vec<f32>, Vec<f32>),
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
