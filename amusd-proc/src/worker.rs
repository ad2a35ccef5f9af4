//! The worker processes' common plumbing: argument checks, device binding, attaching to the region,
//! loading the model, reporting errors, following the coordinator's life.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amusd_model::{DeviceSpec, ModelSpec};
use amusd_shm::{Region, Role, Shm, WorkerState};

use amusd_spec::constraint::Constraints;
use amusd_spec::fake::{FakeDecoder, FakeModel};
use amusd_spec::history::NgramHistory;
use amusd_spec::lookup::{self, NoModel};
use amusd_spec::split::Helper;
use amusd_spec::worker::{run_draft, run_verify, DraftOptions, VerifyOptions};
use amusd_spec::{Decoder, Drafter, LlamaDecoder, SpecError, Verifier};

/// What a worker process is told on its command line.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub region: String,
    pub model: String,
    pub device: String,
    /// Started by the coordinator: its parent must be the region's coordinator.
    pub supervised: bool,
    pub role: RoleOptions,
}

/// The worker's role, with that role's options.
#[derive(Clone, Debug)]
pub enum RoleOptions {
    Draft(DraftOptions),
    Verify(VerifyOptions),
}

impl RoleOptions {
    pub fn role(&self) -> Role {
        match self {
            Self::Draft(_) => Role::Draft,
            Self::Verify(_) => Role::Verify,
        }
    }
}

/// How often a loading worker heartbeats.
const LOAD_HEARTBEAT: Duration = Duration::from_millis(100);

/// Loads a real model (`PATH[:FORMAT]`) or a fake one (`fake:...`), returning it and a display name.
pub fn load_decoder(spec: &str) -> Result<(Box<dyn Decoder + Send>, String), SpecError> {
    if let Some(range) = lookup::parse_spec(spec) {
        return Ok((Box::new(NoModel), format!("prompt lookup {}", range?)));
    }
    if FakeModel::is_fake(spec) {
        let m = FakeModel::parse(spec)?;
        // Stands for reading and packing weights: CPU work, as the loading heartbeat expects.
        let until = std::time::Instant::now() + Duration::from_millis(m.load_ms);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        return Ok((Box::new(FakeDecoder::new(m)), spec.to_string()));
    }
    let spec: ModelSpec = spec.parse()?;
    // Weights only: the coordinator tokenizes, a worker never does.
    let (llama, name) = amusd_model::loader::load_weights(&spec)?;
    Ok((Box::new(LlamaDecoder::new(llama)), name))
}

/// What compiles requests' grammars for a model (`PATH[:FORMAT]`): its tokenizer, loaded when the
/// first request with a grammar arrives. A fake model follows the fake grammar
/// ([`amusd_spec::constraint::fake`], for the fault tests); prompt lookup has no model and drafts
/// unconstrained.
pub fn constraints_for(spec: &str) -> Option<Arc<dyn Constraints>> {
    if lookup::parse_spec(spec).is_some() {
        return None;
    }
    if FakeModel::is_fake(spec) {
        return Some(Arc::new(amusd_spec::constraint::fake::FakeConstraints));
    }
    let spec: ModelSpec = spec.parse().ok()?;
    Some(Arc::new(amusd_grammar::LazyCompiler::new(spec)))
}

/// Why a worker stopped with an error.
#[derive(Debug)]
pub struct WorkerFailure {
    pub error: SpecError,
    /// The error is in the worker's `last_error` in the region, where the coordinator quotes it: a
    /// supervised worker need not print it too (the user would read it twice).
    pub in_region: bool,
}

impl std::fmt::Display for WorkerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

