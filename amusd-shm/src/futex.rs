//! Futex wait/wake on words in the shared region, the spin-then-sleep wait helpers, and the
//! monotonic clock helpers.
//!
//! The futex calls never pass `FUTEX_PRIVATE_FLAG`: the words live in a `MAP_SHARED` mapping and
//! the waiter and the waker are different processes, so the kernel must key the futex on the
//! shared page, not on this process's address space.
//!
//! # The no-lost-wakeup rule
//!
//! A waiter loads the word (Acquire) *before* checking its condition, and passes the value it
//! loaded as `expected`; a publisher changes the word (Release) *after* publishing the data, then
//! calls [`futex_wake`]. The kernel checks `*word == expected` atomically with queueing the waiter,
//! so either the waiter sees the change and does not sleep, or the waker finds it queued.
//!
//! # Why spin first
//!
//! Going to sleep in `FUTEX_WAIT` and being woken by `FUTEX_WAKE` costs tens of microseconds
//! (two syscalls, a context switch, often a CPU leaving an idle state); a publication observed by
//! spinning on a cache line costs well under a microsecond. In AMUSD the other side often publishes
//! within that window (the draft worker appends a token about when the verify worker looks for
//! one; the verify worker commits while the draft worker checks for rollbacks), so
//! [`wait_for_change`]/[`wait_until`] spin for [`Spin::DEFAULT`] (tens of µs, then a few
//! `yield_now`s) before sleeping. The spin is bounded, so an idle worker costs no CPU. See
//! `examples/wake_latency.rs` for measurements.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Result of one [`futex_wait`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitResult {
    /// Returned after a wake (or spuriously): re-check the word.
    Woken,
    /// The word did not hold `expected` when the call was made (`EAGAIN`).
    ValueChanged,
    /// The timeout passed (`ETIMEDOUT`).
    TimedOut,
    /// A signal interrupted the wait (`EINTR`): re-check and wait again.
    Interrupted,
    /// The call failed for another reason (errno); does not happen for a valid aligned word.
    Failed(i32),
}

/// Sleep until `word` is woken, if it still holds `expected`; at most `timeout` (relative,
/// CLOCK_MONOTONIC), forever if `None`. One `FUTEX_WAIT` syscall; callers loop.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> WaitResult {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call; the timespec (if any)
    // lives on this stack frame; FUTEX_WAIT reads `*word` and the timespec and writes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if r == 0 {
        return WaitResult::Woken;
    }
    match std::io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::EAGAIN => WaitResult::ValueChanged,
        libc::ETIMEDOUT => WaitResult::TimedOut,
        libc::EINTR => WaitResult::Interrupted,
        e => WaitResult::Failed(e),
    }
}

/// Wake every process/thread sleeping in [`futex_wait`] on `word`. Returns how many were woken.
/// Change the word (Release) *before* calling this.
pub fn futex_wake(word: &AtomicU32) -> usize {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE only uses its address as a key.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    r.max(0) as usize
}

/// How long a waiter polls before sleeping in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spin {
    /// Busy-poll (with `spin_loop` hints) for this long.
    pub spin: Duration,
    /// Then poll after this many `yield_now`s.
    pub yields: u32,
}

impl Spin {
    /// The default: ~30 µs of spinning, then 4 yields, then the futex.
    pub const DEFAULT: Spin = Spin {
        spin: Duration::from_micros(30),
        yields: 4,
    };
    /// Straight to the futex.
    pub const NONE: Spin = Spin {
        spin: Duration::ZERO,
        yields: 0,
    };
}

impl Default for Spin {
    fn default() -> Self {
        Spin::DEFAULT
    }
}

/// Wait until `pred(word)` holds or `deadline` passes (never, if `None`), spinning per
/// [`Spin::DEFAULT`] first. `Ok(value)` satisfies `pred`; `Err(value)` is the last value seen at the
/// deadline. Values are loaded with Acquire, so data published before the word is visible.
pub fn wait_until(
    word: &AtomicU32,
    pred: impl FnMut(u32) -> bool,
    deadline: Option<Instant>,
) -> Result<u32, u32> {
    wait_until_with(word, pred, deadline, Spin::DEFAULT)
}

/// [`wait_until`] with an explicit spin policy.
pub fn wait_until_with(
    word: &AtomicU32,
    mut pred: impl FnMut(u32) -> bool,
    deadline: Option<Instant>,
    spin: Spin,
) -> Result<u32, u32> {
    let mut v = word.load(Ordering::Acquire);
    if pred(v) {
        return Ok(v);
    }
    // Phase 1: spin on the cache line.
    if !spin.spin.is_zero() {
        let start = Instant::now();
        let mut spin_end = start + spin.spin;
        if let Some(d) = deadline {
            spin_end = spin_end.min(d);
        }
        'spin: loop {
            for _ in 0..64 {
                std::hint::spin_loop();
                v = word.load(Ordering::Acquire);
                if pred(v) {
                    return Ok(v);
                }
            }
            if Instant::now() >= spin_end {
                break 'spin;
            }
        }
    }
    // Phase 2: let other threads on this CPU run (the publisher may be one of them).
    for _ in 0..spin.yields {
        std::thread::yield_now();
        v = word.load(Ordering::Acquire);
        if pred(v) {
            return Ok(v);
        }
    }
    // Phase 3: sleep in the kernel until the word changes from `v`.
    loop {
        let timeout = match deadline {
            None => None,
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(v);
                }
                Some(d - now)
            }
        };
        if let WaitResult::Failed(_) = futex_wait(word, v, timeout) {
            // Cannot happen for a valid word; never busy-loop on it though.
            std::thread::sleep(Duration::from_micros(100));
        }
        v = word.load(Ordering::Acquire);
        if pred(v) {
            return Ok(v);
        }
    }
}

