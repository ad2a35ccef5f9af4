//! The coordinator's side of AMUSD: the region, the two worker processes and their supervision.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amusd_model::DeviceSpec;
use amusd_shm::{ExitStatus, Party, Role, Shm, UnlinkOnDrop, WorkerState};
use anyhow::{bail, Context, Result};

/// Set by SIGINT/SIGTERM; the supervision loop turns it into a cancelled request.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes Ctrl-C and SIGTERM to [`INTERRUPTED`] so the region is unlinked and the workers are
/// stopped on the way out.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// How one worker is started.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub role: Role,
    pub model: String,
    pub device: DeviceSpec,
    pub extra_args: Vec<String>,
}

/// Supervision settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// How long a worker may take to load its model (a load that runs but never ends; a stopped
    /// one is caught by the hang check, as loading workers heartbeat).
    pub load_timeout: Duration,
    /// A worker without a heartbeat for this long, whatever its state, is killed and restarted;
    /// so is one that has not registered in the region this long after its start.
    pub hang_timeout: Duration,
    /// Restarts allowed per worker within one request (and the idle time before it) before the
    /// request fails; each request that ends, completed or failed, gives the budget back, so a
    /// long-running server survives a crash now and then, however many it has seen. A worker
    /// whose budget ran out is started again by [`Supervisor::revive`].
    pub max_restarts: u32,
}

struct Worker {
    spec: WorkerSpec,
    child: Option<Child>,
    /// Restarts since the last completed request (see [`Policy::max_restarts`]).
    restarts: u32,
    /// Some incarnation of this worker has completed a request: its model loads.
    served: bool,
    started: Instant,
    /// When the worker was found dead or hung, until its replacement is ready.
    down_since: Option<Instant>,
    /// Killed as hung and not reaped yet: its state in the region is stale until then.
    killed: bool,
    /// Its restarts ran out: it stays down, and every request fails with this error, until
    /// [`Supervisor::revive`] starts it again.
    given_up: Option<(Instant, String)>,
}

/// The least time a started worker gets to register in the region before it counts as hung: the
/// exec and dynamic loading of a worker binary can take a while on a loaded machine.
const MIN_REGISTER_TIME: Duration = Duration::from_secs(5);

/// The last committed progress of the running request: (request id, committed length, when it
/// changed). A request that makes none for `load_timeout + hang_timeout` fails, whatever the cause:
/// `generate` and `bench` never wait forever.
type Progress = (u64, usize, Instant);

/// The region and the worker processes. Dropping it stops the workers and unlinks the region.
pub struct Supervisor {
    shm: Arc<UnlinkOnDrop>,
    workers: Vec<Worker>,
    policy: Policy,
    bin_dir: PathBuf,
    /// Restarts so far, for the summary.
    pub restarts: u32,
    /// The longest time from a worker found dead or hung to its replacement being ready.
    pub worst_recovery: Option<Duration>,
    progress: Option<Progress>,
}

fn worker_binary(role: Role) -> &'static str {
    match role {
        Role::Draft => "amusd-draft-worker",
        Role::Verify => "amusd-verify-worker",
    }
}

