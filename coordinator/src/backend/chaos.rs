//! Seeded fault injection (`--chaos`): the fault tests' way of killing workers mid-request.

use amusd_shm::{Role, WorkerState};
use rand::Rng;

use crate::args::ChaosSignal;
use crate::supervisor::Supervisor;

/// At each supervision check, with some probability, signal one worker chosen at random, at most
/// `faults` times per request.
pub struct Chaos {
    rng: rand::rngs::StdRng,
    faults: u32,
    rate: f64,
    signal: ChaosSignal,
    /// Faults injected so far, over all requests.
    pub injected: u32,
    /// Processes already struck: a stopped worker still looks busy until the hang check catches it.
    struck: Vec<u32>,
}

impl Chaos {
    pub fn new(seed: u64, faults: u32, rate: f64, signal: ChaosSignal) -> Self {
        Self {
            rng: rand::SeedableRng::seed_from_u64(seed),
            faults,
            rate,
            signal,
            injected: 0,
            struck: Vec::new(),
        }
    }

    /// Faults allowed per request.
    pub fn faults(&self) -> u32 {
        self.faults
    }

    pub fn maybe_strike(&mut self, sup: &Supervisor, left: &mut u32) {
        if *left == 0 || !self.rng.gen_bool(self.rate.clamp(0.0, 1.0)) {
            return;
        }
        let role = if self.rng.gen_bool(0.5) {
            Role::Draft
        } else {
            Role::Verify
        };
        let stop = match self.signal {
            ChaosSignal::Kill => false,
            ChaosSignal::Stop => true,
            ChaosSignal::Mixed => self.rng.gen_bool(0.5),
        };
        // Only strike a worker that is at work, so every fault hits the request in flight.
        if sup.shm_handle().worker_state(role) != Some(WorkerState::Busy) {
            return;
        }
        if let Some(pid) = sup.pid(role).filter(|p| !self.struck.contains(p)) {
            self.struck.push(pid);
            let sig = if stop { libc::SIGSTOP } else { libc::SIGKILL };
            // SAFETY: kill() on our own child's pid; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
            eprintln!(
                "amusd: chaos: {} the {} worker (pid {pid})",
                if stop { "stopped" } else { "killed" },
                role.name()
            );
            *left -= 1;
            self.injected += 1;
        }
    }
}
