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

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use amusd_shm::{
    now_us, EventKind, EventRecord, FinishReason as ShmFinish, Party, Region, RequestSpec,
    RequestState, Role, SamplingFields, ShmError, Spin, WorkerState, TOKEN_CAPACITY,
};

use crate::constraint::{Grammar, GrammarKind};
use crate::decoder::{Decoder, Drafter, Verifier};
use crate::generate::{Committer, Generation, OnTokens};
use crate::logprobs::{Logprobs, TokenLogprob};
use crate::lookup::Source;
use crate::policy::{accept, Finish, StopCriteria};
use crate::sampling::{RequestSampling, SamplingParams};
use crate::split;
use crate::SpecError;

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

/// The region's form of a request's sampling.
pub fn sampling_fields(s: &RequestSampling) -> SamplingFields {
    let p = &s.params;
    SamplingFields {
        seed: p.seed,
        temperature_bits: p.temperature.to_bits(),
        dynatemp_range_bits: p.dynatemp_range.to_bits(),
        dynatemp_exponent_bits: p.dynatemp_exponent.to_bits(),
        top_k: p.top_k,
        top_p_bits: p.top_p.to_bits(),
        min_p_bits: p.min_p.to_bits(),
        top_n_sigma_bits: p.top_n_sigma.to_bits(),
        typical_p_bits: p.typical_p.to_bits(),
        xtc_probability_bits: p.xtc_probability.to_bits(),
        xtc_threshold_bits: p.xtc_threshold.to_bits(),
        dry_multiplier_bits: p.dry.multiplier.to_bits(),
        dry_base_bits: p.dry.base.to_bits(),
        dry_allowed_length: p.dry.allowed_length,
        dry_last_n: p.dry.last_n,
        dry_breakers: p.dry.breakers.clone(),
        repeat_penalty_bits: p.penalties.repeat.to_bits(),
        frequency_penalty_bits: p.penalties.frequency.to_bits(),
        presence_penalty_bits: p.penalties.presence.to_bits(),
        penalty_last_n: p.penalties.last_n,
        greedy_draft: s.greedy_draft,
        no_draft_lookup: s.no_draft_lookup,
        cache_prompt: s.cache_prompt,
        logit_bias: (p.logit_bias.entries().iter())
            .map(|&(token, bias)| (token, bias.to_bits()))
            .collect(),
        logprobs: s
            .logprobs
            .map_or(0, |k| 1 + k.min(crate::logprobs::MAX_TOP) as u32),
        prompt_logprobs: s.prompt_logprobs,
        grammar_kind: s.grammar.as_ref().map_or(0, |g| g.kind.code()),
        grammar: s
            .grammar
            .as_ref()
            .map_or_else(String::new, |g| g.text.clone()),
    }
}

