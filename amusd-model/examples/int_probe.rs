//! Throughput of one integer matrix product ([`amusd_model::qkernels::matmul_int`]) on a q4_1
//! matrix of `N` x `K` (env; default 32768 x 1536, 31 MB) for `MS` activation rows (default
//! `1,2,3,4`): four rounds, each the best of eight calls per row count, in ms and GB/s of weights.
//! A matrix that fits L2 (`N=2048 K=1024`) shows the kernel's instruction bound, a large one
//! (`N=131072`) the memory's.
//!
//!     cargo build --release -p amusd-model --example int_probe
//!     N=2048 K=1024 taskset -c 0 target/release/examples/int_probe

use amusd_model::qkernels::{matmul_int, IntPacked};
use amusd_model::testing::quantized_matrix;
use candle_core::quantized::GgmlDType;
use std::time::Instant;
fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let k: usize = std::env::var("K")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1536);
    let ms: Vec<usize> = std::env::var("MS")
        .unwrap_or("1,2,3,4".into())
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let (bytes, _) = quantized_matrix(GgmlDType::Q4_1, n, k, 7);
    let w = IntPacked::from_ggml(GgmlDType::Q4_1, &bytes, n, k).unwrap();
    let x: Vec<f32> = (0..8 * k)
        .map(|i| ((i * 37) % 101) as f32 / 101.0 - 0.5)
        .collect();
    let mut y = vec![0f32; 8 * n];
    for round in 0..4 {
        let mut line = format!("round {round}:");
        for &m in &ms {
            let mut best = f64::MAX;
            for _ in 0..8 {
                let t = Instant::now();
                matmul_int(&x, m, &w, &mut y);
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!(
                " m={m} {:.2} ms ({:.1} GB/s)",
                best * 1e3,
                w.bytes() as f64 / best / 1e9
            );
        }
        println!("{line}");
    }
}
