//! Signalling a worker of a run from outside it (`amusd worker-kill`) without ever reaching another
//! process: the pid read from the region is pinned with a pidfd, then checked to be a child of the
//! region's live coordinator, and only then signalled through the pidfd.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;

use amusd_shm::{escape_name, Region, Role, Shm, WorkerState};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

/// A worker's role from its name on the command line.
fn parse_role(s: &str) -> Result<Role, String> {
    Role::ALL
        .into_iter()
        .find(|r| r.name() == s)
        .ok_or_else(|| format!("'{s}' is not a worker: expected draft or verify"))
}

/// A process pinned by a pidfd: its pid cannot be reused while this is held.
struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    fn open(pid: u32) -> std::io::Result<Pidfd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Pidfd { fd, pid })
    }

    /// The parent pid, read while the pidfd pins the process (so it is this process's parent).
    fn parent(&self) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        // Field 2, the command name, is in parentheses and may contain anything.
        let after = &stat[stat.rfind(')')? + 1..];
        after.split_whitespace().nth(1)?.parse().ok()
    }

    fn send(&self, sig: libc::c_int) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal takes our pidfd, a signal number, a null siginfo and flags 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sends `sig` to `role`'s worker of the run `name`, if and only if the region's coordinator is
/// alive, the worker's state says it runs, the recorded pid is a valid pid, and the process with
/// that pid is the coordinator's child. Returns the pid signalled.
pub fn signal_worker(region: &Region, name: &str, role: Role, sig: libc::c_int) -> Result<u32> {
    if !region.coordinator_alive() {
        bail!("the coordinator of {name} is not running: no worker to signal");
    }
    let w = region.worker_snapshot(role);
    let running = matches!(
        w.state,
        Some(WorkerState::Starting | WorkerState::Loading | WorkerState::Ready | WorkerState::Busy)
    );
    if !running {
        bail!(
            "the {} worker of {name} is not running (state {:?})",
            role.name(),
            w.state
        );
    }
    let pid = w.pid;
    // kill(2) would read 0 and negative pids as process groups (-1: every process we may signal).
    if pid == 0 || pid > i32::MAX as u32 {
        bail!(
            "{name} records pid {pid} for the {} worker, which is no process: the region is \
             corrupt; refusing to signal",
            role.name()
        );
    }
    let proc = Pidfd::open(pid).map_err(|e| {
        anyhow::anyhow!(
            "the {} worker of {name} (pid {pid}) is not running: {e}",
            role.name()
        )
    })?;
    let coordinator = region.coordinator_pid();
    // Alive before and after the parent check: the parent really is that coordinator.
    if proc.parent() != Some(coordinator) || !region.coordinator_alive() {
        bail!(
            "pid {pid}, recorded for the {} worker of {name}, is not a child of its coordinator \
             (pid {coordinator}): the region is stale or corrupt; refusing to signal it",
            role.name()
        );
    }
    proc.send(sig)
        .map_err(|e| anyhow::anyhow!("cannot signal pid {pid}: {e}"))?;
    Ok(pid)
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Sig {
    Kill,
    Term,
    Stop,
    Cont,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// draft or verify.
    #[arg(value_parser = parse_role)]
    pub worker: Role,
    /// The region of the run (default: the only live one).
    #[arg(long)]
    pub region: Option<String>,
    #[arg(long, value_enum, default_value = "kill")]
    pub signal: Sig,
}

pub fn kill(args: KillArgs) -> Result<ExitCode> {
    let name = match args.region {
        Some(n) => crate::dump::normalise(&n),
        None => {
            let live: Vec<_> = Shm::list()
                .into_iter()
                .filter(|r| r.coordinator_alive == Some(true))
                .collect();
            match live.as_slice() {
                [one] => one.name.clone(),
                [] => bail!(
                    "no running amusd found; start one with `amusd generate --strategy amusd ...`"
                ),
                _ => bail!(
                    "{} amusd runs are live; pick one with --region (see `amusd dump`)",
                    live.len()
                ),
            }
        }
    };
    let shm = Shm::attach_read_only(&name)?;
    let role = args.worker;
    let sig = match args.signal {
        Sig::Kill => libc::SIGKILL,
        Sig::Term => libc::SIGTERM,
        Sig::Stop => libc::SIGSTOP,
        Sig::Cont => libc::SIGCONT,
    };
    let name = escape_name(&name);
    let pid = signal_worker(shm.region(), &name, role, sig)?;
    eprintln!(
        "sent {:?} to the {} worker (pid {pid}) of {name}",
        args.signal,
        role.name()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_named_by_their_role() {
        assert_eq!(parse_role("draft"), Ok(Role::Draft));
        assert_eq!(parse_role("verify"), Ok(Role::Verify));
        assert!(parse_role("coordinator").is_err());
    }
}