/// Wait until `word != seen`, for at most `timeout` (forever if `None`), spinning per
/// [`Spin::DEFAULT`] first. Returns the new value, or `None` on timeout.
pub fn wait_for_change(word: &AtomicU32, seen: u32, timeout: Option<Duration>) -> Option<u32> {
    wait_for_change_with(word, seen, timeout, Spin::DEFAULT)
}

/// [`wait_for_change`] with an explicit spin policy.
pub fn wait_for_change_with(
    word: &AtomicU32,
    seen: u32,
    timeout: Option<Duration>,
    spin: Spin,
) -> Option<u32> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    // A timeout too large to represent is "forever"; a zero timeout still checks once.
    wait_until_with(word, |v| v != seen, deadline, spin).ok()
}

fn clock_monotonic() -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts
}

/// CLOCK_MONOTONIC in nanoseconds. System-wide (same clock in every process), unlike `Instant`,
/// whose values cannot be shared.
pub fn now_ns() -> u64 {
    let ts = clock_monotonic();
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC in microseconds (see [`now_ns`]).
pub fn now_us() -> u64 {
    now_ns() / 1_000
}

/// CLOCK_MONOTONIC in milliseconds (see [`now_ns`]); used for heartbeats.
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// Wall-clock time in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn wait_returns_value_changed_when_word_differs() {
        let w = AtomicU32::new(5);
        assert_eq!(
            futex_wait(&w, 4, Some(Duration::from_secs(5))),
            WaitResult::ValueChanged
        );
    }

    #[test]
    fn wait_times_out() {
        let w = AtomicU32::new(0);
        let t = Instant::now();
        assert_eq!(
            futex_wait(&w, 0, Some(Duration::from_millis(20))),
            WaitResult::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(20));

        let t = Instant::now();
        assert_eq!(
            wait_for_change(&w, 0, Some(Duration::from_millis(20))),
            None
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
        assert_eq!(wait_for_change(&w, 0, Some(Duration::ZERO)), None);
        assert_eq!(wait_for_change(&w, 1, Some(Duration::ZERO)), Some(0));
    }

    #[test]
    fn wake_from_another_thread_wakes_a_sleeping_waiter() {
        for spin in [Spin::NONE, Spin::DEFAULT] {
            let w = Arc::new(AtomicU32::new(0));
            let ready = Arc::new(AtomicU32::new(0));
            let (w2, ready2) = (w.clone(), ready.clone());
            let waiter = std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                ready2.store(unsafe { libc::gettid() } as u32, Ordering::Release);
                futex_wake(&ready2);
                wait_for_change_with(&w2, 0, Some(Duration::from_secs(20)), spin)
            });
            let tid = wait_until(
                &ready,
                |v| v != 0,
                Some(Instant::now() + Duration::from_secs(20)),
            )
            .unwrap();
            // Poll (no sleeping) until the waiter is asleep in the kernel, so the wake below
            // really has a sleeper to wake rather than a spinner that sees the new value.
            let stat = format!("/proc/self/task/{tid}/stat");
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(20) {
                let s = std::fs::read_to_string(&stat).unwrap();
                if s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('S') {
                    break;
                }
                std::thread::yield_now();
            }
            w.store(7, Ordering::Release);
            futex_wake(&w);
            assert_eq!(waiter.join().unwrap(), Some(7));
        }
    }

    #[test]
    fn many_wakes_are_never_lost() {
        // Ping-pong 2000 times through two words; a lost wakeup would hang until the timeout.
        let ping = Arc::new(AtomicU32::new(0));
        let pong = Arc::new(AtomicU32::new(0));
        let (ping2, pong2) = (ping.clone(), pong.clone());
        let n = 2000u32;
        let t = std::thread::spawn(move || {
            for i in 1..=n {
                let spin = if i % 2 == 0 {
                    Spin::NONE
                } else {
                    Spin::DEFAULT
                };
                wait_until_with(
                    &ping2,
                    |v| v >= i,
                    Some(Instant::now() + Duration::from_secs(20)),
                    spin,
                )
                .expect("ping lost");
                pong2.store(i, Ordering::Release);
                futex_wake(&pong2);
            }
        });
        for i in 1..=n {
            ping.store(i, Ordering::Release);
            futex_wake(&ping);
            wait_until(
                &pong,
                |v| v >= i,
                Some(Instant::now() + Duration::from_secs(20)),
            )
            .expect("pong lost");
        }
        t.join().unwrap();
    }

    #[test]
    fn clocks_are_monotonic_and_consistent() {
        let a = now_ns();
        let b = now_us();
        let c = now_ms();
        assert!(b >= a / 1000);
        assert!(c >= a / 1_000_000);
        assert!(unix_ms() > 1_600_000_000_000);
    }
}
