//! The AMUSD protocol over the shared-memory region: the draft worker's loop, the verify worker's
//! loop, and the coordinator's side of a request.
//!
//! Who writes what (the region's layout documents each field):
//! - the coordinator writes the request and the prompt, and ends the request once the committed
//!   tokens end with a stop token or reach the budget (it derives that from the verified buffer, so
//!   the request section keeps a single writer);
//! - the verify worker appends committed tokens (a stop token included) to the verified buffer;
//! - the draft worker writes its whole sequence, by position, to the draft buffer.
//!
//! Draft tokens at positions `>= V` (V = committed length) are only taken as candidates when the
//! draft's positions `< V` equal the committed tokens, i.e. when they were drafted on the committed
//! prefix. That check is cheap (a few thousand integer compares at most) and makes the candidates'
//! validity a pure function of one consistent snapshot, whatever rollbacks or worker restarts
//! happened in between. Exactness never depends on it: a candidate is only committed when it equals
//! the verify model's own token, which its sampler chooses from the logits, the request's seed and
//! the position alone (see [`crate::sampling`]), so a restarted worker chooses the same tokens.

use std::time::Duration;

use amusd_shm::{now_us, EventKind, EventRecord, Region, RequestState, Role, ShmError};
use amusd_shm::{WorkerState, TOKEN_CAPACITY};

use crate::policy::StopCriteria;
use crate::sampling::RequestSampling;
use crate::SpecError;

mod coordinator;
mod draft;
#[cfg(test)]
mod tests;
mod verify;
mod wire;

pub use coordinator::run_request;
pub use draft::{run_draft, DraftOptions, DEFAULT_MAX_LOOKAHEAD};
pub use verify::{run_verify, VerifyOptions, DEFAULT_MAX_VERIFY_BATCH};
pub use wire::{sampling_fields, sampling_of};

/// How often the coordinator checks its workers while a request runs.
pub const SUPERVISE_EVERY: Duration = Duration::from_millis(20);

/// How long an idle worker sleeps between liveness checks and heartbeats.
pub const IDLE_POLL: Duration = Duration::from_millis(100);

/// Most positions one prefill forward runs: a worker heartbeats between chunks, so a long prompt
/// on a slow machine does not look like a hang (about 150 ms for the f32 verify model here).
pub const PREFILL_CHUNK: usize = 64;

/// How long a worker waits before retrying a read that found the coordinator mid-update.
const RETRY: Duration = Duration::from_millis(1);

/// The request a worker is working on.
struct Held {
    /// The verify worker's split prefill job for this request, until it runs it.
    split: Option<amusd_shm::JobWord>,
    id: u64,
    prompt_len: usize,
    /// Prompt plus budget: no position at or past this is ever committed.
    limit: usize,
    stop: StopCriteria,
    sampling: RequestSampling,
    committed: Vec<u32>,
}

impl Held {
    /// True once the committed tokens end the request (stop token or budget).
    fn finished(&self) -> bool {
        self.stop.ends(&self.committed[self.prompt_len..])
    }
}

/// What a worker does between loop iterations while it has nothing to do.
enum Next {
    Work,
    Wait(Duration),
}

/// Reads the request section; `Ok(None)` while the coordinator is mid-update for too long.
fn read_request(region: &Region) -> Result<Option<amusd_shm::RequestSnapshot>, SpecError> {
    match region.read_request() {
        Ok(r) => Ok(Some(r)),
        Err(ShmError::Unstable { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// [`Region::verified_snapshot`]; `Ok(None)` while the coordinator is mid-update for too long (it
/// was descheduled inside its seqlock write: retry, as for the request).
fn verified_snapshot(
    region: &Region,
    from: usize,
) -> Result<Option<amusd_shm::VerifiedSnapshot>, SpecError> {
    match region.verified_snapshot(from, TOKEN_CAPACITY) {
        Ok(s) => Ok(Some(s)),
        Err(ShmError::Unstable { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Takes up the running request, or lets go of a finished one. Returns the request to work on.
fn track_request(
    region: &Region,
    role: Role,
    held: &mut Option<Held>,
) -> Result<Option<amusd_shm::RequestSnapshot>, SpecError> {
    let Some(req) = read_request(region)? else {
        return Ok(None);
    };
    let running = req.state == RequestState::Running;
    if held
        .as_ref()
        .is_some_and(|h| !running || h.id != req.request_id)
    {
        *held = None;
        region.set_worker_request(role, 0);
        region.set_worker_state(role, WorkerState::Ready);
    }
    Ok(running.then_some(req))
}

/// A fresh [`Held`] for `req`, with every token committed so far (more than the prompt when this
/// worker replaces one that died mid-request). `None` if the buffer already belongs to another request
/// or could not be read consistently yet.
fn take_up(region: &Region, req: &amusd_shm::RequestSnapshot) -> Result<Option<Held>, SpecError> {
    let Some(snap) = verified_snapshot(region, 0)? else {
        return Ok(None);
    };
    if snap.request_id != req.request_id
        || snap.tokens.len() < req.prompt_len
        || req.prompt_len == 0
    {
        return Ok(None);
    }
    Ok(Some(Held {
        split: None,
        id: req.request_id,
        prompt_len: req.prompt_len,
        limit: req.prompt_len + req.max_new_tokens as usize,
        stop: StopCriteria {
            stop_ids: req.stop_tokens.clone(),
            max_new_tokens: req.max_new_tokens as usize,
        },
        sampling: sampling_of(&req.sampling)?,
        committed: snap.tokens,
    }))
}

fn event(
    kind: EventKind,
    request_id: u64,
    t_start_us: u64,
    position: usize,
    count: usize,
    accepted: usize,
) -> EventRecord {
    EventRecord {
        seq: 0,
        t_start_us,
        t_end_us: now_us(),
        request_id,
        kind,
        position: position as u32,
        count: count as u32,
        accepted: accepted as u32,
    }
}
