//! How often each draft spec's top token is the verify model's, teacher-forced: over the text files
//! named on the command line, the first 8 chunks of 256 tokens of each, it counts the positions
//! where a draft's argmax equals the f32 model's. The whole model runs with its spec, head, KV
//! cache and activations, so this measures what each choice costs in agreement.
//!
//!     cargo run --release -p amusd-model --example draft_agreement -- \
//!         stored:head=screen:kv=f16:acts=16,stored:head=screen:kv=q8:acts=16 FILE...
//!
//! Uses the default model, or `AMUSD_BENCH_MODEL`.

use amusd_model::{loader, Llama, LogitsFor, ModelSpec};

const CHUNK: usize = 256;
const CHUNKS_PER_FILE: usize = 8;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let specs = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: draft_agreement SPEC[,SPEC...] FILE..."))?;
    let files: Vec<String> = args.collect();
    let path = std::env::var_os("AMUSD_BENCH_MODEL")
        .map_or_else(amusd_model::default_model_path, Into::into);
    let spec =
        |s: &str| -> anyhow::Result<ModelSpec> { Ok(format!("{}:{s}", path.display()).parse()?) };
    let verify = loader::load(&spec("f32")?)?;
    let mut chunks = Vec::new();
    for file in &files {
        let tokens = verify
            .tokenizer
            .encode(&std::fs::read_to_string(file)?, false)?;
        chunks.extend(
            tokens
                .chunks(CHUNK)
                .take(CHUNKS_PER_FILE)
                .map(<[u32]>::to_vec),
        );
    }
    let truth: Vec<Vec<u32>> = chunks
        .iter()
        .map(|c| argmax(&verify.llama, c))
        .collect::<anyhow::Result<_>>()?;
    for s in specs.split(',') {
        let draft = loader::load(&spec(s)?)?;
        let (mut same, mut total) = (0, 0);
        for (chunk, truth) in chunks.iter().zip(&truth) {
            let got = argmax(&draft.llama, chunk)?;
            same += got.iter().zip(truth).filter(|(a, b)| a == b).count();
            total += got.len();
        }
        println!(
            "{s}: {same} of {total} positions propose the f32 model's token ({:.2}%)",
            100.0 * same as f64 / total.max(1) as f64
        );
    }
    Ok(())
}

/// The top token after every position of `tokens`, from an empty cache.
fn argmax(model: &Llama, tokens: &[u32]) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.new_cache(tokens.len());
    Ok(model
        .forward(tokens, 0, &mut cache, LogitsFor::All)?
        .argmax())
}
