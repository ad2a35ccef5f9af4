//! The draft worker's loop.

use amusd_shm::{now_us, EventKind, Party, Region, Role, Spin, WorkerState};

use super::{event, take_up, track_request, verified_snapshot, Held, Next};
use super::{IDLE_POLL, PREFILL_CHUNK, RETRY};
use crate::decoder::{Decoder, Drafter};
use crate::lookup::Source;
use crate::split;
use crate::SpecError;

/// How far the draft may run ahead of the committed tokens unless told otherwise. Far enough
/// that the draft model keeps drafting while the verify model checks a long lookup run (at 8 it
/// stood idle then), and, with a draft the verify model accepts nearly always, that the verify
/// model's steps can be wide (each token of a wide step costs less); measured in the README
/// (*Defaults, measured*).
pub const DEFAULT_MAX_LOOKAHEAD: usize = 48;

/// Draft worker options.
#[derive(Clone, Debug)]
pub struct DraftOptions {
    /// Most tokens drafted beyond the committed length.
    pub max_lookahead: usize,
    /// Prompt lookup ahead of the model (`--lookup MIN-MAX`); a model spec `lookup[:MIN-MAX]`
    /// makes the lookup draft alone instead.
    pub lookup: Option<crate::lookup::NgramRange>,
    /// The longest lookup run proposed at once.
    pub lookup_max_run: usize,
    /// With the lookup ahead of the model: the n-gram history across requests too (see
    /// [`crate::history`]).
    pub history: bool,
    /// The verify model's spec, when this worker computes part of its prompts' prefill
    /// ([`crate::split`]).
    pub split_with: Option<String>,
}

/// The draft worker: drafts continuously up to `max_lookahead` tokens ahead of the committed
/// tokens, publishing each token, and rolls back when the committed tokens diverge from its draft.
/// Returns when the coordinator asks for shutdown or `alive` says it is gone.
pub fn run_draft<D: Decoder>(
    region: &Region,
    drafter: &mut Drafter<D>,
    opts: &DraftOptions,
    mut helper: Option<&mut split::Helper>,
    alive: &dyn Fn() -> bool,
) -> Result<(), SpecError> {
    if let Some(helper) = helper.as_ref() {
        region.advertise_helper(helper.fingerprint);
    }
    let role = Role::Draft;
    let mut held: Option<Held> = None;
    // Draft positions `..published` in the region equal `drafter.seq()`; the region's draft_len is
    // `region_len` (this worker is its only writer).
    let (mut published, mut region_len) = (0usize, 0usize);
    region.set_worker_state(role, WorkerState::Ready);
    loop {
        let bell = region.bell_value(Party::Draft);
        if region.shutdown_requested() || !alive() {
            return Ok(());
        }
        region.heartbeat(role);
        let next = match track_request(region, role, &mut held)? {
            None => Next::Wait(IDLE_POLL),
            Some(req) => {
                if held.is_none() {
                    if let Some(h) = take_up(region, &req)? {
                        let prompt = &h.committed[..h.prompt_len];
                        drafter.start(prompt, h.limit, h.sampling.cache_prompt)?;
                        drafter.set_request(&h.sampling, h.prompt_len)?;
                        // A rewrite from 0 also repairs an epoch left odd by a predecessor killed
                        // mid-rewrite.
                        region_len = region.draft_rewrite(h.id, 0, prompt)?;
                        published = region_len;
                        region.set_worker_request(role, h.id);
                        region.set_worker_state(role, WorkerState::Busy);
                        if let (Some(helper), Some(ops)) =
                            (helper.as_deref_mut(), drafter.decoder.split_ops())
                        {
                            split::help(region, helper, ops, prompt, h.id)?;
                        }
                        held = Some(h);
                    }
                }
                match held.as_mut() {
                    None => Next::Wait(IDLE_POLL),
                    Some(h) => {
                        draft_step(region, drafter, opts, h, &mut published, &mut region_len)?
                    }
                }
            }
        };
        if let Next::Wait(timeout) = next {
            let spin = if held.is_some() {
                Spin::DEFAULT
            } else {
                Spin::NONE
            };
            region.wait_bell_with(Party::Draft, bell, Some(timeout), spin);
        }
    }
}

fn draft_step<D: Decoder>(
    region: &Region,
    drafter: &mut Drafter<D>,
    opts: &DraftOptions,
    h: &mut Held,
    published: &mut usize,
    region_len: &mut usize,
) -> Result<Next, SpecError> {
    let status = region.worker(Role::Draft);
    let Some(snap) = verified_snapshot(region, h.committed.len())? else {
        return Ok(Next::Wait(RETRY));
    };
    if snap.request_id != h.id {
        return Ok(Next::Wait(IDLE_POLL));
    }
    h.committed.extend_from_slice(&snap.tokens);
    let before = drafter.seq().len();
    if let Some(p) = drafter.sync(&h.committed) {
        *published = (*published).min(p);
        status
            .rollbacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        region.events(Role::Draft).push(&event(
            EventKind::Rollback,
            h.id,
            now_us(),
            p,
            before - p,
            0,
        ));
    }
    let seq_len = drafter.seq().len();
    let own_stop = seq_len > h.committed.len() && h.stop.is_stop(drafter.seq()[seq_len - 1]);
    let mut worked = false;
    // How far ahead to draft is `Drafter::extend`'s to decide (a lookup run may go further).
    let wants = !h.finished() && !own_stop && seq_len < h.limit;
    // A long prompt's bulk is prefilled in chunks, one per loop iteration (each heartbeats); its
    // tail goes with the first drafted token.
    if wants && drafter.prefill_bulk(PREFILL_CHUNK)? > 0 {
        worked = true;
    } else if wants {
        let t0 = now_us();
        let (n, source) = drafter.extend(
            h.committed.len(),
            opts.max_lookahead,
            h.limit,
            &h.stop.stop_ids,
        )?;
        if n > 0 {
            let kind = match source {
                Source::Model | Source::History => EventKind::DraftToken,
                Source::Lookup => EventKind::LookupDraft,
            };
            region
                .events(Role::Draft)
                .push(&event(kind, h.id, t0, seq_len, n, 0));
            let r = std::sync::atomic::Ordering::Relaxed;
            status.steps.fetch_add(1, r);
            status.tokens.fetch_add(n as u64, r);
            worked = true;
        }
    }
    let seq = drafter.seq();
    if *published < seq.len() {
        let (tokens, sources) = (&seq[*published..], drafter.sources(*published));
        *region_len = if *region_len > *published {
            region.draft_rewrite_from(h.id, *published, tokens, &sources)?
        } else {
            region.draft_append_from(tokens, &sources)?
        };
        *published = seq.len();
    }
    Ok(if worked {
        Next::Work
    } else {
        Next::Wait(IDLE_POLL)
    })
}
