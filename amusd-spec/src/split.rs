//! A prompt's prefill split between the two workers.
//!
//! A prompt is prefilled by the verify model alone, in f32, before the first token can be
//! committed: ~2 ms a position on one core, 50-70% of a short answer's time end to end. Meanwhile
//! the draft worker's core prefills the draft and then waits. When the draft is a copy of the
//! verify model's checkpoint, the draft worker can instead hold a second instance of the verify
//! model (a [`Helper`]) and compute the verify model's keys and values for the prompt's first
//! positions `0..split`, block by block, while the verify worker computes `split..end` and takes
//! each block's first positions in just before that block attends
//! ([`amusd_model::Llama::prefill_hooked`]). Every position's keys and values depend only on the
//! positions before it, never on the batch, so the verify model's cache holds the bits of its own
//! whole prefill (tested in `amusd-model`): exactness does not depend on the split. Then the
//! verify worker hands its positions over and the draft adopts all of them (rounded to its cache's
//! precision) instead of prefilling the prompt itself: the verify model's keys and values served
//! the draft as well as its own (stop 49's measurement: agreement 99.90-100% either way).
//!
//! The positions pass through the region's KV exchange ([`amusd_shm::KvExchange`]): every block
//! at once where it holds them, else a ring of slots that each worker reuses once the other has
//! copied the slot's last block out.
//!
//! The protocol is a job in the region ([`amusd_shm::SplitSection`]) whose every change is a
//! compare-and-swap, so each worker can give up on its own: the verify worker drops a job the
//! draft worker did not take within [`TAKE_GRACE`] or that made no progress for [`STALL`]
//! (killed, stopped, starved), then prefills alone; either worker drops one whose request
//! ended (checked at every block). Whoever is late finds the job dropped and carries on alone.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use amusd_model::{BlockHook, KvCache, Llama, ModelSpec, WeightFormat};
use amusd_shm::{Party, Region, RequestState, Role, Spin, SplitJob};

use crate::SpecError;

/// Prompts shorter than this are prefilled by the verify worker alone: the handover's waits cost
/// more than half of a short prefill saves.
pub const MIN_SPLIT_POSITIONS: usize = 48;

/// How much slower attention's multiply-adds run than the matrix products' (a position's cost is
/// `1 + r * p` matrix-product units at context `p`; [`balanced_split`]). Fitted on the default
/// pair's prefills alone: 420 ms for 200 positions, 1228-1251 for 525, 3234-3257 for 1,240 and
/// 9382 for 2,832 fit `1 + r * p` with `r` 1.25 times the multiply-add ratio.
const ATTENTION_SLOWDOWN: f64 = 1.25;

/// Where to split `0..end` so that both workers have the same work: the draft worker's first
/// positions attend to fewer positions than the verify worker's last ones, so its share grows
/// with the prompt (`context_cost`: [`SplitOps::context_cost`]). Stop 50 measured fixed shares
/// (time to first token, two runs each): a 191-token prompt 271-274 / 251 / 235-242 / 244-247 ms
/// at 0.40 / 0.45 / 0.50 / 0.55 (this gives 0.51); a 525-token one 687-694 / 660-672 / 724-732
/// ms at 0.50 / 0.55 / 0.60 (this gives 0.52).
pub fn balanced_split(end: usize, context_cost: f64) -> usize {
    let (e, r) = (end as f64, context_cost * ATTENTION_SLOWDOWN);
    if r <= 0.0 {
        return end / 2;
    }
    // s + r s^2 / 2 = (e - s) + r (e^2 - s^2) / 2, for s in 0..=e.
    let s = ((1.0 + r * (e + r * e * e / 2.0)).sqrt() - 1.0) / r;
    (s.round() as usize).min(end)
}

/// How long the verify worker waits for the draft worker to take a job before prefilling alone.
pub const TAKE_GRACE: Duration = Duration::from_millis(50);

/// How long the verify worker waits for the draft worker's next block before prefilling alone.
/// A block of 500 positions takes ~40 ms here.
pub const STALL: Duration = Duration::from_millis(500);

/// How long the draft worker waits for the verify worker's job (or its word that it will not
/// split) after taking up a request: both take it up within microseconds of each other.
pub const OFFER_WAIT: Duration = Duration::from_millis(100);

/// The longest sleep between two looks at a job: each heartbeats.
const POLL: Duration = Duration::from_millis(20);

/// What a worker's model does in a split: the verify worker's prefill from `split`, taking the
/// earlier positions in block by block, and the draft worker's adoption of the handed-over ones.
pub trait SplitOps {
    /// The model's blocks and key width (`kv_dim`).
    fn shape(&self) -> (usize, usize);
    /// What one more position of context costs a row's attention, in multiply-adds, relative to
    /// the row's matrix products in a block.
    fn context_cost(&self) -> f64;
    /// Verify worker: caches `prompt[split..end]` at positions `split..end`, `hook` filling each
    /// block's positions `..split` before that block attends. Returns whether the pass ran to
    /// its end; otherwise (or on an error) the cache is empty.
    fn prefill_after(
        &mut self,
        prompt: &[u32],
        split: usize,
        end: usize,
        hook: &mut dyn BlockHook,
    ) -> Result<bool, SpecError>;
    /// Verify worker: block `layer`'s keys and values at positions `from..` (`k.len() / kv_dim`
    /// of them, position-major).
    fn read_positions(&self, layer: usize, from: usize, k: &mut [f32], v: &mut [f32]);
    /// Draft worker: its model's matrices in the verify model's arithmetic
    /// ([`Llama::verify_twin`]), where they can give it.
    fn verify_twin(&self) -> Option<Llama>;
    /// Draft worker: caches `tokens` at positions `0..`, `fill` writing each block's keys and
    /// values into the cache, in block order. Returns whether every block was filled; where
    /// `fill` says `false` or fails, the cache is empty.
    fn adopt(
        &mut self,
        tokens: &[u32],
        fill: &mut dyn FnMut(usize, &mut KvCache) -> Result<bool, SpecError>,
    ) -> Result<bool, SpecError>;
}

