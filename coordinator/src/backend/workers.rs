//! `amusd`: the two worker processes, loaded once, serving requests one after another through the
//! shared-memory region.

use std::ops::ControlFlow;
use std::time::Duration;

use amusd_shm::{now_us, Role, READABLE_EVENTS};
use amusd_spec::generate::OnTokens;
use amusd_spec::logprobs::Logprobs;
use amusd_spec::worker::run_request;
use amusd_spec::SpecError;
use anyhow::Result;

use super::chaos::Chaos;
use super::trace::Trace;
use super::{Completion, Request};
use crate::args::ModelArgs;
use crate::output::Spinner;
use crate::supervisor::{Policy, Supervisor, WorkerSpec};

/// The draft worker's options: its lookahead, and prompt lookup (with the n-gram history) ahead of
/// its model if asked (a draft spec `lookup[:MIN-MAX]` makes the lookup draft alone).
fn draft_args(m: &ModelArgs) -> Vec<String> {
    let mut args = vec![
        "--max-lookahead".into(),
        m.max_lookahead.to_string(),
        "--lookup-max-run".into(),
        m.lookup_max_run.to_string(),
    ];
    if let Some(range) = m.lookup_ahead() {
        args.extend(["--lookup".into(), range.to_string()]);
        if m.draft_history() {
            args.push("--history".into());
        }
    }
    args
}

/// Both workers, loaded once, serving requests one after another.
pub struct Workers {
    sup: Supervisor,
    next_id: u64,
    chaos: Option<Chaos>,
}

/// What went wrong with the workers over the backend's life, and how fast it recovered.
pub struct FaultStats {
    pub injected: u32,
    pub restarts: u32,
    pub worst_recovery: Option<Duration>,
}

impl Workers {
    /// Starts both workers and waits until their models are loaded. A command line that wants
    /// Ctrl-C to stop them cleanly installs [`crate::supervisor::install_signal_handlers`] first.
    pub fn start(m: &ModelArgs, verify_spec: &str, draft_spec: &str) -> Result<Self> {
        let split = m.split_prefill(verify_spec, draft_spec);
        let mut draft_extra = draft_args(m);
        let mut verify_extra = vec![
            "--max-verify-batch".into(),
            m.max_verify_batch.to_string(),
            "--verify-wait-us".into(),
            m.verify_wait_us().to_string(),
        ];
        if split {
            draft_extra.extend(["--split-prefill-with".into(), verify_spec.to_string()]);
            verify_extra.push("--split-prefill".into());
        }
        let specs = vec![
            WorkerSpec {
                role: Role::Draft,
                model: draft_spec.to_string(),
                device: m.draft_device()?,
                extra_args: draft_extra,
            },
            WorkerSpec {
                role: Role::Verify,
                model: verify_spec.to_string(),
                device: m.verify_device()?,
                extra_args: verify_extra,
            },
        ];
        let policy = Policy {
            load_timeout: Duration::from_secs(m.load_timeout_s),
            hang_timeout: Duration::from_millis(m.hang_timeout_ms),
            max_restarts: m.max_restarts,
        };
        let mut sup = Supervisor::start(specs, policy, m.worker_dir.as_deref())?;
        {
            let _spinner =
                (!m.quiet).then(|| Spinner::new("loading the draft and verify workers".into()));
            sup.wait_ready()?;
        }
        let chaos = m
            .chaos
            .map(|seed| Chaos::new(seed, m.chaos_faults, m.chaos_rate, m.chaos_signal));
        Ok(Self {
            sup,
            next_id: 1,
            chaos,
        })
    }

    /// Between requests: restarts a worker that died while idle, and one whose restarts ran out
    /// a while ago (a long-running server calls it).
    pub fn check_idle(&mut self) -> Result<()> {
        self.sup.revive(false)?;
        self.sup.check(false)
    }

    /// Why a worker is down until the next request or idle check starts it again, if one is.
    pub fn down(&self) -> Option<&str> {
        self.sup.given_up()
    }

    pub fn fault_stats(&self) -> FaultStats {
        FaultStats {
            injected: self.chaos.as_ref().map_or(0, |c| c.injected),
            restarts: self.sup.restarts,
            worst_recovery: self.sup.worst_recovery,
        }
    }

    /// One request, with the workers' events read back from the region's rings.
    pub(super) fn generate(
        &mut self,
        request: &Request<'_>,
        on_tokens: &mut OnTokens<'_>,
    ) -> Result<Completion> {
        let id = self.next_id;
        self.next_id += 1;
        self.sup.revive(true)?;
        let shm = self.sup.shm_handle();
        let region = shm.region();
        let cursors = [Role::Draft, Role::Verify].map(|r| (r, region.events(r).head()));
        let mut commits = Vec::new();
        let start = now_us();
        let mut on_tokens = |ids: &[u32], logprobs: &[Logprobs]| {
            commits.push((now_us().saturating_sub(start), ids.len()));
            on_tokens(ids, logprobs)
        };
        let (sup, chaos) = (&mut self.sup, &mut self.chaos);
        let mut left = chaos.as_ref().map_or(0, |c| c.faults());
        let cancelled = request.cancelled;
        let mut supervise = |_: &amusd_shm::Region| {
            if let Some(c) = chaos.as_mut() {
                c.maybe_strike(sup, &mut left);
            }
            sup.check(true)
                .map_err(|e| SpecError::Protocol(format!("{e:#}")))?;
            Ok(match cancelled.is_some_and(|c| c()) {
                true => ControlFlow::Break(()),
                false => ControlFlow::Continue(()),
            })
        };
        let generation = run_request(
            region,
            id,
            request.prompt,
            request.stop,
            request.sampling,
            &mut on_tokens,
            &mut supervise,
        );
        self.sup.request_ended(generation.is_ok());
        let generation = generation?;
        let mut trace = Trace {
            commits,
            ..Default::default()
        };
        // `run_request` returns only once both workers have let go of the request, so everything
        // since the cursors belongs to it: the ring holds no event of a later request yet.
        for (role, cursor) in cursors {
            let batch = region.events(role).events_since(cursor, READABLE_EVENTS);
            trace.lost_events += batch.lost;
            trace.events.extend(batch.events.into_iter().map(|mut e| {
                e.t_start_us = e.t_start_us.saturating_sub(start);
                e.t_end_us = e.t_end_us.saturating_sub(start);
                (role, e)
            }));
        }
        Ok(Completion { generation, trace })
    }
}
