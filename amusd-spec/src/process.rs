//! The worker processes' common plumbing: argument checks, device binding, attaching to the region,
//! loading the model, reporting errors, following the coordinator's life.

use std::time::Duration;

use amusd_model::{DeviceSpec, ModelSpec};
use amusd_shm::{Role, Shm, WorkerState};

use crate::decoder::{Decoder, Drafter, LlamaDecoder, Verifier};
use crate::fake::{FakeDecoder, FakeModel};
use crate::worker::{run_draft, run_verify, DraftOptions, VerifyOptions};
use crate::SpecError;

/// What a worker process is told on its command line.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub region: String,
    pub model: String,
    pub device: String,
    pub role: Role,
    pub max_lookahead: usize,
    pub max_verify_batch: usize,
    pub wait_for_draft: Duration,
}

/// Loads a real model (`PATH[:FORMAT]`) or a fake one (`fake:...`), returning it and a display name.
pub fn load_decoder(spec: &str) -> Result<(Box<dyn Decoder + Send>, String), SpecError> {
    if FakeModel::is_fake(spec) {
        let m = FakeModel::parse(spec)?;
        return Ok((Box::new(FakeDecoder::new(m)), spec.to_string()));
    }
    let spec: ModelSpec = spec.parse()?;
    let loaded = amusd_model::load(&spec)?;
    Ok((Box::new(LlamaDecoder::new(loaded.llama)), loaded.name))
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
    let device: DeviceSpec = cfg
        .device
        .parse()
        .map_err(|e: amusd_model::ModelError| early(e.into()))?;
    crate::bind::bind_current_process(device).map_err(early)?;
    die_with_parent();
    let shm = Shm::attach(&cfg.region).map_err(|e| early(e.into()))?;
    let region = shm.region();
    region.register_worker(cfg.role, &cfg.device, &cfg.model);
    let result = (|| {
        region.set_worker_state(cfg.role, WorkerState::Loading);
        let (decoder, name) = load_decoder(&cfg.model)?;
        region.worker(cfg.role).model.set(&name);
        let coordinator = region.coordinator_pid();
        let alive = move || coordinator_alive(coordinator);
        match cfg.role {
            Role::Draft => {
                let mut drafter = Drafter::new(decoder);
                run_draft(
                    region,
                    &mut drafter,
                    &DraftOptions {
                        max_lookahead: cfg.max_lookahead.max(1),
                    },
                    &alive,
                )
            }
            Role::Verify => {
                let mut verifier = Verifier::new(decoder);
                let opts = VerifyOptions {
                    max_verify_batch: cfg.max_verify_batch.max(1),
                    wait_for_draft: cfg.wait_for_draft,
                };
                run_verify(region, &mut verifier, &opts, &alive)
            }
        }
    })();
    result.map_err(|error| {
        region.worker(cfg.role).last_error.set(&error.to_string());
        region.ring(amusd_shm::Party::Coordinator);
        WorkerFailure {
            error,
            in_region: true,
        }
    })
}

/// Asks the kernel to kill this process when its parent (the coordinator) dies, so a crashed
/// coordinator leaves no worker behind.
fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    }
}

/// Whether the coordinator process still exists (the parent-death signal covers a direct parent;
/// this also covers a worker started by hand).
fn coordinator_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
