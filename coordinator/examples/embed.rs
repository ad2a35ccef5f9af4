//! amusd inside a program: the default model pair loaded once (fetched on first use), one answer
//! streamed as it is committed, then a second request on the same workers.
//!
//!     cargo build --release && cargo run --release -p coordinator --example embed
//!
//! The example's binary lies in `target/release/examples/`; the engine finds the worker binaries
//! one directory up (`EngineBuilder::worker_dir` names another place).

use std::io::Write;
use std::ops::ControlFlow;

use amusd::{Engine, EngineError, GenerateParams, Message, Strategy};

fn main() -> Result<(), EngineError> {
    let mut engine = Engine::builder()
        .strategy(Strategy::Amusd)
        .progress(true)
        .build()?;
    let params = GenerateParams {
        max_new_tokens: 64,
        ..GenerateParams::default()
    };
    let question = [Message::user("Write a haiku about the sea.")];
    let reply = engine.chat_stream(&question, &params, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
        ControlFlow::Continue(())
    })?;
    let m = &reply.generation.metrics;
    println!(
        "\n[{} tokens, {:.1} ms/token, {}/{} drafts accepted]",
        m.new_tokens,
        m.ms_per_token(),
        m.accepted,
        m.proposed
    );
    let short = engine.chat(&[Message::user("What is the capital of France?")], &params)?;
    println!("{}", short.text);
    Ok(())
}
