//! Terminal output: a spinner while models load, streamed text, the summary line.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Shows `message` with a spinner on stderr until dropped; silent when stderr is not a terminal.
pub struct Spinner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Spinner {
    pub fn new(message: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::io::stderr().is_terminal().then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    eprint!("\r{} {message}", frames[i % frames.len()]);
                    let _ = std::io::stderr().flush();
                    i += 1;
                    std::thread::park_timeout(Duration::from_millis(80));
                }
                eprint!("\r\x1b[2K");
            })
        });
        Self { stop, thread }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Set once writing to stdout failed: its reader left (`amusd generate ... | head -c 5`).
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// Writes text to stdout as it arrives, flushing so tokens appear as they are produced. Returns
/// whether stdout still takes text: once its reader has left, the caller stops generating (as a
/// Unix tool stops on a closed pipe) and nothing more is written. `println!` panicked there.
pub fn print_text(s: &str) -> bool {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return false;
    }
    let mut out = std::io::stdout().lock();
    let ok = out
        .write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .is_ok();
    if !ok {
        STDOUT_GONE.store(true, Ordering::Relaxed);
    }
    ok
}

/// Whether stdout's reader has left ([`print_text`] failed).
pub fn stdout_gone() -> bool {
    STDOUT_GONE.load(Ordering::Relaxed)
}

/// Lets SIGPIPE end the process, as it ends other Unix tools, for commands that only print and
/// own nothing to clean up (`dump`, `report`): Rust ignores SIGPIPE, so their `println!` would
/// panic on a closed pipe instead (`amusd dump --watch | head -2`).
pub fn die_on_closed_stdout() {
    // SAFETY: restoring a signal's default disposition touches no memory of ours; called before
    // any thread is started by these commands.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
