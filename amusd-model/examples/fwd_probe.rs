//! Wall time of one model's forward passes as a worker runs them, for profiling (`perf record`)
//! and for before/after comparisons of two builds: `PREFILLS` prefills of a `CTX`-token context,
//! then `ITERS` forwards of `ROWS` new tokens at that context (the cache rolled back each time),
//! printed as each prefill's ms and the forwards' median, minimum and 10th / 90th percentiles. The
//! model is the default checkpoint under the spec `SPEC` (default
//! `stored:head=screen:kv=f16:acts=16`, the default draft; several, comma-separated, take turns
//! forward by forward) run as a draft does (`Batching::Throughput`), or as the verify model does
//! with `EXACT=1`.
//!
//!     cargo build --release -p amusd-model --example fwd_probe
//!     EXACT=1 SPEC=f32 CTX=200 PREFILLS=5 taskset -c 1 target/release/examples/fwd_probe

use amusd_model::{Batching, LogitsFor, ModelSpec};
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One spec's model, its cache and its forward times.
struct Probe {
    spec: String,
    model: amusd_model::Llama,
    cache: amusd_model::KvCache,
    times: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let specs =
        std::env::var("SPEC").unwrap_or_else(|_| "stored:head=screen:kv=f16:acts=16".into());
    let (ctx, rows) = (env_or("CTX", 300), env_or("ROWS", 1).max(1));
    let (iters, prefills) = (env_or("ITERS", 200).max(1), env_or("PREFILLS", 1).max(1));
    let path = amusd_model::default_model_path();
    let context: Vec<u32> = (0..ctx as u32).map(|i| (i * 7919) % 40000 + 100).collect();
    let mut probes = Vec::new();
    for spec in specs.split(',') {
        let parsed: ModelSpec = format!("{}:{spec}", path.display()).parse()?;
        let (mut model, _) = amusd_model::loader::load_weights(&parsed)?;
        if std::env::var_os("EXACT").is_none() {
            model.batching = Batching::Throughput;
        }
        let mut cache = model.new_cache(ctx + rows);
        for _ in 0..prefills {
            cache.truncate(0);
            let t = Instant::now();
            model.forward(&context, 0, &mut cache, LogitsFor::Last)?;
            println!("{spec}: prefill {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        }
        let times = Vec::with_capacity(iters);
        let spec = spec.to_string();
        probes.push(Probe {
            spec,
            model,
            cache,
            times,
        });
    }
    // Several specs take turns forward by forward, so a drift of the machine's speed reaches all.
    let new: Vec<u32> = (0..rows as u32).map(|i| 1000 + i).collect();
    for _ in 0..iters {
        for p in &mut probes {
            p.cache.truncate(ctx);
            let t = Instant::now();
            p.model.forward(&new, ctx, &mut p.cache, LogitsFor::All)?;
            p.times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for p in &mut probes {
        p.times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{}: rows {rows} ctx {ctx}: median {:.2} ms, min {:.2}, p10 {:.2}, p90 {:.2}",
            p.spec,
            p.times[iters / 2],
            p.times[0],
            p.times[iters / 10],
            p.times[iters * 9 / 10]
        );
    }
    Ok(())
}
