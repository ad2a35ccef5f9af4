//! The verify worker's loop.

use std::time::{Duration, Instant};

use amusd_shm::{now_us, EventKind, Party, Region, Role, ShmError, Spin, WorkerState};

use super::wire::logprob_rows;
use super::{event, take_up, track_request, Held, Next, IDLE_POLL, PREFILL_CHUNK};
use crate::decoder::{Decoder, Verifier};
use crate::lookup::Source;
use crate::policy::{accept, Finish};
use crate::split;
use crate::SpecError;

/// The most draft tokens one verify forward checks unless told otherwise (with
/// [`DEFAULT_MAX_LOOKAHEAD`](super::DEFAULT_MAX_LOOKAHEAD), measured together).
pub const DEFAULT_MAX_VERIFY_BATCH: usize = 32;

/// Verify worker options.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Most draft tokens checked by one forward pass.
    pub max_verify_batch: usize,
    /// When no valid draft token is there: wait this long for one before taking an autoregressive
    /// step (0: step at once). The wait is for prompt lookup's runs, so a request that turns the
    /// lookup off ([`RequestSampling::no_draft_lookup`](crate::RequestSampling::no_draft_lookup)) steps at once, as it would on workers
    /// started without lookup.
    pub wait_for_draft: Duration,
    /// The fingerprint of this worker's model ([`crate::split::fingerprint`]) when the draft
    /// worker may compute part of its prompts' prefill; `None`: it prefills alone.
    pub split: Option<u64>,
}

/// The verify worker: takes every valid draft token beyond the committed length (up to
/// `max_verify_batch`), checks them in one forward pass, commits the longest matching prefix plus its
/// own next token. With no valid draft token it follows `wait_for_draft`, then steps alone.
pub fn run_verify<D: Decoder>(
    region: &Region,
    verifier: &mut Verifier<D>,
    opts: &VerifyOptions,
    alive: &dyn Fn() -> bool,
) -> Result<(), SpecError> {
    let role = Role::Verify;
    let mut held: Option<Held> = None;
    // When the verify worker started waiting for a draft token (the `wait_for_draft` policy).
    let mut waiting_since: Option<Instant> = None;
    region.set_worker_state(role, WorkerState::Ready);
    loop {
        let bell = region.bell_value(Party::Verify);
        if region.shutdown_requested() || !alive() {
            return Ok(());
        }
        region.heartbeat(role);
        let mut next = Next::Wait(IDLE_POLL);
        if let Some(req) = track_request(region, role, &mut held)? {
            if held.is_none() {
                if let Some(mut h) = take_up(region, &req)? {
                    let prompt = &h.committed[..h.prompt_len];
                    let mut kept = verifier.start(prompt, h.limit, &h.sampling)?;
                    // Prompt scores need the verify worker's own logits at every position.
                    let own = opts.split.filter(|_| !h.sampling.prompt_logprobs);
                    let resumed = h.committed.len() > h.prompt_len;
                    let at = (h.id, h.prompt_len, kept, resumed);
                    h.split = split::offer(region, own, verifier.decoder.split_ops(), at)?;
                    if h.split.is_some() {
                        kept = 0;
                    }
                    // Marks the take-up, an instant: the prefill runs in the following steps.
                    let t0 = now_us();
                    region.set_worker_request(role, h.id);
                    region.set_worker_state(role, WorkerState::Busy);
                    region.events(role).push(&event(
                        EventKind::Prefill,
                        h.id,
                        t0,
                        0,
                        h.committed.len(),
                        kept,
                    ));
                    held = Some(h);
                    waiting_since = None;
                }
            }
            if let Some(h) = held.as_mut() {
                if !h.finished() {
                    next = verify_step(region, verifier, opts, h, &mut waiting_since)?;
                }
            }
        }
        if let Next::Wait(timeout) = next {
            let spin = if held.as_ref().is_some_and(|h| !h.finished()) {
                Spin::DEFAULT
            } else {
                Spin::NONE
            };
            region.wait_bell_with(Party::Verify, bell, Some(timeout), spin);
        }
    }
}

