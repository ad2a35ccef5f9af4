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
//! `LAYERS` (16), `HEADS` (16), `KV_HEADS` (4) and `VOCAB` (32000) from the environment;
//! `TIED=1` ties the output head to the embedding, `HEAD=TYPE` stores the head (and the
//! embedding) in that type. The default checkpoint's shape and types, for timing it where it
//! cannot be copied (its 98 MB):
//!
//!     HIDDEN=576 INTERMEDIATE=1536 LAYERS=30 HEADS=9 KV_HEADS=3 VOCAB=49152 TIED=1 HEAD=q8_0 \
//!         synthetic_gguf $AMUSD_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf q4_1

use amusd_model::testing::TinyModel;
use amusd_model::WeightFormat;
use candle_core::quantized::GgmlDType;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A GGUF block type's name (`q4_1`, `q6_k`...).
fn parse_type(name: &str) -> GgmlDType {
    match WeightFormat::parse(name) {
        Some(WeightFormat::Quantized(t)) => t,
        _ => panic!("unknown type {name}: a GGUF block type"),
    }
}

/// The type of tensor `name` (a GGUF name) under `mix`, or the head's type `head`.
fn type_of(mix: &str, head: Option<GgmlDType>, name: &str) -> GgmlDType {
    if let (Some(t), "output.weight" | "token_embd.weight") = (head, name) {
        return t;
    }
    let base = match mix {
        "q4_k_m" => GgmlDType::Q4K,
        "q5_k_m" => GgmlDType::Q5K,
        _ => return parse_type(mix),
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
    let head = std::env::var("HEAD").ok().map(|t| parse_type(&t));
    let model = TinyModel {
        hidden: env("HIDDEN", 1024),
        intermediate: env("INTERMEDIATE", 2816),
        layers: env("LAYERS", 16),
        heads: env("HEADS", 16),
        kv_heads: env("KV_HEADS", 4),
        context: 4096,
        seed: 7,
        tie_embeddings: std::env::var("TIED").is_ok_and(|v| v == "1"),
        extra_vocab: env("VOCAB", 32000).saturating_sub(TinyModel::default().vocab_size()),
        ..TinyModel::default()
    };
    model
        .write_gguf_typed(std::path::Path::new(out), |name| type_of(mix, head, name))
        .expect("write the GGUF");
    println!("{out}: {mix}, vocabulary {}", model.vocab_size());
}
