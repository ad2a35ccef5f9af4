//! Cost of one forward pass over k new tokens at a ~200-token context, per weight format.
//!
//! `cargo bench -p amusd-model --bench forward [-- FORMAT[:head=HEAD][:kv=f16]...]`, single-threaded on one core when run
//! under `taskset -c N` with RAYON_NUM_THREADS=1 (scripts/bench-forward.sh does both). Uses the
//! default model (scripts/fetch-assets.sh model) or `AMUSD_BENCH_MODEL`.

use std::hint::black_box;
use std::time::Instant;

use amusd_model::{Batching, LogitsFor, ModelSpec};

const CONTEXT: usize = 200;
const KS: [usize; 6] = [1, 2, 4, 8, 16, 32];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Single-core read bandwidth, GB/s: the best of a few passes summing a buffer far larger than the
/// caches. A one-token forward of a model larger than the caches cannot beat bytes / this.
fn read_bandwidth() -> f64 {
    let buf: Vec<u64> = (0..32usize << 20).map(|i| i as u64).collect();
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            black_box(buf.iter().fold(0u64, |a, &v| a.wrapping_add(v)));
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    std::mem::size_of_val(buf.as_slice()) as f64 / best / 1e9
}

/// Single-core f32 fused multiply-add peak, GFLOP/s, on the widest vectors this CPU has (a 16-lane
/// probe on an AVX-512 core that runs 512-bit FMAs at full rate reads twice an 8-lane one; on one
/// that splits them in halves, the same): twelve independent chains, enough to cover the FMA
/// latency on two units.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX512F (checked just above).
            return unsafe { fma_peak_avx512() };
        }
    }
    fma_peak_auto()
}

/// Twelve chains of sixteen lanes, 200 M steps each.
///
/// # Safety
/// The CPU must have AVX512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_peak_avx512() -> f64 {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    let (x, y) = (
        _mm512_set1_ps(black_box(1.000_001)),
        _mm512_set1_ps(black_box(1e-7)),
    );
    // Distinct starting values, so that no two chains are the same computation.
    let mut acc: [__m512; CHAINS] = std::array::from_fn(|c| _mm512_set1_ps(1.0 + c as f32));
    let iters = 20_000_000u64;
    let t = Instant::now();
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(&acc);
    (iters * CHAINS as u64 * 16 * 2) as f64 / secs / 1e9
}

/// Ten chains of eight lanes that the compiler turns into vector FMAs (the widest it targets).
fn fma_peak_auto() -> f64 {
    let (x, y) = (black_box(1.000_001f32), black_box(1e-7f32));
    let mut acc: [[f32; 8]; 10] = std::array::from_fn(|c| [1.0 + c as f32; 8]);
    let iters = 20_000_000u64;
    let t = Instant::now();
    for _ in 0..iters {
        for chain in acc.iter_mut() {
            for v in chain.iter_mut() {
                *v = v.mul_add(x, y);
            }
        }
    }
    black_box(&acc);
    (iters * 10 * 8 * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let path = std::env::var_os("AMUSD_BENCH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(amusd_model::default_model_path);
    if !path.is_file() {
        eprintln!(
            "forward bench: no model at {}; run scripts/fetch-assets.sh model",
            path.display()
        );
        return;
    }
    let formats: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let formats = if formats.is_empty() {
        ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]
            .map(String::from)
            .to_vec()
    } else {
        formats
    };
    let reps: usize = std::env::var("AMUSD_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let (bandwidth, peak) = (read_bandwidth(), fma_peak());
    println!(
        "model {}  context {CONTEXT}  median of {reps}\n\
         this core: memory read {bandwidth:.1} GB/s, f32 FMA peak {peak:.0} GFLOP/s",
        path.display()
    );
    print!("{:<26} {:>10}", "format", "ms/token");
    for k in KS {
        print!(" {:>9}", format!("k={k}"));
    }
    println!(
        " {:>12} {:>12} {:>7} {:>7} {:>8} {:>8}   (k: cost of one forward over k new tokens relative \
         to k=1; prefill: {CONTEXT} tokens, ms, batch-invariant / as a draft model runs it; MB: weights \
         read per forward; GB/s at k=1, GFLOP/s of the matrix products at k=1 and k=32)",
        "prefill", "prefill draft", "MB", "GB/s", "GF k=1", "GF k=32"
    );
    for f in formats {
        // FORMAT[:head=HEAD][:kv=f16]: the rest of a model spec (a draft's head and KV cache).
        let spec = match format!("{}:{f}", path.display()).parse::<ModelSpec>() {
            Ok(spec) => spec,
            Err(e) => {
                eprintln!("{f}: {e}");
                continue;
            }
        };
        let (mut model, _) = amusd_model::loader::load_weights(&spec).expect("load");
        let mut cache = model.new_cache(CONTEXT + 64);
        let context: Vec<u32> = (0..CONTEXT as u32)
            .map(|i| (i * 7919) % 40000 + 100)
            .collect();
        let mut prefill = |model: &amusd_model::Llama| {
            median(
                (0..3)
                    .map(|_| {
                        let t = Instant::now();
                        model
                            .forward(&context, 0, &mut cache, LogitsFor::Last)
                            .expect("prefill");
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .collect(),
            )
        };
        model.batching = Batching::Throughput;
        let prefill_draft = prefill(&model);
        model.batching = Batching::Invariant;
        let prefill_exact = prefill(&model);
        let mut times = Vec::new();
        for k in KS {
            let new: Vec<u32> = (0..k as u32).map(|i| 1000 + i).collect();
            let samples: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    model
                        .forward(&new, CONTEXT, &mut cache, LogitsFor::All)
                        .expect("forward");
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.push(median(samples));
        }
        print!("{:<26} {:>10.1}", f, times[0]);
        for t in &times {
            print!(" {:>9.2}", t / times[0]);
        }
        let (bytes, macs) = model.matmul_cost();
        let (t1, t32) = (times[0] * 1e-3, times[KS.len() - 1] * 1e-3);
        println!(
            " {prefill_exact:>12.0} {prefill_draft:>12.0} {:>7.1} {:>7.1} {:>8.1} {:>8.1}",
            bytes as f64 / 1e6,
            bytes as f64 / t1 / 1e9,
            2.0 * macs as f64 / t1 / 1e9,
            2.0 * macs as f64 * 32.0 / t32 / 1e9,
        );
    }
}
