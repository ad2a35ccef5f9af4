//! Cost of the draft model's integer matmuls ([`amusd_model::qkernels`]) at the model's real shapes,
//! on every SIMD path this CPU has, side by side with candle's single-row `QMatMul` (m = 1), which
//! the draft used before.
//!
//! `RAYON_NUM_THREADS=1 nice -n 0 taskset -c 1 cargo bench -p amusd-model --bench qkernels [-- DTYPE...]`
//! (q4_1, q8_0, q4_0, q5_1, q5_0 by default; q4k and q5k, as q4_1 / q5_1 blocks, on the one shape
//! whose width is whole blocks)
//! prints the median ms per call and the GB/s of weight bytes read. `AMUSD_BENCH_REPS` sets the
//! samples (`AMUSD_BENCH_STAT=min`: the fastest;
//! `AMUSD_BENCH_CLOCK=cpu`: the thread's CPU time, for a shared machine), `AMUSD_BENCH_SHAPES` (e.g. `576x576,49152x576`) picks shapes,
//! `AMUSD_BENCH_COPIES=N` cycles our kernels through N copies of each matrix (the uncached case;
//! candle's column stays on one), `AMUSD_BENCH_CODED=1` runs q4_1 with its block scales coded to
//! 8 bits (`q4_1s8`, the draft's `stored-s8`).

use std::time::Instant;

use amusd_model::qkernels::{matmul_int_on, IntPacked, Path};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// (n, k) of SmolLM2-135M's matrices: o, k/v, fused qkv, fused gate/up, the output head; down.
const SHAPES: [(usize, usize); 6] = [
    (576, 576),
    (192, 576),
    (960, 576),
    (3072, 576),
    (49152, 576),
    (576, 1536),
];
const MS: [usize; 4] = [1, 4, 8, 200];
/// The matrices one layer of SmolLM2-135M multiplies (fused qkv, o, fused gate/up, down), and its
/// layer count: the summary line adds them up.
const LAYER: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
const LAYERS: usize = 30;

/// The median, or with `AMUSD_BENCH_STAT=min` the minimum (steadier on a shared machine).
fn summary(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if std::env::var("AMUSD_BENCH_STAT").is_ok_and(|s| s == "min") {
        v[0]
    } else {
        v[v.len() / 2]
    }
}

