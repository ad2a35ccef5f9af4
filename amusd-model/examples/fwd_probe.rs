//! Wall time of one model's forward passes as a worker runs them, for profiling (`perf record`)
//! and for before/after comparisons of two builds: `PREFILLS` prefills of a `CTX`-token context,
//! then `ITERS` forwards of `ROWS` new tokens at that context (the cache rolled back each time),
//! printed as each prefill's ms and the forwards' median, minimum and 10th / 90th percentiles. The
//! model is the default checkpoint under the spec `SPEC` (default
//! `stored:head=screen:kv=f16:acts=16`, the default draft; several, comma-separated, take turns
//! forward by forward) run as a draft does (`Batching::Throughput`), or as the verify model does
//! with `EXACT=1`. `TEXT=FILE` takes the context and the new tokens from a text (else a
//! pseudo-random sequence, after which the model's next-token distributions are flat: the worst
//! case of the screened greedy head, [`amusd_model::greedy_head`]); `GREEDY=0` leaves the head
//! unscreened.
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
    // A text's tokens, or a pseudo-random sequence: the model's next-token distributions are
    // flat after it, which is the screened greedy head's worst case.
    let text: Vec<u32> = match std::env::var("TEXT") {
        Ok(file) => {
            let spec: ModelSpec = format!("{}:f32", path.display()).parse()?;
            let tokenizer = amusd_model::loader::load(&spec)?.tokenizer;
            let tokens = tokenizer.encode(&std::fs::read_to_string(file)?, false)?;
            anyhow::ensure!(tokens.len() >= ctx + rows, "TEXT holds too few tokens");
            tokens
        }
        Err(_) => (0..(ctx + rows) as u32)
            .map(|i| {
                if i < ctx as u32 {
                    (i * 7919) % 40000 + 100
                } else {
                    1000 + i - ctx as u32
                }
            })
            .collect(),
    };
    let context = text[..ctx].to_vec();
    let mut probes = Vec::new();
    for spec in specs.split(',') {
        let parsed: ModelSpec = format!("{}:{spec}", path.display()).parse()?;
        let (mut model, _) = amusd_model::loader::load_weights(&parsed)?;
        if std::env::var_os("EXACT").is_none() {
            model.batching = Batching::Throughput;
        }
        if std::env::var_os("GREEDY").is_some_and(|v| v == "0") {
            model.set_greedy_screen(false)?;
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
    // Iteration `i` runs window `i % windows` of the text after the context (one window of the
    // pseudo-random sequence).
    let windows: Vec<&[u32]> = text[ctx..].chunks_exact(rows).take(16).collect();
    for i in 0..iters {
        let new = windows[i % windows.len()];
        for p in &mut probes {
            p.cache.truncate(ctx);
            let t = Instant::now();
            p.model
                .forward_greedy(new, ctx, &mut p.cache, LogitsFor::All)?;
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
