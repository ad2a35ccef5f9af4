//! Cross-process publish-to-wake latency through futex words: pure futex vs spin-then-futex.
//!
//! Forks a child; parent and child ping-pong N times (default 10000) through two futex words in a
//! `MAP_SHARED` mapping (shmem, the same kind of memory as the region). Each side stamps
//! CLOCK_MONOTONIC just before it publishes (store + `futex_wake`); the other side stamps it when
//! its wait returns. Reported per scenario: median / p90 / p99 of both one-way latencies, and of
//! the round trip.
//!
//! Scenarios: each strategy with an immediate reply (the other side publishes within the spin
//! window, the common case between draft and verify workers) and with 200 µs of busy "work"
//! before each publication (the spin window runs out and the waiter sleeps in the futex anyway).
//!
//! ```text
//! cargo run --release -p amusd-shm --example wake_latency [N] [--no-pin]
//! ```

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amusd_shm::{futex_wake, now_ns, wait_until_with, Spin};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

#[repr(C)]
struct Shared {
    ping: AtomicU32,
    pong: AtomicU32,
    t_ping: AtomicU64,
    t_pong: AtomicU64,
}

struct Scenario {
    name: &'static str,
    spin: Spin,
    think: Duration,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "futex only, immediate reply",
        spin: Spin::NONE,
        think: Duration::ZERO,
    },
    Scenario {
        name: "spin-then-futex, immediate reply",
        spin: Spin::DEFAULT,
        think: Duration::ZERO,
    },
    Scenario {
        name: "futex only, 200us work before reply",
        spin: Spin::NONE,
        think: Duration::from_micros(200),
    },
    Scenario {
        name: "spin-then-futex, 200us work before reply",
        spin: Spin::DEFAULT,
        think: Duration::from_micros(200),
    },
];

const WARMUP: usize = 500;

fn busy(d: Duration) {
    if d.is_zero() {
        return;
    }
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn wait_for(word: &AtomicU32, i: u32, spin: Spin) {
    wait_until_with(
        word,
        |v| v >= i,
        Some(Instant::now() + Duration::from_secs(10)),
        spin,
    )
    .expect("no wake within 10 s: lost wakeup");
}

fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        set.set(cpu).expect("cpu index");
        sched_setaffinity(Pid::from_raw(0), &set).expect("sched_setaffinity");
    }
}

fn stats(v: &mut [u64]) -> String {
    v.sort_unstable();
    let q = |p: usize| v[(v.len() * p / 100).min(v.len() - 1)] as f64 / 1000.0;
    format!("median {:7.2}  p90 {:7.2}  p99 {:7.2}", q(50), q(90), q(99))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(10_000);
    let no_pin = args.iter().any(|a| a == "--no-pin");
    let rounds = WARMUP + n;

    let cpus: Vec<usize> = sched_getaffinity(Pid::from_raw(0))
        .map(|s| {
            (0..CpuSet::count())
                .filter(|&c| s.is_set(c).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default();
    let (cpu_parent, cpu_child) = if !no_pin && cpus.len() >= 2 {
        (Some(cpus[0]), Some(cpus[1]))
    } else {
        (None, None)
    };

    // Header, then the child's forward-latency samples (one u64 per round per scenario).
    let samples = rounds * SCENARIOS.len();
    let len = std::mem::size_of::<Shared>() + 8 * samples;
    // SAFETY: a fresh anonymous shared mapping, zero-filled, aliasing nothing.
    let base = unsafe {
        mmap_anonymous(
            None,
            NonZeroUsize::new(len).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )
    }
    .expect("mmap");
    // SAFETY: the mapping is page-aligned, zeroed (valid atomics) and lives until exit.
    let sh: &Shared = unsafe { base.cast::<Shared>().as_ref() };
    // SAFETY: as above; the samples follow the 24-byte header, 8-byte aligned.
    let fwd: &[AtomicU64] = unsafe {
        std::slice::from_raw_parts(
            base.as_ptr()
                .cast::<u8>()
                .add(std::mem::size_of::<Shared>())
                .cast::<AtomicU64>(),
            samples,
        )
    };

    println!(
        "wake_latency: {n} round trips per scenario (+{WARMUP} warm-up), parent cpu {cpu_parent:?}, \
         child cpu {cpu_child:?}, {} cpus available; spin-then-futex = {:?} spin + {} yields",
        cpus.len(),
        Spin::DEFAULT.spin,
        Spin::DEFAULT.yields,
    );

    // SAFETY: single-threaded at this point, so the child may do anything.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            pin(cpu_child);
            let mut i = 0u32;
            for (s, sc) in SCENARIOS.iter().enumerate() {
                for r in 0..rounds {
                    i += 1;
                    wait_for(&sh.ping, i, sc.spin);
                    let t = now_ns();
                    fwd[s * rounds + r].store(
                        t.saturating_sub(sh.t_ping.load(Ordering::Relaxed)),
                        Ordering::Relaxed,
                    );
                    busy(sc.think);
                    sh.t_pong.store(now_ns(), Ordering::Relaxed);
                    sh.pong.store(i, Ordering::Release);
                    futex_wake(&sh.pong);
                }
            }
            std::process::exit(0);
        }
        ForkResult::Parent { child } => {
            pin(cpu_parent);
            let mut i = 0u32;
            let mut results = Vec::new();
            for sc in SCENARIOS.iter() {
                let mut back = Vec::with_capacity(n);
                let mut rtt = Vec::with_capacity(n);
                for r in 0..rounds {
                    i += 1;
                    busy(sc.think);
                    let t0 = now_ns();
                    sh.t_ping.store(t0, Ordering::Relaxed);
                    sh.ping.store(i, Ordering::Release);
                    futex_wake(&sh.ping);
                    wait_for(&sh.pong, i, sc.spin);
                    let t1 = now_ns();
                    if r >= WARMUP {
                        back.push(t1.saturating_sub(sh.t_pong.load(Ordering::Relaxed)));
                        rtt.push(t1 - t0 - sc.think.as_nanos() as u64);
                    }
                }
                results.push((back, rtt));
            }
            let status = waitpid(child, None).expect("waitpid");
            println!("child: {status:?}");
            println!("latencies in µs (one-way = publisher's stamp before store+wake -> waiter's wait returns)");
            for (s, (sc, (mut back, mut rtt))) in SCENARIOS.iter().zip(results).enumerate() {
                let mut fwd: Vec<u64> = fwd[s * rounds + WARMUP..(s + 1) * rounds]
                    .iter()
                    .map(|x| x.load(Ordering::Relaxed))
                    .collect();
                println!("{}:", sc.name);
                println!("  parent->child one-way  {}", stats(&mut fwd));
                println!("  child->parent one-way  {}", stats(&mut back));
                println!("  round trip (- work)    {}", stats(&mut rtt));
            }
            // What a publication costs the publisher when nobody sleeps on the word.
            let w = &sh.ping;
            let t = Instant::now();
            let k = 100_000;
            for _ in 0..k {
                futex_wake(w);
            }
            println!(
                "futex_wake with no sleeper: {:.2} µs per call",
                t.elapsed().as_secs_f64() * 1e6 / k as f64
            );
        }
    }
}
