//! What structured output costs on a real vocabulary: building the compiler (once per process),
//! compiling a grammar (once per request) and one mask (once per row a model decodes).
//!
//! `cargo run --release -p amusd-grammar --example grammar_cost [-- MODEL.gguf]` (default: the
//! default model).

use std::time::Instant;

use amusd_grammar::GrammarCompiler;
use amusd_spec::constraint::{Constraint, Grammar, GrammarKind};

const SCHEMA: &str = r#"{"type": "object", "properties": {"name": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}, "score": {"type": "number"}},
    "required": ["name", "tags", "score"]}"#;

fn main() {
    let path = std::env::args()
        .nth(1)
        .map_or_else(amusd_model::default_model_path, Into::into);
    let t = Instant::now();
    let text = amusd_model::loader::load_text(&path.to_string_lossy().parse().unwrap()).unwrap();
    let t_text = t.elapsed();
    let t = Instant::now();
    let c = GrammarCompiler::from_tokenizer(&text.tokenizer, &text.eos_ids).unwrap();
    let t_compiler = t.elapsed();
    println!(
        "tokenizer {:.1} ms, compiler {:.1} ms ({} tokens)",
        ms(t_text),
        ms(t_compiler),
        c.vocab_size()
    );
    for g in [
        Grammar::new(GrammarKind::JsonObject, ""),
        Grammar::new(GrammarKind::JsonSchema, SCHEMA),
        Grammar::new(GrammarKind::Regex, r"(.|\n)*"),
        Grammar::new(GrammarKind::JsonSchema, r#"{"type": "string"}"#),
        Grammar::new(GrammarKind::Gbnf, amusd_grammar::gbnf::JSON_OBJECT),
    ] {
        let t = Instant::now();
        let mut m = c.constraint(&g).unwrap();
        let t_compile = t.elapsed();
        // Masks along the lowest-id allowed token's path, as a decoder's rows would ask (a string
        // or free text allows most of the vocabulary: the dearest masks).
        let mut logits = vec![0.0f32; c.vocab_size()];
        let (mut tokens, mut total, n) = (Vec::new(), 0.0, 200);
        for _ in 0..n {
            logits.fill(0.0);
            let t = Instant::now();
            m.mask(&tokens, &mut logits);
            total += ms(t.elapsed());
            // The first allowed token that does not end the text.
            let allowed = |t: usize| logits[t] == 0.0 && !text.eos_ids.contains(&(t as u32));
            let Some(next) = (0..logits.len()).find(|&t| allowed(t)) else {
                break;
            };
            tokens.push(next as u32);
        }
        println!(
            "{g}: compile {:.2} ms, mask {:.3} ms on average over {} tokens",
            ms(t_compile),
            total / tokens.len().max(1) as f64,
            tokens.len()
        );
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