/// A request's sampling from the region's fields, validated (the coordinator validated them, so an
/// error here means a corrupt region).
pub fn sampling_of(f: &SamplingFields) -> Result<RequestSampling, SpecError> {
    let params = SamplingParams {
        temperature: f32::from_bits(f.temperature_bits),
        dynatemp_range: f32::from_bits(f.dynatemp_range_bits),
        dynatemp_exponent: f32::from_bits(f.dynatemp_exponent_bits),
        top_k: f.top_k,
        top_p: f32::from_bits(f.top_p_bits),
        min_p: f32::from_bits(f.min_p_bits),
        top_n_sigma: f32::from_bits(f.top_n_sigma_bits),
        typical_p: f32::from_bits(f.typical_p_bits),
        xtc_probability: f32::from_bits(f.xtc_probability_bits),
        xtc_threshold: f32::from_bits(f.xtc_threshold_bits),
        seed: f.seed,
        penalties: crate::Penalties {
            repeat: f32::from_bits(f.repeat_penalty_bits),
            frequency: f32::from_bits(f.frequency_penalty_bits),
            presence: f32::from_bits(f.presence_penalty_bits),
            last_n: f.penalty_last_n,
        },
        logit_bias: crate::LogitBias::new(
            (f.logit_bias.iter()).map(|&(token, bias)| (token, f32::from_bits(bias))),
        )?,
        dry: crate::Dry {
            multiplier: f32::from_bits(f.dry_multiplier_bits),
            base: f32::from_bits(f.dry_base_bits),
            allowed_length: f.dry_allowed_length,
            last_n: f.dry_last_n,
            breakers: f.dry_breakers.clone(),
        },
    }
    .validate()?;
    Ok(RequestSampling {
        params,
        greedy_draft: f.greedy_draft,
        no_draft_lookup: f.no_draft_lookup,
        cache_prompt: f.cache_prompt,
        logprobs: (f.logprobs > 0).then(|| (f.logprobs - 1) as usize),
        prompt_logprobs: f.prompt_logprobs,
        grammar: match f.grammar_kind {
            0 => None,
            code => Some(Grammar::new(
                GrammarKind::from_code(code).ok_or_else(|| {
                    SpecError::Protocol(format!("unknown grammar kind {code} in the region"))
                })?,
                f.grammar.clone(),
            )),
        },
    })
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

/// How far the draft may run ahead of the committed tokens unless told otherwise. Far enough
/// that the draft model keeps drafting while the verify model checks a long lookup run (at 8 it
/// stood idle then), and, with a draft the verify model accepts nearly always, that the verify
/// model's steps can be wide (each token of a wide step costs less); measured in the README
/// (*Defaults, measured*).
pub const DEFAULT_MAX_LOOKAHEAD: usize = 48;

/// The most draft tokens one verify forward checks unless told otherwise (with
/// [`DEFAULT_MAX_LOOKAHEAD`], measured together).
pub const DEFAULT_MAX_VERIFY_BATCH: usize = 32;

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

/// Verify worker options.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Most draft tokens checked by one forward pass.
    pub max_verify_batch: usize,
    /// When no valid draft token is there: wait this long for one before taking an autoregressive
    /// step (0: step at once). The wait is for prompt lookup's runs, so a request that turns the
    /// lookup off ([`RequestSampling::no_draft_lookup`]) steps at once, as it would on workers
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

fn verify_step<D: Decoder>(
    region: &Region,
    verifier: &mut Verifier<D>,
    opts: &VerifyOptions,
    h: &mut Held,
    waiting_since: &mut Option<Instant>,
) -> Result<Next, SpecError> {
    let v = h.committed.len();
    // The prompt's log-probabilities, if asked for: its prefill scores each token, in chunks, and
    // stores the rows at their positions, which the first commit's Release store publishes.
    if let (true, Some(k)) = (h.sampling.prompt_logprobs, h.sampling.logprobs) {
        let prompt = &h.committed[..h.prompt_len];
        let (from, rows) = verifier.prefill_scored(prompt, k, PREFILL_CHUNK)?;
        if !rows.is_empty() {
            region.store_logprobs(from, &logprob_rows(&rows, 1 + k))?;
            return Ok(Next::Work);
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
                return Ok(Next::Work);
            }
        }
    }
    // A long prefill runs in chunks, one per loop iteration (each heartbeats).
    let pending = v.saturating_sub(verifier.decoder.cached());
    if pending > PREFILL_CHUNK {
        verifier.prefill(&h.committed, PREFILL_CHUNK)?;
        return Ok(Next::Work);
    }
    // The last chunk commits the verify model's own first token alone, as `ar` does: the first
    // token streams as soon as the prompt is in, and the draft's first run waits one step (which
    // then feeds one row more). With the run in that forward, amusd's first token came 403 ms
    // after the request on HumanEval against 376 now (12 samples, four alternating rounds), and
    // the end-to-end rate did not move beyond the machine's drift.
    let room = if pending > 1 {
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
    let (tokens, n_accepted) = accept(&candidates, &verified);
    let (keep, finish) = h.stop.clip(v - h.prompt_len, &tokens);
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
    let kind = if candidates.is_empty() {
        EventKind::ArStep
    } else {
        EventKind::VerifyStep
    };
    let events = region.events(Role::Verify);
    events.push(&event(kind, h.id, t0, v, candidates.len(), n_accepted));
    let from_lookup = |s: &[Source]| s.iter().filter(|&&s| s == Source::Lookup).count();
    let lookup_proposed = from_lookup(&sources);
    if lookup_proposed > 0 {
        let lookup_accepted = from_lookup(&sources[..n_accepted]);
        events.push(&event(
            EventKind::LookupVerified,
            h.id,
            t0,
            v,
            lookup_proposed,
            lookup_accepted,
        ));
    }
    let status = region.worker(Role::Verify);
    let r = std::sync::atomic::Ordering::Relaxed;
    status.steps.fetch_add(1, r);
    status.tokens.fetch_add(commit.len() as u64, r);
    status.proposed.fetch_add(candidates.len() as u64, r);
    status.accepted.fetch_add(n_accepted as u64, r);
    Ok(Next::Work)
}

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
    let result = (|| -> Result<(), SpecError> {
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
            if len > seen {
                let tokens = region.read_verified(seen, len);
                let logprobs = match sampling.logprobs {
                    Some(k) => logprobs_of_rows(region.read_logprobs(seen, len, 1 + k)),
                    None => Vec::new(),
                };
                seen += tokens.len();
                c.push(&tokens, &logprobs);
                continue;
            }
            region.wait_bell(Party::Coordinator, bell, Some(SUPERVISE_EVERY));
        }
        Ok(())
    })();
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
    while [Role::Draft, Role::Verify]
        .iter()
        .any(|&r| region.worker_request(r) == request_id)
    {
        let bell = region.bell_value(Party::Coordinator);
        if [Role::Draft, Role::Verify]
            .iter()
            .all(|&r| region.worker_request(r) != request_id)
        {
            break;
        }
        // Ended already: a cancellation here changes nothing.
        let _ = supervise(region)?;
        region.wait_bell(Party::Coordinator, bell, Some(Duration::from_millis(50)));
    }
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

