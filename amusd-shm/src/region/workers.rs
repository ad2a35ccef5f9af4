//! Each worker's status: registration, state, heartbeat, the request it holds, its counters and
//! its restarts.

use std::sync::atomic::Ordering;

use crate::layout::*;

/// A copy of a worker's status block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// Which worker.
    pub role: Role,
    /// Its pid (0 if never registered).
    pub pid: u32,
    /// Its state; `None` if the field holds a value this build never writes.
    pub state: Option<WorkerState>,
    /// Last heartbeat (CLOCK_MONOTONIC ms).
    pub heartbeat_ms: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Exit status of its last incarnation.
    pub exit_status: ExitStatus,
    /// The request it holds (0 = none).
    pub request_id: u64,
    /// Counters.
    pub steps: u64,
    /// Tokens drafted or committed.
    pub tokens: u64,
    /// Rollbacks.
    pub rollbacks: u64,
    /// Tokens proposed to verification.
    pub proposed: u64,
    /// Tokens accepted.
    pub accepted: u64,
    /// Device.
    pub device: String,
    /// Model.
    pub model: String,
    /// Last error.
    pub last_error: String,
}

impl Region {
    /// `role`'s status block.
    pub fn worker(&self, role: Role) -> &WorkerStatus {
        &self.workers[role.index()]
    }

    /// Worker: register this process in `role`'s block: pid, heartbeat, device and model text,
    /// cleared `last_error` and `request_id`, then `state = Starting` (Release) and ring the
    /// coordinator's bell.
    pub fn register_worker(&self, role: Role, device: &str, model: &str) {
        let w = self.worker(role);
        w.pid.store(std::process::id(), Ordering::Relaxed);
        w.heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
        w.device.set(device);
        w.model.set(model);
        w.last_error.clear();
        w.request_id.store(0, Ordering::Relaxed);
        self.set_worker_state(role, WorkerState::Starting);
    }

    /// Set `role`'s state (Release; also refreshes its heartbeat) and ring the coordinator's bell.
    /// Workers set Starting..Busy; the coordinator sets Dead after reaping (see
    /// [`mark_worker_dead`](Self::mark_worker_dead)).
    pub fn set_worker_state(&self, role: Role, state: WorkerState) {
        let w = self.worker(role);
        w.heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
        w.state.store(state.as_u32(), Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// `role`'s state (Acquire); `None` for a value this build never writes.
    pub fn worker_state(&self, role: Role) -> Option<WorkerState> {
        WorkerState::from_u32(self.worker(role).state.load(Ordering::Acquire))
    }

    /// Worker: record the request it holds (0 = none) with Release and ring the coordinator's
    /// bell. The verify worker must set 0 (or another id) after its last `publish_verified` for a
    /// request; the coordinator waits for that before submitting the next request.
    pub fn set_worker_request(&self, role: Role, request_id: u64) {
        self.worker(role)
            .request_id
            .store(request_id, Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// The request `role` holds (Acquire; 0 = none).
    pub fn worker_request(&self, role: Role) -> u64 {
        self.worker(role).request_id.load(Ordering::Acquire)
    }

    /// Worker: heartbeat (CLOCK_MONOTONIC ms, Relaxed).
    pub fn heartbeat(&self, role: Role) {
        self.worker(role)
            .heartbeat_ms
            .store(crate::futex::now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since `role`'s last heartbeat (0 if it is in the future; `None` if never).
    pub fn heartbeat_age_ms(&self, role: Role) -> Option<u64> {
        let hb = self.worker(role).heartbeat_ms.load(Ordering::Relaxed);
        (hb != 0).then(|| crate::futex::now_ms().saturating_sub(hb))
    }

    /// Coordinator, after reaping `role`'s process: record `exit`, then `state = Dead` (Release),
    /// clear the held request, ring the coordinator's own bell (for other coordinator threads).
    pub fn mark_worker_dead(&self, role: Role, exit: ExitStatus) {
        let w = self.worker(role);
        w.exit_status.store(exit.encode(), Ordering::Relaxed);
        w.request_id.store(0, Ordering::Relaxed);
        w.state.store(WorkerState::Dead.as_u32(), Ordering::Release);
        self.ring(Party::Coordinator);
    }

    /// Coordinator, before spawning a replacement: count the restart (Relaxed).
    pub fn count_restart(&self, role: Role) -> u32 {
        self.worker(role).restarts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A copy of `role`'s status block (fields individually loaded; not a consistent snapshot).
    pub fn worker_snapshot(&self, role: Role) -> WorkerSnapshot {
        let w = self.worker(role);
        let r = Ordering::Relaxed;
        WorkerSnapshot {
            role,
            pid: w.pid.load(r),
            state: WorkerState::from_u32(w.state.load(Ordering::Acquire)),
            heartbeat_ms: w.heartbeat_ms.load(r),
            restarts: w.restarts.load(r),
            exit_status: ExitStatus::decode(w.exit_status.load(r)),
            request_id: w.request_id.load(Ordering::Acquire),
            steps: w.steps.load(r),
            tokens: w.tokens.load(r),
            rollbacks: w.rollbacks.load(r),
            proposed: w.proposed.load(r),
            accepted: w.accepted.load(r),
            device: w.device.get(),
            model: w.model.get(),
            last_error: w.last_error.get(),
        }
    }
}
