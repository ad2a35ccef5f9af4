//! What a sampled token costs the sampler, per configuration, on the real model's logits: the
//! verify model (f32) reads a prompt and continues it greedily for `POSITIONS` tokens, keeping
//! each position's logits; then every configuration chooses at each of them, `REPS` times, and
//! its mean per choice is printed (the configurations take turns, so a drift of the machine's
//! speed reaches all).
//!
//!     cargo run --release -p amusd-spec --example sampling_cost

use std::time::Instant;

use amusd_model::{LogitsFor, ModelSpec};
use amusd_spec::{Dry, Sampler, SamplingParams};

fn main() -> anyhow::Result<()> {
    let positions = 24;
    let reps = 5;
    let spec: ModelSpec = format!("{}:f32", amusd_model::default_model_path().display()).parse()?;
    let text = amusd_model::loader::load_text(&spec)?;
    let (model, _) = amusd_model::loader::load_weights(&spec)?;
    let mut tokens = text
        .tokenizer
        .encode("Write a short poem about the sea.\n", false)?;
    let mut cache = model.new_cache(tokens.len() + positions + 1);
    let mut rows: Vec<(Vec<f32>, Vec<u32>)> = Vec::new();
    let mut logits = model.forward(&tokens, 0, &mut cache, LogitsFor::Last)?;
    for _ in 0..positions {
        let row = logits.row(logits.rows - 1).to_vec();
        let next = amusd_model::kernels::argmax(&row);
        rows.push((row, tokens.clone()));
        tokens.push(next);
        logits = model.forward(&[next], tokens.len() - 1, &mut cache, LogitsFor::Last)?;
    }
    let base = |t: f32| SamplingParams {
        temperature: t,
        seed: 7,
        ..SamplingParams::GREEDY
    };
    let configs: Vec<(String, SamplingParams)> = [0.7f32, 1.5]
        .into_iter()
        .flat_map(|t| {
            [
                (format!("T {t}"), base(t)),
                (
                    format!("T {t}, min-p 0.05"),
                    SamplingParams {
                        min_p: 0.05,
                        ..base(t)
                    },
                ),
                (
                    format!("T {t}, typical-p 0.9"),
                    SamplingParams {
                        typical_p: 0.9,
                        ..base(t)
                    },
                ),
                (
                    format!("T {t}, XTC 1.0 above 0.1"),
                    SamplingParams {
                        xtc_probability: 1.0,
                        ..base(t)
                    },
                ),
                (
                    format!("T {t}, dynamic temperature +-0.5"),
                    SamplingParams {
                        dynatemp_range: 0.5,
                        ..base(t)
                    },
                ),
                (
                    format!("T {t}, DRY 0.8 (no breakers)"),
                    SamplingParams {
                        dry: Dry {
                            multiplier: 0.8,
                            ..Dry::OFF
                        },
                        ..base(t)
                    },
                ),
            ]
        })
        .collect();
    let mut samplers: Vec<Sampler> = configs.iter().map(|c| Sampler::new(c.1.clone())).collect();
    let mut totals = vec![0.0f64; configs.len()];
    for _ in 0..reps {
        for (row, prefix) in &rows {
            for (s, total) in samplers.iter_mut().zip(&mut totals) {
                let t = Instant::now();
                std::hint::black_box(s.choose(row, prefix));
                *total += t.elapsed().as_secs_f64();
            }
        }
    }
    for ((name, _), total) in configs.iter().zip(totals) {
        let ms = total * 1e3 / (reps * positions) as f64;
        println!("{name}: {ms:.3} ms per choice");
    }
    Ok(())
}
