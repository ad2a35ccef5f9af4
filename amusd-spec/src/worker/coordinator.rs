//! The coordinator's side of a request.

use std::ops::ControlFlow;
use std::time::Duration;

use amusd_shm::TOKEN_CAPACITY;
use amusd_shm::{EventKind, FinishReason as ShmFinish, Party, Region, RequestSpec, Role};

use super::wire::{logprobs_of_rows, sampling_fields};
use super::SUPERVISE_EVERY;
use crate::generate::{Committer, Generation, OnTokens};
use crate::policy::{Finish, StopCriteria};
use crate::sampling::RequestSampling;
use crate::SpecError;

/// The coordinator's side of one request: submit it, stream committed tokens as they land, end it
/// when they end with a stop token or fill the budget, and wait for both workers to let go of it.
///
/// `supervise` runs every [`SUPERVISE_EVERY`] or so: the coordinator checks its workers
/// there (and restarts them); an error from it fails the request, and `Break` cancels it as
/// `on_tokens` can, but also while nothing is committed (a long prompt's prefill, where the
/// workers see the end between chunks).
pub fn run_request(
    region: &Region,
    request_id: u64,
    prompt: &[u32],
    stop: &StopCriteria,
    sampling: &RequestSampling,
    on_tokens: &mut OnTokens<'_>,
    supervise: &mut dyn FnMut(&Region) -> Result<ControlFlow<()>, SpecError>,
) -> Result<Generation, SpecError> {
    crate::generate::check_fits(TOKEN_CAPACITY, prompt.len(), stop.max_new_tokens)?;
    let max_new = u32::try_from(stop.max_new_tokens)
        .map_err(|_| SpecError::Protocol("max_new_tokens too large".into()))?;
    let cursors = [
        region.events(Role::Draft).head(),
        region.events(Role::Verify).head(),
    ];
    let mut c = Committer::new(prompt, stop, on_tokens);
    if c.done() {
        return Ok(c.finish());
    }
    region.submit_request(&RequestSpec {
        request_id,
        prompt,
        max_new_tokens: max_new,
        stop_tokens: &stop.stop_ids,
        sampling: sampling_fields(sampling),
    })?;
    let mut seen = prompt.len();
    let result = stream(region, &mut c, &mut seen, sampling, supervise);
    let reason = match (&result, c.finish) {
        (Err(_), _) => ShmFinish::Error,
        (Ok(()), Some(Finish::Stop)) => ShmFinish::Stop,
        (Ok(()), Some(Finish::Cancelled)) => ShmFinish::Cancelled,
        (Ok(()), _) => ShmFinish::Length,
    };
    let error_text = result
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    region.finish_request(request_id, reason, &error_text)?;
    result?;
    // The next request may only be submitted once neither worker writes for this one any more.
    wait_released(region, request_id, supervise)?;
    collect_metrics(region, request_id, cursors, &mut c.metrics);
    // The prompt's rows, if asked for: written before the first commit, and the workers are done.
    if let (true, Some(k)) = (sampling.prompt_logprobs, sampling.logprobs) {
        if seen > prompt.len() {
            let rows = region.read_logprobs(1, prompt.len(), 1 + k);
            c.prompt_logprobs = logprobs_of_rows(rows);
        }
    }
    Ok(c.finish())
}

/// Passes the committed tokens (and their log-probabilities) to `c` as they land, from `seen` on,
/// until they end the request or `supervise` cancels it.
fn stream(
    region: &Region,
    c: &mut Committer<'_>,
    seen: &mut usize,
    sampling: &RequestSampling,
    supervise: &mut dyn FnMut(&Region) -> Result<ControlFlow<()>, SpecError>,
) -> Result<(), SpecError> {
    // Supervise on a clock, not only when tokens stop: a dead draft worker does not stop them
    // (the verify worker steps alone), and it should still be replaced promptly.
    let mut last_check = std::time::Instant::now();
    while !c.done() {
        let bell = region.bell_value(Party::Coordinator);
        if last_check.elapsed() >= SUPERVISE_EVERY {
            if supervise(region)?.is_break() {
                c.cancel();
                break;
            }
            last_check = std::time::Instant::now();
        }
        let len = region.verified_len();
        if len > *seen {
            let tokens = region.read_verified(*seen, len);
            let logprobs = match sampling.logprobs {
                Some(k) => logprobs_of_rows(region.read_logprobs(*seen, len, 1 + k)),
                None => Vec::new(),
            };
            *seen += tokens.len();
            c.push(&tokens, &logprobs);
            continue;
        }
        region.wait_bell(Party::Coordinator, bell, Some(SUPERVISE_EVERY));
    }
    Ok(())
}

/// Waits until neither worker holds the ended request `request_id`, supervising them meanwhile.
fn wait_released(
    region: &Region,
    request_id: u64,
    supervise: &mut dyn FnMut(&Region) -> Result<ControlFlow<()>, SpecError>,
) -> Result<(), SpecError> {
    let holds = || {
        [Role::Draft, Role::Verify]
            .iter()
            .any(|&r| region.worker_request(r) == request_id)
    };
    loop {
        // The bell first, then the check: a release between the two rings it.
        let bell = region.bell_value(Party::Coordinator);
        if !holds() {
            return Ok(());
        }
        // Ended already: a cancellation here changes nothing.
        let _ = supervise(region)?;
        region.wait_bell(Party::Coordinator, bell, Some(Duration::from_millis(50)));
    }
}

/// Fills the acceptance and timing figures of a request from the workers' event rings.
fn collect_metrics(region: &Region, request_id: u64, cursors: [u64; 2], m: &mut crate::Metrics) {
    for (role, cursor) in [Role::Draft, Role::Verify].into_iter().zip(cursors) {
        let batch = region
            .events(role)
            .events_since(cursor, amusd_shm::READABLE_EVENTS);
        for e in batch.events.iter().filter(|e| e.request_id == request_id) {
            let secs = e.t_end_us.saturating_sub(e.t_start_us) as f64 * 1e-6;
            match e.kind {
                EventKind::DraftToken => m.draft_times.push(secs),
                EventKind::Rollback => m.rollbacks += 1,
                EventKind::VerifyStep | EventKind::ArStep => {
                    m.verify_times.push(secs);
                    m.verify_steps += 1;
                    m.proposed += e.count as usize;
                    m.accepted += e.accepted as usize;
                    m.accepted_per_step.push(e.accepted as usize);
                }
                EventKind::LookupVerified => {
                    m.proposed_lookup += e.count as usize;
                    m.accepted_lookup += e.accepted as usize;
                }
                EventKind::Prefill => m.cached_prompt_tokens = e.accepted as usize,
                EventKind::SplitPrefill => m.split_prompt_tokens = e.position as usize,
                EventKind::LookupDraft => {}
            }
        }
    }
}