/// The directory holding both worker binaries: `given`, or the running executable's own (the
/// `amusd` binary's), or its parent (a test, example or program cargo built into `deps/` or
/// `examples/` beside the binaries).
pub fn worker_dir(given: Option<&Path>) -> Result<PathBuf> {
    let has_both = |dir: &Path| {
        [Role::Draft, Role::Verify]
            .iter()
            .all(|&r| dir.join(worker_binary(r)).is_file())
    };
    let candidates = match given {
        Some(dir) => vec![dir.to_path_buf()],
        None => {
            let exe = std::env::current_exe().context("cannot find the running executable")?;
            exe.ancestors()
                .skip(1)
                .take(2)
                .map(Path::to_path_buf)
                .collect()
        }
    };
    if let Some(dir) = candidates.iter().find(|d| has_both(d)) {
        return Ok(dir.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "the worker binaries {} and {} are not in {}; build them with `cargo build --release` \
         (an embedding program names their directory with EngineBuilder::worker_dir)",
        worker_binary(Role::Draft),
        worker_binary(Role::Verify),
        looked.join(" or ")
    )
}

impl Supervisor {
    /// Creates a fresh region and starts both workers (without waiting for them), from
    /// `bin_dir` if given, else from where [`worker_dir`] finds them.
    pub fn start(specs: Vec<WorkerSpec>, policy: Policy, bin_dir: Option<&Path>) -> Result<Self> {
        // A crashed earlier run may have left regions behind; remove those whose coordinator is dead.
        let _ = Shm::gc();
        let bin_dir = worker_dir(bin_dir)?;
        let shm = Arc::new(Shm::create(&Shm::fresh_name())?.unlink_on_drop());
        let mut sup = Self {
            shm,
            workers: Vec::new(),
            policy,
            bin_dir,
            restarts: 0,
            worst_recovery: None,
            progress: None,
        };
        for spec in specs {
            sup.workers.push(Worker {
                spec,
                child: None,
                restarts: 0,
                served: false,
                started: Instant::now(),
                down_since: None,
                killed: false,
                given_up: None,
            });
        }
        for i in 0..sup.workers.len() {
            sup.spawn(i)?;
        }
        Ok(sup)
    }

    /// The pid of `role`'s current process.
    pub fn pid(&self, role: Role) -> Option<u32> {
        self.workers
            .iter()
            .find(|w| w.spec.role == role)
            .and_then(|w| w.child.as_ref())
            .map(|c| c.id())
    }

    /// A handle on the region that does not borrow the supervisor, so the request loop can read the
    /// region while the supervision callback holds the supervisor mutably.
    pub fn shm_handle(&self) -> Arc<UnlinkOnDrop> {
        self.shm.clone()
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let w = &mut self.workers[i];
        let mut cmd = Command::new(self.bin_dir.join(worker_binary(w.spec.role)));
        cmd.arg("--region")
            .arg(self.shm.name())
            .arg("--model")
            .arg(&w.spec.model)
            .arg("--device")
            .arg(w.spec.device.to_string())
            .args(&w.spec.extra_args)
            .arg("--supervised")
            .envs(amusd_proc::bind::child_env(w.spec.device))
            .stdin(std::process::Stdio::null());
        w.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start the {} worker", w.spec.role.name()))?,
        );
        w.started = Instant::now();
        w.killed = false;
        Ok(())
    }

    /// Waits until every worker has loaded its model and is ready.
    pub fn wait_ready(&mut self) -> Result<()> {
        loop {
            let bell = self.shm.bell_value(Party::Coordinator);
            self.check(false)?;
            let ready = self.workers.iter().all(|w| {
                matches!(
                    self.shm.worker_state(w.spec.role),
                    Some(WorkerState::Ready | WorkerState::Busy)
                )
            });
            if ready {
                return Ok(());
            }
            self.shm
                .wait_bell(Party::Coordinator, bell, Some(Duration::from_millis(50)));
        }
    }

    /// One supervision pass: reaps dead workers and restarts them (within the retry budget), kills
    /// hung ones (in every state: loading, idle or busy), fails a request that makes no progress,
    /// turns Ctrl-C into an error. `during_request`: a request is running.
    pub fn check(&mut self, during_request: bool) -> Result<()> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        for i in 0..self.workers.len() {
            if let Some((_, why)) = &self.workers[i].given_up {
                if during_request {
                    bail!("{why}");
                }
                continue;
            }
            if self.reap(i, during_request)? {
                continue;
            }
            self.check_alive(i)?;
        }
        if during_request {
            self.check_progress()?;
        } else {
            self.progress = None;
        }
        Ok(())
    }

    /// A request ended (`completed`, or failed): every worker's restart budget is whole again.
    pub fn request_ended(&mut self, completed: bool) {
        for w in &mut self.workers {
            w.restarts = 0;
            w.served |= completed;
        }
    }

    /// Starts again every worker whose restarts ran out, with a whole budget: at once when `now`
    /// (a request is about to run), else only once the hang timeout has passed since, so a
    /// worker that cannot run at all is retried at that pace between requests, not in a loop.
    /// Without it a server whose worker used up its budget once would fail every request after.
    pub fn revive(&mut self, now: bool) -> Result<()> {
        let pause = self.policy.hang_timeout;
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            if !w
                .given_up
                .as_ref()
                .is_some_and(|(at, _)| now || at.elapsed() >= pause)
            {
                continue;
            }
            w.given_up = None;
            w.restarts = 0;
            eprintln!(
                "amusd: starting the {} worker again (its restarts had run out)",
                w.spec.role.name()
            );
            self.restarts += 1;
            self.shm.count_restart(w.spec.role);
            self.spawn(i)?;
        }
        Ok(())
    }

    /// Why a worker is down until [`Self::revive`] starts it again, if one is.
    pub fn given_up(&self) -> Option<&str> {
        self.workers
            .iter()
            .find_map(|w| w.given_up.as_ref().map(|(_, why)| why.as_str()))
    }

    /// Reaps worker `i` if it exited, and restarts it. Returns whether it had exited.
    fn reap(&mut self, i: usize, during_request: bool) -> Result<bool> {
        let role = self.workers[i].spec.role;
        let exited = match self.workers[i].child.as_mut() {
            Some(c) => c.try_wait().context("cannot wait for a worker")?,
            None => None,
        };
        let Some(status) = exited else {
            return Ok(false);
        };
        self.workers[i].child = None;
        let exit = exit_status(status);
        self.shm.mark_worker_dead(role, exit);
        // A dead worker takes no part in a split prefill: the other must not wait for it.
        match role {
            Role::Draft => self.shm.advertise_helper(0),
            Role::Verify => self.shm.announce_verifier(0),
        }
        if role == Role::Draft && self.shm.repair_draft_epoch() {
            eprintln!("amusd: the draft worker died mid-rewrite; draft buffer emptied");
        }
        let last_error = self.shm.worker_snapshot(role).last_error;
        let w = &mut self.workers[i];
        // What the worker said before it exited, when it said anything (a kill says nothing).
        let said = match last_error.is_empty() {
            true => String::new(),
            false => format!(": {last_error}"),
        };
        let give_up = if w.restarts >= self.policy.max_restarts {
            let why = if last_error.is_empty() {
                format!("{exit:?}")
            } else {
                last_error
            };
            let n = w.restarts;
            Some(format!(
                "the {} worker keeps failing ({n} restarts): {why}",
                role.name()
            ))
        } else if !last_error.is_empty() && !during_request && w.restarts == 0 && !w.served {
            // A worker that failed while loading, and never loaded, will fail again.
            Some(format!("the {} worker failed: {last_error}", role.name()))
        } else {
            None
        };
        if let Some(why) = give_up {
            w.given_up = Some((Instant::now(), why.clone()));
            bail!("{why}");
        }
        w.restarts += 1;
        w.down_since.get_or_insert_with(Instant::now);
        self.restarts += 1;
        self.shm.count_restart(role);
        eprintln!(
            "amusd: {} worker exited ({exit:?}){said}; restarting ({}/{})",
            role.name(),
            w.restarts,
            self.policy.max_restarts
        );
        self.spawn(i)?;
        Ok(true)
    }

    /// Notes a recovered worker; kills a silent one; fails on a load that takes too long.
    fn check_alive(&mut self, i: usize) -> Result<()> {
        let role = self.workers[i].spec.role;
        let state = self.shm.worker_state(role);
        let w = &mut self.workers[i];
        if w.killed {
            return Ok(());
        }
        if matches!(state, Some(WorkerState::Ready | WorkerState::Busy)) {
            if let Some(t) = w.down_since.take() {
                let took = t.elapsed();
                eprintln!(
                    "amusd: {} worker back after {} ms",
                    role.name(),
                    took.as_millis()
                );
                self.worst_recovery = Some(self.worst_recovery.map_or(took, |w| w.max(took)));
            }
        }
        let loading = matches!(state, Some(WorkerState::Starting | WorkerState::Loading));
        if loading && w.started.elapsed() > self.policy.load_timeout {
            bail!(
                "the {} worker did not load its model within {:?}",
                role.name(),
                self.policy.load_timeout
            );
        }
        // Absent or Dead: this incarnation has not registered (the coordinator writes Dead before
        // starting a replacement), so the heartbeat in the region is not its own.
        let registered = matches!(
            state,
            Some(
                WorkerState::Starting
                    | WorkerState::Loading
                    | WorkerState::Ready
                    | WorkerState::Busy
            )
        );
        let (silent, limit) = if registered {
            let age = self.shm.heartbeat_age_ms(role).unwrap_or(0);
            (Duration::from_millis(age), self.policy.hang_timeout)
        } else {
            let limit = self.policy.hang_timeout.max(MIN_REGISTER_TIME);
            (w.started.elapsed(), limit)
        };
        if silent > limit {
            let what = match state {
                Some(s) if registered => format!("sent no heartbeat for {limit:?} ({s:?})"),
                _ => format!("did not register within {limit:?}"),
            };
            eprintln!("amusd: {} worker {what}; killing it", role.name());
            w.down_since.get_or_insert_with(Instant::now);
            w.killed = true;
            if let Some(c) = w.child.as_mut() {
                // Our own unreaped child: its pid cannot have been reused. A stopped process dies
                // of SIGKILL too.
                let _ = c.kill();
            }
        }
        Ok(())
    }

    /// Fails the running request if no token was committed for `load_timeout + hang_timeout`.
    fn check_progress(&mut self) -> Result<()> {
        let now = (self.shm.request_id(), self.shm.verified_len());
        let limit = self.policy.load_timeout + self.policy.hang_timeout;
        match self.progress {
            Some((id, len, since)) if (id, len) == now => {
                if since.elapsed() > limit {
                    bail!(
                        "request {id} made no progress for {limit:?} (stuck at {len} tokens): \
                         giving up; see `amusd dump` while it runs, raise --load-timeout-s for \
                         slow model loads"
                    );
                }
            }
            _ => self.progress = Some((now.0, now.1, Instant::now())),
        }
        Ok(())
    }

    /// Asks the workers to exit, waits a little, then kills what is left.
    pub fn stop(&mut self) {
        self.shm.request_shutdown();
        let deadline = Instant::now() + Duration::from_secs(2);
        for w in &mut self.workers {
            if let Some(c) = w.child.as_mut() {
                // SIGCONT first: a worker stopped with SIGSTOP cannot see the shutdown.
                // SAFETY: kill() sends a signal; no memory is touched.
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
                }
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            w.child = None;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop();
    }
}

fn exit_status(s: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(sig)) => ExitStatus::Signal(sig),
        _ => ExitStatus::Code(255),
    }
}
