//! How often a draft's output head choice proposes the token its whole head would: teacher-forced
//! over the text files named on the command line, the first 8 chunks of 256 tokens of each, it
//! counts the positions where the two argmaxes agree (see [`amusd_model::HeadChoice`]).
//!
//!     cargo run --release --example head_agreement -- HEAD FILE... # e.g. screen, screen:16, 16384
//!
//! Uses the default model as stored, or `AMUSD_BENCH_MODEL`.

use amusd_model::{loader, HeadChoice, Llama, LogitsFor, ModelSpec};

const CHUNK: usize = 256;
const CHUNKS_PER_FILE: usize = 8;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let head: HeadChoice = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: head_agreement HEAD FILE..."))?
        .parse()?;
    let path = std::env::var_os("AMUSD_BENCH_MODEL")
        .map_or_else(amusd_model::default_model_path, Into::into);
    let spec: ModelSpec = format!("{}:stored", path.display()).parse()?;
    let whole = loader::load(&spec)?;
    let mut chosen = loader::load_weights(&spec)?.0;
    let what = loader::choose_head(&spec.path, &mut chosen, head)?;
    let (mut same, mut total) = (0, 0);
    for file in args {
        let tokens = whole
            .tokenizer
            .encode(&std::fs::read_to_string(&file)?, false)?;
        for chunk in tokens.chunks(CHUNK).take(CHUNKS_PER_FILE) {
            let (a, b) = (argmax(&whole.llama, chunk)?, argmax(&chosen, chunk)?);
            same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
            total += a.len();
        }
    }
    println!(
        "head={head}{what}: {same} of {total} positions propose the whole head's token ({:.2}%); \
         bytes per token {} against {}",
        100.0 * same as f64 / total.max(1) as f64,
        chosen.matmul_cost().0,
        whole.llama.matmul_cost().0
    );
    Ok(())
}

/// The top token after every position of `tokens`, from an empty cache.
fn argmax(model: &Llama, tokens: &[u32]) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.new_cache(tokens.len());
    Ok(model
        .forward(tokens, 0, &mut cache, LogitsFor::All)?
        .argmax())
}
