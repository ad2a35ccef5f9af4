//! Writes a random-weight Llama GGUF of a chosen size and k-quant mix, for measuring what the
//! default checkpoint cannot show (its 576-wide matrices cannot be k-quants): the speed of a
//! q4_k_m draft, say. Its text is noise; its cost per token is a real model's of that shape.
//!
//!     cargo run --release -p amusd-model --example synthetic_gguf -- OUT.gguf [MIX]
//!
//! MIX: `q4_k_m` (the default: q4_k, with V and the down projection of every other layer and the
//! output head in q6_k, as llama.cpp's q4_k_m keeps its more sensitive tensors), `q5_k_m` (the
//! same with q5_k for q4_k) or one type for
//! every matrix (`q4_k`, `q6_k`, `q8_0`, `q4_1`...). Shape: `HIDDEN` (1024), `INTERMEDIATE` (2816),
//! `LAYERS` (16), `HEADS` (16), `KV_HEADS` (4) and `VOCAB` (32000) from the environment.

use amusd_model::testing::TinyModel;
use amusd_model::WeightFormat;
use candle_core::quantized::GgmlDType;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The type of tensor `name` (a GGUF name) under `mix`.
fn type_of(mix: &str, name: &str) -> GgmlDType {
    let base = match mix {
        "q4_k_m" => GgmlDType::Q4K,
        "q5_k_m" => GgmlDType::Q5K,
        _ => {
            return match WeightFormat::parse(mix) {
                Some(WeightFormat::Quantized(t)) => t,
                _ => panic!("unknown mix {mix}: q4_k_m, q5_k_m or a GGUF block type"),
            }
        }
    };
    let layer: Option<usize> = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|i| i.parse().ok());
    let sensitive = name.contains("attn_v") || name.contains("ffn_down");
    match (name, layer) {
        ("output.weight", _) => GgmlDType::Q6K,
        (_, Some(i)) if sensitive && i % 2 == 0 => GgmlDType::Q6K,
        _ => base,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().expect("usage: synthetic_gguf OUT.gguf [MIX]");
    let mix = args.get(1).map_or("q4_k_m", String::as_str);
    let model = TinyModel {
        hidden: env("HIDDEN", 1024),
        intermediate: env("INTERMEDIATE", 2816),
        layers: env("LAYERS", 16),
        heads: env("HEADS", 16),
        kv_heads: env("KV_HEADS", 4),
        context: 4096,
        seed: 7,
        tie_embeddings: false,
        extra_vocab: env("VOCAB", 32000).saturating_sub(TinyModel::default().vocab_size()),
    };
    model
        .write_gguf_typed(std::path::Path::new(out), |name| type_of(mix, name))
        .expect("write the GGUF");
    println!("{out}: {mix}, vocabulary {}", model.vocab_size());
}