/// The draft's tokens after the committed ones, at most `room`, and where each came from; none
/// if the draft belongs to another request, disagrees with the committed tokens, or is being
/// rewritten. Nothing after a proposed stop token, which could not be committed.
fn candidates(
    region: &Region,
    h: &Held,
    room: usize,
) -> Result<(Vec<u32>, Vec<Source>), SpecError> {
    let v = h.committed.len();
    let (mut candidates, mut sources) = match region.read_draft(0, v + room) {
        Ok(d) if d.request_id == h.id && d.tokens.len() > v && d.tokens[..v] == h.committed[..] => {
            (d.tokens[v..].to_vec(), d.sources[v..].to_vec())
        }
        Ok(_) | Err(ShmError::Unstable { .. }) => (Vec::new(), Vec::new()),
        Err(e) => return Err(e.into()),
    };
    if let Some(i) = candidates.iter().position(|&t| h.stop.is_stop(t)) {
        candidates.truncate(i + 1);
        sources.truncate(i + 1);
    }
    Ok((candidates, sources))
}

/// One step of the verify worker on the request it holds: the next piece of the prompt's
/// prefill, or a wait for the draft, or one forward pass over the draft's candidates that commits
/// the accepted ones and the verify model's own token.
fn verify_step<D: Decoder>(
    region: &Region,
    verifier: &mut Verifier<D>,
    opts: &VerifyOptions,
    h: &mut Held,
    waiting_since: &mut Option<Instant>,
) -> Result<Next, SpecError> {
    if prefill_step(region, verifier, h)? {
        return Ok(Next::Work);
    }
    let v = h.committed.len();
    // The last chunk commits the verify model's own first token alone, as `ar` does: the first
    // token streams as soon as the prompt is in, and the draft's first run waits one step (which
    // then feeds one row more). With the run in that forward, amusd's first token came 403 ms
    // after the request on HumanEval against 376 now (12 samples, four alternating rounds), and
    // the end-to-end rate did not move beyond the machine's drift.
    let room = if v.saturating_sub(verifier.decoder.cached()) > 1 {
        0
    } else {
        // Leave room for the verify model's own token after the candidates.
        opts.max_verify_batch.min(h.limit - v - 1)
    };
    let (candidates, sources) = candidates(region, h, room)?;
    // With `room == 0` only the verify model's own token fits the budget: no draft to wait for.
    let wait = if h.sampling.no_draft_lookup {
        Duration::ZERO
    } else {
        opts.wait_for_draft
    };
    if candidates.is_empty() && room > 0 && !wait.is_zero() {
        // A deadline, not a single wait: the bell also rings for things other than a new draft
        // token (the draft's rollback rewrites, the coordinator), and those must not cut it short.
        let since = *waiting_since.get_or_insert_with(Instant::now);
        let left = wait.saturating_sub(since.elapsed());
        if !left.is_zero() {
            return Ok(Next::Wait(left));
        }
    }
    *waiting_since = None;
    let t0 = now_us();
    let verified = verifier.verify(&h.committed, &candidates)?;
    let (tokens, accepted) = accept(&candidates, &verified);
    let committed = commit(region, verifier, h, &tokens)?;
    let step = StepRecord {
        t0,
        at: v,
        sources: &sources,
        accepted,
        committed,
    };
    record_step(region, h.id, &step);
    Ok(Next::Work)
}