/// Marks a slot of a log-probability row past its alternatives (a vocabulary smaller than the
/// `k` asked for): not a token id.
const NO_TOKEN: u32 = u32::MAX;

/// Log-probabilities as the region's rows carry them ([`amusd_shm::LogprobBuffer`]), `width`
/// entries each (padded with [`NO_TOKEN`]).
fn logprob_rows(logprobs: &[Logprobs], width: usize) -> Vec<Vec<(u32, u32)>> {
    let entry = |t: &TokenLogprob| (t.token, t.logprob.to_bits());
    (logprobs.iter())
        .map(|l| {
            let mut row: Vec<_> = std::iter::once(&l.chosen)
                .chain(&l.top)
                .map(entry)
                .collect();
            row.resize(width.max(row.len()), (NO_TOKEN, 0));
            row
        })
        .collect()
}

/// [`logprob_rows`]' inverse.
fn logprobs_of_rows(rows: Vec<Vec<(u32, u32)>>) -> Vec<Logprobs> {
    let entry = |&(token, bits): &(u32, u32)| TokenLogprob {
        token,
        logprob: f32::from_bits(bits),
    };
    (rows.iter())
        .filter_map(|row| {
            let (chosen, top) = row.split_first()?;
            Some(Logprobs {
                chosen: entry(chosen),
                top: (top.iter())
                    .take_while(|e| e.0 != NO_TOKEN)
                    .map(entry)
                    .collect(),
            })
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeDecoder, FakeModel};
    use crate::generate::autoregressive;
    use rand::{Rng, SeedableRng};
    use std::ops::ControlFlow;
    use std::sync::Arc;

    /// Greedy half of the time, otherwise sampling with random filters and seed; the draft's
    /// prompt lookup off for a quarter of the requests; the previous request's cache kept for
    /// half of them.
    fn random_sampling(rng: &mut rand::rngs::StdRng) -> crate::RequestSampling {
        let (no_draft_lookup, cache_prompt) = (rng.gen_bool(0.25), rng.gen_bool(0.5));
        let logprobs = rng
            .gen_bool(0.3)
            .then(|| rng.gen_range(0..=crate::logprobs::MAX_TOP));
        let prompt_logprobs = logprobs.is_some() && rng.gen_bool(0.5);
        let penalties = match rng.gen_bool(0.3) {
            true => crate::Penalties {
                repeat: rng.gen_range(0.8..1.5),
                frequency: rng.gen_range(-0.5..0.5),
                presence: rng.gen_range(-0.5..0.5),
                last_n: [8, 64, u32::MAX][rng.gen_range(0..3)],
            },
            false => crate::Penalties::OFF,
        };
        let logit_bias = match rng.gen_bool(0.3) {
            true => crate::LogitBias::new(
                (0..rng.gen_range(1..6))
                    .map(|i| (i * 11 + rng.gen_range(0..11), rng.gen_range(-12.0..12.0))),
            )
            .unwrap(),
            false => crate::LogitBias::NONE,
        };
        let dry = match rng.gen_bool(0.3) {
            true => crate::Dry {
                multiplier: rng.gen_range(0.1..3.0),
                allowed_length: rng.gen_range(0..4),
                last_n: [u32::MAX, 20][rng.gen_range(0..2)],
                breakers: crate::Dry::breaker_bits((0..3).map(|_| rng.gen_range(0..64))),
                ..crate::Dry::OFF
            },
            false => crate::Dry::OFF,
        };
        // The fake grammar (crate::constraint::fake), ending with the fake models' eos, 0.
        let grammar = rng.gen_bool(0.3).then(|| {
            crate::constraint::fake::grammar(rng.gen_range(1..4), rng.gen_range(0..60), 0)
        });
        if rng.gen_bool(0.5) {
            return crate::RequestSampling {
                params: crate::SamplingParams {
                    penalties,
                    logit_bias,
                    dry,
                    ..crate::SamplingParams::GREEDY
                },
                no_draft_lookup,
                cache_prompt,
                logprobs,
                prompt_logprobs,
                grammar,
                ..Default::default()
            };
        }
        crate::RequestSampling {
            params: crate::SamplingParams {
                temperature: [0.3, 0.7, 1.0, 1.5][rng.gen_range(0..4)],
                dynatemp_range: [0.0, 0.0, 0.5][rng.gen_range(0..3)],
                dynatemp_exponent: rng.gen_range(0.5..2.0),
                top_k: if rng.gen_bool(0.5) {
                    0
                } else {
                    rng.gen_range(1..30)
                },
                top_p: if rng.gen_bool(0.5) {
                    1.0
                } else {
                    rng.gen_range(0.3..1.0)
                },
                min_p: if rng.gen_bool(0.5) {
                    0.0
                } else {
                    rng.gen_range(0.0..0.3)
                },
                top_n_sigma: [0.0, 0.0, 1.0, 2.5][rng.gen_range(0..4)],
                typical_p: if rng.gen_bool(0.7) {
                    1.0
                } else {
                    rng.gen_range(0.2..1.0)
                },
                xtc_probability: if rng.gen_bool(0.7) {
                    0.0
                } else {
                    rng.gen_range(0.0..=1.0)
                },
                xtc_threshold: rng.gen_range(0.0..0.6),
                seed: rng.gen(),
                penalties,
                logit_bias,
                dry,
            },
            greedy_draft: rng.gen_bool(0.2),
            no_draft_lookup,
            cache_prompt,
            logprobs,
            prompt_logprobs,
            grammar,
        }
    }

    fn fake_constraints() -> Option<Arc<dyn crate::constraint::Constraints>> {
        Some(Arc::new(crate::constraint::fake::FakeConstraints))
    }

    /// The next request's prompt: random, or half of the time the previous prompt and answer
    /// (cut at a random point, as a turn of conversation may re-tokenize differently) and a few
    /// new tokens, so that the workers' prompt caches have a prefix to keep.
    fn next_prompt(
        rng: &mut rand::rngs::StdRng,
        previous: &[u32],
        max_prompt: usize,
        vocab: u32,
    ) -> Vec<u32> {
        let mut prompt = if rng.gen_bool(0.5) && !previous.is_empty() {
            previous[..rng.gen_range(1..=previous.len())].to_vec()
        } else {
            Vec::new()
        };
        let plen = rng.gen_range(1..max_prompt);
        prompt.extend((0..plen).map(|_| rng.gen_range(0..vocab)));
        prompt
    }

    /// Both workers as threads over one in-process region, fake models, many requests with heavy
    /// rollback and random limits: every committed sequence must equal autoregressive decoding.
    fn run_protocol(requests: usize, seed: u64, us: u64) -> crate::Metrics {
        run_protocol_with(requests, seed, us, 40)
    }

    fn run_protocol_with(requests: usize, seed: u64, us: u64, max_prompt: usize) -> crate::Metrics {
        run_protocol_lookup(requests, seed, us, max_prompt, None)
    }

    /// How a protocol test drafts with prompt lookup: alone or ahead of the model, and whether
    /// the text repeats itself (the fake models' `pos=0`).
    #[derive(Clone, Copy)]
    struct LookupSetup {
        alone: bool,
        repeating: bool,
        max_run: usize,
    }

    fn run_protocol_lookup(
        requests: usize,
        seed: u64,
        us: u64,
        max_prompt: usize,
        lookup: Option<LookupSetup>,
    ) -> crate::Metrics {
        let region: Arc<Region> = Arc::from(Region::new_boxed());
        let repeating = lookup.is_some_and(|l| l.repeating);
        let truth = FakeModel {
            seed,
            // Repeating text runs longer, so that it has time to repeat.
            eos_every: if repeating { 400 } else { 50 },
            us_per_token: us,
            positional: !repeating,
            // Small enough that text repeats soon, with errors breaking long runs.
            vocab: if repeating { 8 } else { 512 },
            err: if repeating { 0.03 } else { 0.0 },
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let err: f64 = rng.gen_range(0.0..0.9);
        let draft_model = FakeModel {
            err,
            us_per_token: us / 2,
            ..truth.clone()
        };
        let (max_lookahead, max_batch) = (rng.gen_range(1..12), rng.gen_range(1..12));
        let wait = Duration::from_micros(if rng.gen_bool(0.5) { 0 } else { 300 });
        let threads = {
            let (r1, r2) = (region.clone(), region.clone());
            let vt = truth.clone();
            [
                std::thread::spawn(move || {
                    let decoder: Box<dyn Decoder> = match lookup {
                        Some(l) if l.alone => Box::new(crate::lookup::NoModel),
                        _ => Box::new(FakeDecoder::new(draft_model)),
                    };
                    let mut d = Drafter::new(decoder).with_constraints(fake_constraints());
                    if let Some(l) = lookup {
                        // On repeating text a 3-token suffix decides what follows (the fake
                        // model's context): matches are right but where errors break them.
                        let min = if l.repeating { 3 } else { 2 };
                        let range = crate::lookup::NgramRange { min, max: 4 };
                        d = d.with_lookup(range, l.alone, l.max_run);
                        // Runs are checked whatever the fake forwards' sleeps measure.
                        d = d.with_forward_cost(crate::run_worth::ForwardCost::Fixed(0.25));
                        // The history learns across the requests, as in a worker.
                        d = d.with_history(crate::history::NgramHistory::new(12));
                    }
                    let opts = DraftOptions {
                        max_lookahead,
                        lookup: None,
                        lookup_max_run: 16,
                        history: false,
                        split_with: None,
                    };
                    run_draft(&r1, &mut d, &opts, None, &|| true).unwrap();
                }),
                std::thread::spawn(move || {
                    let mut v =
                        Verifier::new(FakeDecoder::new(vt)).with_constraints(fake_constraints());
                    let opts = VerifyOptions {
                        max_verify_batch: max_batch,
                        wait_for_draft: wait,
                        split: None,
                    };
                    run_verify(&r2, &mut v, &opts, &|| true).unwrap();
                }),
            ]
        };
        let mut reference = Verifier::new(FakeDecoder::new(FakeModel {
            us_per_token: 0,
            ..truth.clone()
        }))
        .with_constraints(fake_constraints());
        let mut total = crate::Metrics::default();
        let mut previous = Vec::new();
        for i in 0..requests {
            let prompt = next_prompt(&mut rng, &previous, max_prompt, truth.vocab);
            let stop = StopCriteria {
                stop_ids: vec![truth.eos],
                max_new_tokens: rng.gen_range(0..120),
            };
            let sampling = random_sampling(&mut rng);
            let want = autoregressive(&mut reference, &prompt, &stop, &sampling, &mut |_, _| {
                ControlFlow::Continue(())
            })
            .unwrap();
            let mut streamed = Vec::new();
            let got = run_request(
                &region,
                i as u64 + 1,
                &prompt,
                &stop,
                &sampling,
                &mut |t, _| {
                    streamed.extend_from_slice(t);
                    ControlFlow::Continue(())
                },
                &mut |_| Ok(ControlFlow::Continue(())),
            )
            .unwrap();
            assert_eq!(
                got.tokens, want.tokens,
                "request {i} (err {err}, lookahead {max_lookahead}, batch {max_batch})"
            );
            assert_eq!(streamed, want.tokens);
            assert_eq!(got.finish, want.finish);
            // Through the region, bit for bit ar's (one per token, when asked for).
            assert_eq!(got.logprobs, want.logprobs, "request {i}");
            assert_eq!(got.prompt_logprobs, want.prompt_logprobs, "request {i}");
            // A request that generates nothing runs no model.
            let scored =
                sampling.prompt_logprobs && sampling.logprobs.is_some() && stop.max_new_tokens > 0;
            assert_eq!(
                got.prompt_logprobs.len(),
                (prompt.len() - 1) * usize::from(scored)
            );
            let asked = sampling.logprobs.is_some();
            assert_eq!(got.logprobs.len(), got.tokens.len() * usize::from(asked));
            let m = &got.metrics;
            assert!(m.accepted_lookup <= m.proposed_lookup && m.accepted_lookup <= m.accepted);
            assert!(m.cached_prompt_tokens < prompt.len(), "request {i}: {m:?}");
            assert!(
                sampling.cache_prompt || m.cached_prompt_tokens == 0,
                "request {i}"
            );
            previous = [prompt, got.tokens.clone()].concat();
            if sampling.no_draft_lookup && lookup.is_some_and(|l| !l.alone) {
                assert_eq!(m.proposed_lookup, 0, "request {i} turned the lookup off");
            }
            total.proposed += m.proposed;
            total.accepted += m.accepted;
            total.proposed_lookup += m.proposed_lookup;
            total.accepted_lookup += m.accepted_lookup;
            total.new_tokens += m.new_tokens;
            total.verify_steps += m.verify_steps;
            total.cached_prompt_tokens += m.cached_prompt_tokens;
        }
        region.request_shutdown();
        for t in threads {
            t.join().unwrap();
        }
        total
    }

    /// Both workers, as threads, on a fake model slow enough (5 ms a token, a 64-position
    /// prefill chunk ~85 ms) that the coordinator looks at a request long before its first
    /// commit, and the first commit comes long before the budget is filled, however loaded the
    /// machine.
    struct SlowPair {
        region: Arc<Region>,
        truth: FakeModel,
        threads: [std::thread::JoinHandle<()>; 2],
    }

    impl SlowPair {
        fn start() -> Self {
            let region: Arc<Region> = Arc::from(Region::new_boxed());
            let truth = FakeModel {
                us_per_token: 5000,
                ..Default::default()
            };
            let (r1, r2, t1, t2) = (region.clone(), region.clone(), truth.clone(), truth.clone());
            let threads = [
                std::thread::spawn(move || {
                    let mut d = Drafter::new(FakeDecoder::new(t1));
                    let opts = DraftOptions {
                        max_lookahead: 4,
                        lookup: None,
                        lookup_max_run: 16,
                        history: false,
                        split_with: None,
                    };
                    run_draft(&r1, &mut d, &opts, None, &|| true).unwrap();
                }),
                std::thread::spawn(move || {
                    let mut v = Verifier::new(FakeDecoder::new(t2));
                    let opts = VerifyOptions {
                        max_verify_batch: 4,
                        wait_for_draft: Duration::ZERO,
                        split: None,
                    };
                    run_verify(&r2, &mut v, &opts, &|| true).unwrap();
                }),
            ];
            Self {
                region,
                truth,
                threads,
            }
        }

        /// Request `id`, greedy, with no stop token and a budget of `max_new_tokens`.
        fn run(
            &self,
            id: u64,
            prompt: &[u32],
            max_new_tokens: usize,
            on_tokens: &mut OnTokens<'_>,
            supervise: &mut dyn FnMut(&Region) -> Result<ControlFlow<()>, SpecError>,
        ) -> Generation {
            let stop = StopCriteria {
                stop_ids: Vec::new(),
                max_new_tokens,
            };
            let sampling = crate::RequestSampling::default();
            run_request(
                &self.region,
                id,
                prompt,
                &stop,
                &sampling,
                on_tokens,
                supervise,
            )
            .unwrap()
        }

        fn stop(self) {
            self.region.request_shutdown();
            for t in self.threads {
                t.join().unwrap();
            }
        }
    }

    #[test]
    fn a_cancelled_request_ends_and_the_next_one_is_served() {
        let pair = SlowPair::start();
        let mut go_on = |_: &Region| Ok(ControlFlow::Continue(()));
        let prompt = [5, 6, 7];
        let cancelled = pair.run(
            1,
            &prompt,
            200,
            &mut |_, _| ControlFlow::Break(()),
            &mut go_on,
        );
        assert_eq!(cancelled.finish, Finish::Cancelled);
        assert!(!cancelled.tokens.is_empty() && cancelled.tokens.len() < 200);
        assert_eq!(
            pair.region.read_request().unwrap().finish_reason,
            ShmFinish::Cancelled
        );
        let full = pair.run(
            2,
            &prompt,
            10,
            &mut |_, _| ControlFlow::Continue(()),
            &mut go_on,
        );
        assert_eq!(full.finish, Finish::Length);
        let n = full.tokens.len().min(cancelled.tokens.len());
        assert_eq!(full.tokens[..n], cancelled.tokens[..n]);
        pair.stop();
    }

    /// A request cancelled by `supervise` while its long prompt is prefilled (nothing committed
    /// yet, so the token callback never runs) ends as cancelled with no token, the workers drop
    /// it between prefill chunks, and the next request is served exactly.
    #[test]
    fn a_request_cancelled_during_its_prefill_ends_there() {
        let pair = SlowPair::start();
        let mut go_on = |_: &[u32], _: &[Logprobs]| ControlFlow::Continue(());
        // Sixteen chunks: the first supervision, 20 ms in, comes long before the first commit.
        let long: Vec<u32> = (0..16 * PREFILL_CHUNK as u32).map(|i| i % 50 + 3).collect();
        let mut cancel = |_: &Region| Ok(ControlFlow::Break(()));
        let cancelled = pair.run(1, &long, 8, &mut go_on, &mut cancel);
        assert_eq!(
            (cancelled.finish, cancelled.tokens.len()),
            (Finish::Cancelled, 0)
        );
        let prompt = [5, 6, 7];
        let stop = StopCriteria {
            stop_ids: Vec::new(),
            max_new_tokens: 8,
        };
        let mut reference = Verifier::new(FakeDecoder::new(pair.truth.clone()));
        let sampling = crate::RequestSampling::default();
        let want = autoregressive(&mut reference, &prompt, &stop, &sampling, &mut go_on).unwrap();
        let got = pair.run(2, &prompt, 8, &mut go_on, &mut |_| {
            Ok(ControlFlow::Continue(()))
        });
        assert_eq!(got.tokens, want.tokens);
        pair.stop();
    }

    /// Half of the prompts continue the previous request's (the protocol test's `next_prompt`),
    /// and half of the requests keep the cached prefix: the verify worker then prefills only the
    /// rest, and every request still commits exactly the autoregressive tokens.
    #[test]
    fn workers_commit_exactly_the_autoregressive_tokens() {
        let mut cached = 0;
        for seed in 0..8 {
            cached += run_protocol(150, seed, 0).cached_prompt_tokens;
        }
        assert!(cached > 1000, "only {cached} prompt tokens found cached");
    }

    #[test]
    fn workers_with_prompt_lookup_commit_exactly_the_autoregressive_tokens() {
        for (k, seed) in (300..306).enumerate() {
            let setup = LookupSetup {
                alone: k % 2 == 0,
                repeating: k % 3 != 2,
                max_run: 4 + 6 * k,
            };
            let m = run_protocol_lookup(60, seed, 0, 40, Some(setup));
            if setup.alone {
                assert_eq!(m.proposed_lookup, m.proposed, "no model, no model tokens");
            }
        }
    }

    /// Text that repeats itself, broken by the verify model's errors: the lookup drafts long runs,
    /// many right, some wrong part-way (long wrong runs), and the workers still commit exactly
    /// the autoregressive tokens. Ahead of a model, the model checks each run first, so wrong ones
    /// reach the verify worker only where the draft model errs with the lookup.
    #[test]
    fn workers_survive_long_wrong_lookup_runs() {
        for alone in [true, false] {
            let setup = LookupSetup {
                alone,
                repeating: true,
                max_run: 32,
            };
            let m = run_protocol_lookup(40, 400, 20, 40, Some(setup));
            let wasted = m.proposed_lookup - m.accepted_lookup;
            // Both kinds of run happened (how many of each depends on how far ahead the draft
            // thread got, which a loaded machine changes); exactness is checked inside.
            assert!(m.accepted_lookup > 0, "no accepted lookup tokens: {m:?}");
            assert!(!alone || wasted > 0, "no rejected lookup tokens: {m:?}");
        }
    }

    #[test]
    fn long_prompts_prefilled_in_chunks_commit_exactly() {
        for seed in 200..203 {
            run_protocol_with(20, seed, 0, 4 * PREFILL_CHUNK);
        }
    }

    #[test]
    fn a_coordinator_stalled_mid_update_is_waited_out() {
        let region = Region::new_boxed();
        region
            .submit_request(&RequestSpec {
                request_id: 3,
                prompt: &[1, 2, 3],
                max_new_tokens: 4,
                stop_tokens: &[],
                sampling: Default::default(),
            })
            .unwrap();
        let req = region.read_request().unwrap();
        // The coordinator descheduled inside a seqlock write: the word stays odd past the budget.
        let word = &region.control.request_word;
        word.fetch_add(1, std::sync::atomic::Ordering::Release);
        assert!(matches!(take_up(&region, &req), Ok(None)));
        word.fetch_add(1, std::sync::atomic::Ordering::Release);
        let held = take_up(&region, &req)
            .unwrap()
            .expect("taken up once stable");
        assert_eq!(held.committed, vec![1, 2, 3]);
    }

    #[test]
    fn workers_commit_exactly_with_simulated_compute() {
        for seed in 100..103 {
            run_protocol(30, seed, 40);
        }
    }
}