/// Nanoseconds this thread has run on a CPU (Linux's schedstat): unlike wall time, it leaves out
/// the time other processes held the core.
fn cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Seconds per call of `f` over `reps` samples, after one warm-up call: wall time of one call, or
/// with `AMUSD_BENCH_CLOCK=cpu` this thread's CPU time per call over at least 50 ms of calls
/// (the kernel accounts CPU time at scheduler ticks, so a sample must span many).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    let cpu = std::env::var("AMUSD_BENCH_CLOCK").is_ok_and(|s| s == "cpu");
    f();
    summary(
        (0..reps)
            .map(|_| {
                let (t, c0) = (Instant::now(), cpu_ns());
                if !cpu {
                    f();
                    return t.elapsed().as_secs_f64();
                }
                let mut calls = 0;
                while calls == 0 || t.elapsed().as_secs_f64() < 0.05 {
                    f();
                    calls += 1;
                }
                match (c0, cpu_ns()) {
                    (Some(c0), Some(c1)) => (c1 - c0) as f64 * 1e-9 / calls as f64,
                    _ => t.elapsed().as_secs_f64() / calls as f64,
                }
            })
            .collect(),
    )
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(0x9E37_79B9);
            (h % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn main() {
    let dtypes: Vec<GgmlDType> = {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        let all = [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q5_1,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
        ];
        all.into_iter()
            .filter(|d| match args.is_empty() {
                true => d.block_size() == 32,
                false => args.contains(&format!("{d:?}").to_lowercase()),
            })
            .collect()
    };
    let reps: usize = std::env::var("AMUSD_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let shapes: Vec<String> = std::env::var("AMUSD_BENCH_SHAPES")
        .map(|s| s.split(',').map(String::from).collect())
        .unwrap_or_default();
    let copies: usize = std::env::var("AMUSD_BENCH_COPIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let paths: Vec<Path> = Path::ALL
        .into_iter()
        .rev()
        .filter(|&p| p != Path::Portable && p.available())
        .collect();
    println!("paths {paths:?}, {reps} samples; ms per call (GB/s of weight bytes)");
    print!("{:<6} {:>12} {:<10}", "dtype", "n x k", "path");
    for m in MS {
        print!(" {:>16}", format!("m={m}"));
    }
    println!(" {:>16}", "candle m=1");
    for dtype in dtypes {
        for &path in &paths {
            shapes_on(path, dtype, reps, copies, &shapes);
        }
    }
}

/// Every shape (or those `AMUSD_BENCH_SHAPES` names) of `dtype` through `path`, and the sum over one
/// forward's layers.
fn shapes_on(path: Path, dtype: GgmlDType, reps: usize, copies: usize, shapes: &[String]) {
    let mut layer = [0f64; MS.len()];
    let mut measured = 0;
    for (n, k) in SHAPES {
        // The k-quants' 256-value blocks fit only the 1536-wide down projection.
        let whole_blocks = k.is_multiple_of(dtype.block_size());
        if !whole_blocks || !shapes.is_empty() && !shapes.contains(&format!("{n}x{k}")) {
            continue;
        }
        let wt = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&wt, dtype).expect("quantize");
        let w = IntPacked::from_ggml(dtype, &q.data().expect("data"), n, k).expect("pack");
        let coded = std::env::var("AMUSD_BENCH_CODED").is_ok_and(|v| v == "1");
        let w = match coded && dtype == GgmlDType::Q4_1 {
            true => w.with_coded_scales().expect("q4_1 codes"),
            false => w,
        };
        // `AMUSD_BENCH_COPIES=N`: cycle through N copies, so that with enough of them nothing
        // stays cached (a decoding forward streams its weights from memory).
        let copies: Vec<IntPacked> = (0..copies).map(|_| w.clone()).collect();
        let gb = w.bytes() as f64 / 1e9;
        print!(
            "{:<6} {:>12} {:<10}",
            match dtype {
                GgmlDType::Q4K => "q4k",
                GgmlDType::Q5K => "q5k",
                _ => w.type_name(),
            },
            format!("{n}x{k}"),
            format!("{path:?}")
        );
        let in_layer = LAYER.contains(&(n, k));
        measured += usize::from(in_layer);
        for (c, m) in MS.into_iter().enumerate() {
            let x = values(m * k, 2);
            let mut y = vec![0f32; m * n];
            let s = time(if m > 8 { reps.div_ceil(3) } else { reps }, || {
                for w in &copies {
                    matmul_int_on(path, &x, m, w, &mut y)
                }
            }) / copies.len() as f64;
            print!(" {:>16}", format!("{:.3} ({:.1})", s * 1e3, gb / s));
            if in_layer {
                layer[c] += s;
            }
        }
        let mm = QMatMul::QTensor(std::sync::Arc::new(q));
        let x = Tensor::from_vec(values(k, 2), (1, k), &Device::Cpu).expect("tensor");
        let s = time(reps, || {
            mm.forward(&x).expect("candle matmul");
        });
        println!(" {:>16}", format!("{:.3} ({:.1})", s * 1e3, gb / s));
    }
    if measured == LAYER.len() {
        print!(
            "{:<6} {:>12} {:<10}",
            "",
            format!("{LAYERS} layers"),
            format!("{path:?}")
        );
        for t in layer {
            print!(" {:>16}", format!("{:.2}", t * LAYERS as f64 * 1e3));
        }
        let cached = if copies == 1 { "in cache" } else { "uncached" };
        println!("   (the matmuls of one forward, weights {cached}; without the head)");
    }
}
