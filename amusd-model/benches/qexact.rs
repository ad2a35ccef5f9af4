//! Cost of the verify model's exact block kernels ([`amusd_model::qexact`]) at SmolLM2-135M's
//! shapes, on every instruction set this CPU has, side by side in one run.
//!
//! `taskset -c 1 cargo bench -p amusd-model --bench qexact [-- DTYPE...]` (default q4_1 and q8_0;
//! also q4_0, q5_0, q5_1, q8_1, q2k, q3k, q4k, q5k, q6k, q8k) prints the median us per call, the GB/s of weight bytes and the GFLOP/s, per SIMD instruction set and batch size `m`.
//! `AMUSD_BENCH_COPIES=N` cycles through N copies of each matrix (100 copies of the gate/up, ~110
//! MB, leave nothing in cache: the decoding case); `AMUSD_BENCH_REPS` sets the samples and
//! `AMUSD_BENCH_MS=1,5,9` the batch sizes, `AMUSD_BENCH_SHAPES=576x576,3072x1536` the shapes.

use std::time::Instant;

use amusd_model::qexact::{matmul_on, BlockPacked, Isa};
use amusd_model::testing::quantized_matrix;
use candle_core::quantized::GgmlDType;

/// (n, k): the fused gate/up and the down projection of one layer (for the k-quants, whose
/// blocks are 256 wide, the gate/up's 576 columns are cut to 512).
const SHAPES: [(usize, usize); 2] = [(3072, 576), (576, 1536)];
const MS: &str = "1,2,4,8,16,64";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_1,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8K,
    ];
    let dtypes: Vec<GgmlDType> = (all.into_iter().enumerate())
        .filter(|(i, d)| match args.is_empty() {
            true => *i < 2,
            false => args.contains(&format!("{d:?}").to_lowercase()),
        })
        .map(|(_, d)| d)
        .collect();
    let (reps, copies) = (
        env("AMUSD_BENCH_REPS", 15),
        env("AMUSD_BENCH_COPIES", 1).max(1),
    );
    let ms: Vec<usize> = std::env::var("AMUSD_BENCH_MS")
        .unwrap_or_else(|_| MS.into())
        .split(',')
        .filter_map(|m| m.trim().parse().ok())
        .filter(|&m| m > 0)
        .collect();
    println!("{reps} samples, {copies} copies of each matrix; us per call (GB/s, GFLOP/s)");
    print!("{:<6} {:>10} {:<9}", "dtype", "n x k", "isa");
    for &m in &ms {
        print!(" {:>20}", format!("m={m}"));
    }
    println!();
    let shapes: Vec<(usize, usize)> = match std::env::var("AMUSD_BENCH_SHAPES") {
        Ok(list) => list
            .split(',')
            .filter_map(|s| {
                let (n, k) = s.trim().split_once('x')?;
                Some((n.parse().ok()?, k.parse().ok()?))
            })
            .collect(),
        Err(_) => SHAPES.to_vec(),
    };
    for dtype in dtypes {
        for &(n, k) in &shapes {
            let k = k / dtype.block_size() * dtype.block_size();
            let (bytes, _) = quantized_matrix(dtype, n, k, 7);
            let ws: Vec<BlockPacked> = (0..copies)
                .map(|_| BlockPacked::from_ggml(dtype, &bytes, n, k).expect("pack"))
                .collect();
            let gb = ws[0].bytes() as f64 / 1e9;
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Portable) {
                print!(
                    "{:<6} {:>10} {:<9}",
                    format!("{dtype:?}").to_lowercase(),
                    format!("{n}x{k}"),
                    format!("{isa:?}")
                );
                for &m in &ms {
                    let x: Vec<f32> = (0..m * k)
                        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
                        .collect();
                    let mut y = vec![0f32; m * n];
                    let s = median(
                        (0..reps)
                            .map(|_| {
                                let t = Instant::now();
                                for w in &ws {
                                    matmul_on(isa, &x, m, w, &mut y);
                                }
                                t.elapsed().as_secs_f64() / copies as f64
                            })
                            .collect(),
                    );
                    let gflops = 2.0 * (m * n * k) as f64 / s / 1e9;
                    print!(
                        " {:>20}",
                        format!("{:.0} ({:.1}, {:.0})", s * 1e6, gb / s, gflops)
                    );
                }
                println!();
            }
        }
    }
}