/// What identifies a verify model's arithmetic across the two processes: its spec, the model
/// file's identity (path, size, modification time) and this build. `None` if the spec names
/// nothing readable.
pub fn fingerprint(spec: &str) -> Option<u64> {
    let parsed: ModelSpec = spec.parse().ok()?;
    let path = std::fs::canonicalize(&parsed.path).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (spec, &path, meta.len(), meta.modified().ok()).hash(&mut h);
    env!("CARGO_PKG_VERSION").hash(&mut h);
    // 0 means "nothing" in the region.
    Some(h.finish().max(1))
}

/// The draft worker's instance of the verify model, with a cache for the positions it computes.
pub struct Helper {
    model: Llama,
    cache: KvCache,
    pub fingerprint: u64,
    /// Whether `model` shares the draft's matrices (else it is a second copy, loaded).
    pub shared: bool,
}

impl Helper {
    /// The verify model `spec` for a draft worker whose model is `draft_spec` (held by `draft`):
    /// the draft's own matrices in the verify model's arithmetic where the draft keeps the same
    /// checkpoint's blocks as stored and the verify model runs f32 arithmetic on them (no second
    /// copy of the weights); else the verify model loaded as the verify worker loads it (its
    /// greedy head left out: the helper computes no logits).
    pub fn new(
        spec: &str,
        draft_spec: &str,
        draft: Option<&dyn SplitOps>,
    ) -> Result<Self, SpecError> {
        let fingerprint = fingerprint(spec).ok_or_else(|| {
            SpecError::Protocol(format!("cannot read the verify model {spec} to help it"))
        })?;
        let twin = draft
            .filter(|_| shares_blocks(spec, draft_spec))
            .and_then(|d| d.verify_twin());
        let shared = twin.is_some();
        let model = match twin {
            Some(model) => model,
            None => {
                let (mut model, _) = amusd_model::loader::load_weights(&spec.parse()?)?;
                model.set_greedy_screen(false)?;
                model
            }
        };
        // Each block's positions go to the draft's cache as soon as they are computed.
        let cache = KvCache::one_block(&model.config, 0, model.kv_precision);
        Ok(Self {
            model,
            cache,
            fingerprint,
            shared,
        })
    }

    fn shape(&self) -> (usize, usize) {
        (self.model.blocks.len(), self.model.config.kv_dim())
    }
}

/// Whether the verify model `spec` is f32 arithmetic on the values of the file that the draft
/// `draft_spec` keeps as stored: then the draft's matrices can compute it.
fn shares_blocks(spec: &str, draft_spec: &str) -> bool {
    let (Ok(v), Ok(d)) = (spec.parse::<ModelSpec>(), draft_spec.parse::<ModelSpec>()) else {
        return false;
    };
    let same_file = std::fs::canonicalize(&v.path)
        .is_ok_and(|p| std::fs::canonicalize(&d.path).is_ok_and(|q| p == q));
    same_file && v.format == WeightFormat::F32 && d.format == WeightFormat::AsStored
}

/// Whether the request `request_id` is still the running one: checked at every block, so that
/// a request cancelled mid-prefill (a client gone) frees both workers within a block. Two loads
/// without the request's seqlock: mid-update, a new request's id is not ours, and an ending
/// one's state is seen at the next block.
fn request_live(region: &Region, request_id: u64) -> bool {
    region.request_id() == request_id && region.request_state() == Some(RequestState::Running)
}

/// Drops job `seq` unless it is over already (another job, or dropped); always `false`.
fn drop_job(region: &Region, seq: u32) -> bool {
    loop {
        let w = region.split_word();
        if w.seq != seq || w.state == amusd_shm::SplitState::Dropped {
            return false;
        }
        let dropped = amusd_shm::JobWord {
            state: amusd_shm::SplitState::Dropped,
            ..w
        };
        if region.move_split(w, dropped) {
            return false;
        }
    }
}

/// Waits on `party`'s bell until `ready` says what to do or `deadline` passes (`None` then),
/// heartbeating for `role` every [`POLL`] at most.
fn wait_for<T>(
    region: &Region,
    (party, role): (Party, Role),
    deadline: Instant,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    loop {
        let bell = region.bell_value(party);
        if let Some(t) = ready() {
            return Some(t);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        region.heartbeat(role);
        region.wait_bell_with(party, bell, Some(left.min(POLL)), Spin::DEFAULT);
    }
}

/// Copies block `layer`'s keys and values at positions `from..from + n` of `job` from the
/// exchange into `cache`, through `buf`.
fn take_in(
    region: &Region,
    job: &SplitJob,
    (layer, from, n): (usize, usize, usize),
    cache: &mut KvCache,
    buf: &mut (Vec<f32>, Vec<f32>),
) -> Result<(), SpecError> {
    let len = n * job.kv_dim as usize;
    buf.0.resize(len, 0.0);
    buf.1.resize(len, 0.0);
    region.read_exchange(job.word_of(layer, false, from), &mut buf.0)?;
    region.read_exchange(job.word_of(layer, true, from), &mut buf.1)?;
    cache.write_positions(layer, from, &buf.0, &buf.1);
    Ok(())
}

mod draft;
mod verify;

pub use draft::help;
pub use verify::{offer, verify_prefill};

#[cfg(test)]
mod tests;
