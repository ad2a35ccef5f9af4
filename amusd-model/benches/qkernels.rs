//! Cost of the draft model's integer matmuls ([`amusd_model::qkernels`]) at the model's real shapes,
//! side by side with candle's single-row `QMatMul` (m = 1), which the draft used before.
//!
//! `nice -n 0 taskset -c 1 cargo bench -p amusd-model --bench qkernels [-- DTYPE...]`; prints the
//! median ms per call and the GB/s of weight bytes read. `AMUSD_BENCH_REPS` sets the samples.

use std::time::Instant;

use amusd_model::qkernels::{matmul_int, IntPacked, Path};
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `reps` calls of `f`, after one warm-up call.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
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
        let all = [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0];
        all.into_iter()
            .filter(|d| {
                args.is_empty() || args.contains(&format!("{d:?}").to_lowercase())
            })
            .collect()
    };
    let reps: usize = std::env::var("AMUSD_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    println!("path {:?}, median of {reps}; ms per call (GB/s of weight bytes)", Path::detect());
    print!("{:<6} {:>12}", "dtype", "n x k");
    for m in MS {
        print!(" {:>16}", format!("m={m}"));
    }
    println!(" {:>16}", "candle m=1");
    for dtype in dtypes {
        for (n, k) in SHAPES {
            let wt = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&wt, dtype).expect("quantize");
            let w = IntPacked::from_ggml(dtype, &q.data().expect("data"), n, k).expect("pack");
            let gb = w.bytes() as f64 / 1e9;
            print!("{:<6} {:>12}", format!("{dtype:?}").to_lowercase(), format!("{n}x{k}"));
            for m in MS {
                let x = values(m * k, 2);
                let mut y = vec![0f32; m * n];
                let s = time(reps.min(if m > 8 { 5 } else { reps }), || {
                    matmul_int(&x, m, &w, &mut y)
                });
                print!(" {:>16}", format!("{:.3} ({:.1})", s * 1e3, gb / s));
            }
            let mm = QMatMul::QTensor(std::sync::Arc::new(q));
            let x = Tensor::from_vec(values(k, 2), (1, k), &Device::Cpu).expect("tensor");
            let s = time(reps, || {
                mm.forward(&x).expect("candle matmul");
            });
            println!(" {:>16}", format!("{:.3} ({:.1})", s * 1e3, gb / s));
        }
    }
}
