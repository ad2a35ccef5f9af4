//! Binding a process to its device: one CPU core and one thread, or one CUDA device.

use amusd_model::DeviceSpec;

use amusd_model::ModelError;

/// Environment for a child process bound to `device`: the CUDA device it may see and, on a CPU core,
/// one compute thread (rayon and candle read these once, at start, so they must be set before exec).
pub fn child_env(device: DeviceSpec) -> Vec<(&'static str, String)> {
    match device {
        DeviceSpec::Cuda(i) => vec![("CUDA_VISIBLE_DEVICES", i.to_string())],
        DeviceSpec::Cpu(Some(_)) => single_thread_env(),
        DeviceSpec::Cpu(None) => Vec::new(),
    }
}

fn single_thread_env() -> Vec<(&'static str, String)> {
    vec![
        ("RAYON_NUM_THREADS", "1".into()),
        ("CANDLE_NUM_THREADS", "1".into()),
        ("OMP_NUM_THREADS", "1".into()),
    ]
}

/// Binds the calling process to `device`. Call at the top of `main`, before any thread pool starts:
/// on `cpu:N` it pins every later thread to core N and limits the compute pools to one thread.
pub fn bind_current_process(device: DeviceSpec) -> Result<(), ModelError> {
    device.check_available()?;
    if let DeviceSpec::Cpu(Some(core)) = device {
        for (k, v) in single_thread_env() {
            // Only called at start-up, before other threads exist.
            std::env::set_var(k, v);
        }
        pin_to_core(core)?;
    }
    Ok(())
}

fn pin_to_core(core: usize) -> Result<(), ModelError> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it, and core < CPU_SETSIZE
    // is checked.
    unsafe {
        if core >= libc::CPU_SETSIZE as usize {
            return Err(ModelError::Device(format!("core {core} is out of range")));
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            let e = std::io::Error::last_os_error();
            return Err(ModelError::Device(format!(
                "cannot pin to core {core}: {e}"
            )));
        }
    }
    Ok(())
}

/// The CPU affinity of this process, saved to be given back later: the bench binds itself to the
/// verify core for ar and sd, then runs the amusd coordinator unpinned (pinned to the verify core
/// it would steal time from the verify worker's core on every wake-up).
pub struct SavedAffinity(libc::cpu_set_t);

impl SavedAffinity {
    pub fn current() -> Option<Self> {
        // SAFETY: cpu_set_t is plain data; sched_getaffinity writes at most its size into it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            (libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0)
                .then_some(Self(set))
        }
    }

    pub fn restore(&self) {
        // SAFETY: passes a valid cpu_set_t of the size given. Failure leaves the pinning in place,
        // which costs some speed but no correctness.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}
