//! Cost of one forward pass over k new tokens at a ~200-token context, per weight format.
//!
//! `cargo bench -p amusd-model --bench forward [-- FORMAT...]`, single-threaded on one core when run
//! under `taskset -c N` with RAYON_NUM_THREADS=1 (scripts/bench-forward.sh does both). Uses the
//! default model (scripts/fetch-assets.sh model) or `AMUSD_BENCH_MODEL`.

use std::time::Instant;

use amusd_model::gguf::GgufFile;
use amusd_model::{Batching, LogitsFor, WeightFormat};

const CONTEXT: usize = 200;
const KS: [usize; 6] = [1, 2, 4, 8, 16, 32];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    println!(
        "model {}  context {CONTEXT}  median of {reps}",
        path.display()
    );
    print!("{:<6} {:>10}", "format", "ms/token");
    for k in KS {
        print!(" {:>9}", format!("k={k}"));
    }
    println!(
        " {:>12} {:>12}   (k: cost of one forward over k new tokens relative to k=1; \
         prefill: {CONTEXT} tokens, ms, batch-invariant / as a draft model runs it)",
        "prefill", "prefill draft"
    );
    for f in formats {
        let Some(format) = WeightFormat::parse(&f) else {
            eprintln!("unknown format {f}");
            continue;
        };
        let mut model = GgufFile::open(&path)
            .and_then(|mut g| g.load_llama(format))
            .expect("load");
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
        print!("{:<6} {:>10.1}", f, times[0]);
        for t in &times {
            print!(" {:>9.2}", t / times[0]);
        }
        println!(" {prefill_exact:>12.0} {prefill_draft:>12.0}");
    }
}