/// Runs the next piece of the prompt's prefill that comes before the first commit, if one is
/// left: the prompt's scores, a split prefill, or a chunk of a long prompt. `true` if it ran one.
fn prefill_step<D: Decoder>(
    region: &Region,
    verifier: &mut Verifier<D>,
    h: &mut Held,
) -> Result<bool, SpecError> {
    // The prompt's log-probabilities, if asked for: its prefill scores each token, in chunks, and
    // stores the rows at their positions, which the first commit's Release store publishes.
    if let (true, Some(k)) = (h.sampling.prompt_logprobs, h.sampling.logprobs) {
        let prompt = &h.committed[..h.prompt_len];
        let (from, rows) = verifier.prefill_scored(prompt, k, PREFILL_CHUNK)?;
        if !rows.is_empty() {
            region.store_logprobs(from, &logprob_rows(&rows, 1 + k))?;
            return Ok(true);
        }
    }
    if let Some(word) = h.split.take() {
        if let Some(ops) = verifier.decoder.split_ops() {
            let t0 = now_us();
            if split::verify_prefill(region, ops, &h.committed[..h.prompt_len], word)? {
                let job = region.split_job();
                let (from, n) = (job.split as usize, (job.end - job.split) as usize);
                let e = event(EventKind::SplitPrefill, h.id, t0, from, n, 0);
                region.events(Role::Verify).push(&e);
                return Ok(true);
            }
        }
    }
    // A long prefill runs in chunks, one per loop iteration (each heartbeats).
    let pending = h.committed.len().saturating_sub(verifier.decoder.cached());
    if pending > PREFILL_CHUNK {
        verifier.prefill(&h.committed, PREFILL_CHUNK)?;
        return Ok(true);
    }
    Ok(false)
}

/// Commits the verified `tokens` (the accepted candidates, then the verify model's own token) as
/// far as the request's stop criteria allow, with their log-probabilities if asked for. Returns
/// how many it committed.
fn commit<D: Decoder>(
    region: &Region,
    verifier: &mut Verifier<D>,
    h: &mut Held,
    tokens: &[u32],
) -> Result<usize, SpecError> {
    let v = h.committed.len();
    let (keep, finish) = h.stop.clip(v - h.prompt_len, tokens);
    // The stop token itself is committed too: the coordinator and the draft see from the buffer
    // alone that the request has ended.
    let commit_len = keep + usize::from(finish == Some(Finish::Stop));
    let commit = &tokens[..commit_len];
    let logprobs = verifier.sampler.take_logprobs();
    if let Some(k) = h.sampling.logprobs {
        let rows = logprobs.get(..commit_len).ok_or_else(|| {
            SpecError::Protocol("the verify model recorded no log-probabilities".into())
        })?;
        region.store_logprobs(v, &logprob_rows(rows, 1 + k))?;
    }
    region.publish_verified(v, commit)?;
    h.committed.extend_from_slice(commit);
    verifier.commit(h.committed.len());
    Ok(commit_len)
}

/// One verify forward, as its events and the worker's counters record it.
struct StepRecord<'a> {
    t0: u64,
    /// The committed length before the step.
    at: usize,
    /// Where each candidate came from (one per candidate).
    sources: &'a [Source],
    accepted: usize,
    committed: usize,
}

fn record_step(region: &Region, request_id: u64, s: &StepRecord<'_>) {
    let proposed = s.sources.len();
    let kind = if proposed == 0 {
        EventKind::ArStep
    } else {
        EventKind::VerifyStep
    };
    let events = region.events(Role::Verify);
    events.push(&event(kind, request_id, s.t0, s.at, proposed, s.accepted));
    let from_lookup = |s: &[Source]| s.iter().filter(|&&s| s == Source::Lookup).count();
    let lookup_proposed = from_lookup(s.sources);
    if lookup_proposed > 0 {
        let lookup_accepted = from_lookup(&s.sources[..s.accepted]);
        let e = event(
            EventKind::LookupVerified,
            request_id,
            s.t0,
            s.at,
            lookup_proposed,
            lookup_accepted,
        );
        events.push(&e);
    }
    let status = region.worker(Role::Verify);
    let r = std::sync::atomic::Ordering::Relaxed;
    status.steps.fetch_add(1, r);
    status.tokens.fetch_add(s.committed as u64, r);
    status.proposed.fetch_add(proposed as u64, r);
    status.accepted.fetch_add(s.accepted as u64, r);
}
