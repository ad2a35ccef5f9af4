//! Counts the tokens of the files named on standard input and prints a token ranking
//! ([`amusd_model::ranking`]): `vocab`, `fingerprint`, then every id that occurred, most frequent
//! first (ties by id). `scripts/rank-tokens.sh` runs it over a corpus; a file that is not UTF-8 is
//! skipped.
//!
//!     find DIR -name '*.py' | cargo run --release --example rank_tokens -- [MODEL.gguf]

use std::io::{BufRead, Write};

use amusd_model::gguf::GgufFile;
use amusd_model::ranking::fingerprint;
use amusd_model::tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .map_or_else(amusd_model::default_model_path, Into::into);
    let gguf = GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf_metadata(gguf.metadata())?;
    let tokens = gguf.token_strings();
    let mut counts = vec![0u64; tokens.len()];
    let (mut files, mut bytes) = (0, 0);
    for name in std::io::stdin().lock().lines() {
        let Ok(text) = std::fs::read_to_string(name?) else {
            continue;
        };
        (files, bytes) = (files + 1, bytes + text.len());
        // Whole lines, ~20 KB at a time: a tokenizer call per file of megabytes is slow.
        let mut chunk = String::new();
        for line in text.split_inclusive('\n').chain([""]) {
            chunk.push_str(line);
            if chunk.len() > 20_000 || line.is_empty() {
                for id in tokenizer.encode(&chunk, false)? {
                    counts[id as usize] += 1;
                }
                chunk.clear();
            }
        }
    }
    let mut ids: Vec<usize> = (0..counts.len()).filter(|&i| counts[i] > 0).collect();
    ids.sort_by_key(|&i| (std::cmp::Reverse(counts[i]), i));
    let total: u64 = counts.iter().sum();
    eprintln!(
        "{files} files, {bytes} bytes, {total} tokens, {} distinct",
        ids.len()
    );
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    writeln!(out, "vocab {}", tokens.len())?;
    writeln!(out, "fingerprint {:#018x}", fingerprint(&tokens))?;
    for i in ids {
        writeln!(out, "{i}")?;
    }
    Ok(())
}