/// A worker binary's exit: its error on stderr as `PROGRAM: error: ...`, unless the coordinator
/// (`supervised`) already quotes it from the region.
pub fn worker_exit(
    program: &str,
    supervised: bool,
    result: Result<(), WorkerFailure>,
) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if !(supervised && e.in_region) {
                eprintln!("{program}: error: {e}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a worker to completion. Errors before the region is attached can only be returned; after
/// that they are also written to the worker's `last_error` for the coordinator to quote.
pub fn worker_main(cfg: &WorkerConfig) -> Result<(), WorkerFailure> {
    let early = |error: SpecError| WorkerFailure {
        error,
        in_region: false,
    };
    // First of all, so that no window is left in which the coordinator could die unnoticed; the
    // parent is checked once the region says who the coordinator is.
    die_with_parent();
    let device: DeviceSpec = cfg
        .device
        .parse()
        .map_err(|e: amusd_model::ModelError| early(e.into()))?;
    crate::bind::bind_current_process(device).map_err(|e| early(e.into()))?;
    let shm = Shm::attach(&cfg.region).map_err(|e| early(e.into()))?;
    let region = shm.region();
    let alive = coordinator_watch(region, cfg.supervised).map_err(early)?;
    let role = cfg.role.role();
    region.register_worker(role, &cfg.device, &cfg.model);
    let result = (|| {
        region.set_worker_state(role, WorkerState::Loading);
        let (decoder, name) = with_heartbeat(region, role, || load_decoder(&cfg.model))?;
        region.worker(role).model.set(&name);
        match &cfg.role {
            RoleOptions::Draft(opts) => {
                let opts = DraftOptions {
                    max_lookahead: opts.max_lookahead.max(1),
                    lookup_max_run: opts.lookup_max_run.max(1),
                    ..opts.clone()
                };
                let drafter = Drafter::new(decoder).with_constraints(constraints_for(&cfg.model));
                let mut drafter = with_lookup(drafter, &cfg.model, &opts)?;
                let mut helper = match &opts.split_with {
                    Some(spec) => {
                        let draft = drafter.decoder.split_ops().map(|o| &*o);
                        let new = || Helper::new(spec, &cfg.model, draft);
                        Some(with_heartbeat(region, role, new)?)
                    }
                    None => None,
                };
                run_draft(region, &mut drafter, &opts, helper.as_mut(), &*alive)
            }
            RoleOptions::Verify(opts) => {
                let opts = VerifyOptions {
                    max_verify_batch: opts.max_verify_batch.max(1),
                    ..opts.clone()
                };
                let mut verifier =
                    Verifier::new(decoder).with_constraints(constraints_for(&cfg.model));
                region.announce_verifier(opts.split.unwrap_or(0));
                run_verify(region, &mut verifier, &opts, &*alive)
            }
        }
    })();
    result.map_err(|error| {
        region.worker(role).last_error.set(&error.to_string());
        region.ring(amusd_shm::Party::Coordinator);
        WorkerFailure {
            error,
            in_region: true,
        }
    })
}

/// The draft worker's drafter with the lookup it is asked for: alone for a model spec
/// `lookup[:MIN-MAX]`, ahead of the model for `--lookup` (with the n-gram history for
/// `--history`).
fn with_lookup<D: Decoder>(
    drafter: Drafter<D>,
    model: &str,
    opts: &DraftOptions,
) -> Result<Drafter<D>, SpecError> {
    Ok(match lookup::parse_spec(model) {
        Some(range) => drafter.with_lookup(range?, true, opts.lookup_max_run),
        None => match opts.lookup {
            Some(range) if opts.history => drafter
                .with_lookup(range, false, opts.lookup_max_run)
                .with_history(NgramHistory::default()),
            Some(range) => drafter.with_lookup(range, false, opts.lookup_max_run),
            None => drafter,
        },
    })
}

/// Asks the kernel to kill this process when its parent (the coordinator) dies, so a crashed
/// coordinator leaves no worker behind. A parent that died before this call is caught by
/// [`coordinator_watch`], which compares `getppid()` afterwards.
fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
}

/// Checks that the region's coordinator is alive and returns how to keep checking. A supervised
/// worker's parent must be the coordinator (after `PR_SET_PDEATHSIG`, so from then on the kernel
/// kills us with it; if it died before, we were re-parented and stop here), and stays it: a cheap
/// `getppid()` per loop. A worker started by hand follows the coordinator's pid and start time, so a
/// reused pid does not keep it alive.
fn coordinator_watch(
    region: &Region,
    supervised: bool,
) -> Result<Box<dyn Fn() -> bool + '_>, SpecError> {
    let coordinator = region.coordinator_pid();
    let gone = || {
        SpecError::Protocol(format!(
            "the coordinator (pid {coordinator}) of this region is not running; nothing to serve"
        ))
    };
    if supervised {
        let parent = std::os::unix::process::parent_id();
        if parent != coordinator {
            return Err(gone());
        }
        return Ok(Box::new(move || {
            std::os::unix::process::parent_id() == coordinator
        }));
    }
    if !region.coordinator_alive() {
        return Err(gone());
    }
    Ok(Box::new(|| region.coordinator_alive()))
}

/// Runs `load` while a second thread heartbeats for it as long as the load makes progress:
/// the loading thread used CPU since the last beat or waits for the disk. So the coordinator's hang
/// check catches a stopped load (both threads stop) and a wedged one (asleep, using no CPU) within
/// the hang timeout, whatever the model's size.
fn with_heartbeat<T: Send>(
    region: &Region,
    role: Role,
    load: impl FnOnce() -> Result<T, SpecError>,
) -> Result<T, SpecError> {
    let done = AtomicBool::new(false);
    // SAFETY: gettid() takes no arguments and cannot fail.
    let loader = unsafe { libc::gettid() };
    std::thread::scope(|s| {
        let beat = s.spawn(|| {
            let mut last = None;
            while !done.load(Ordering::Acquire) {
                let now = thread_progress(loader);
                if now.is_none_or(|(cpu, in_io)| in_io || Some(cpu) != last) {
                    region.heartbeat(role);
                }
                last = now.map(|(cpu, _)| cpu);
                std::thread::park_timeout(LOAD_HEARTBEAT);
            }
        });
        let loaded = load();
        done.store(true, Ordering::Release);
        beat.thread().unpark();
        loaded
    })
}

/// A thread of this process: its CPU time in clock ticks, and whether it waits for I/O (state D).
/// `None` if `/proc` cannot tell (then the load counts as progressing).
fn thread_progress(tid: libc::pid_t) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // Field 2, the thread name, is in parentheses and may contain anything; fields 3 on follow.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime, fields.first() == Some(&"D")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_at_work_shows_progress_and_an_idle_one_does_not() {
        // SAFETY: gettid() takes no arguments and cannot fail.
        let me = unsafe { libc::gettid() };
        let (before, _) = thread_progress(me).expect("/proc/self/task/TID/stat");
        let start = std::time::Instant::now();
        // Spin until the kernel has accounted at least one clock tick to this thread.
        while thread_progress(me).unwrap().0 == before {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no CPU time accounted"
            );
            std::hint::spin_loop();
        }
        let (tx, rx) = std::sync::mpsc::channel::<libc::pid_t>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let idle = std::thread::spawn(move || {
            // SAFETY: as above.
            tx.send(unsafe { libc::gettid() }).unwrap();
            // Asleep (a wedged load): no CPU time.
            stop_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let a = thread_progress(tid).unwrap();
        let b = thread_progress(tid).unwrap();
        assert_eq!(a.0, b.0);
        assert!(!b.1, "an asleep thread is not waiting for I/O");
        stop_tx.send(()).unwrap();
        idle.join().unwrap();
    }
}
