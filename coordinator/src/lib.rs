//! The coordinator: the `amusd` command line's commands, the supervisor of the two worker
//! processes, and [`Engine`], which embeds a model pair in a program: load once, then generate
//! from text, a conversation or token ids, streamed or whole, with any strategy (`ar`, `sd`,
//! `amusd`) and the same tokens from each.

mod args;
mod assets;
mod backend;
mod engine;
mod output;
mod prompt;
mod supervisor;

// The command line's commands (the `amusd` binary is their dispatcher).
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod chat;
#[doc(hidden)]
pub mod dump;
#[doc(hidden)]
pub mod generate;
#[doc(hidden)]
pub mod serve;
#[doc(hidden)]
pub mod signal;

pub use amusd_model::chat::Message;
pub use amusd_model::tokenizer::Tokenizer;
// What a program fills `GenerateParams::sampling` with, and reads a generation's log-probabilities
// as: nameable without a dependency on the crates that define them.
pub use amusd_spec::constraint::{Grammar, GrammarKind};
pub use amusd_spec::logprobs::Logprobs;
pub use amusd_spec::{Dry, LogitBias, Penalties};
pub use amusd_spec::{Finish, Generation, Metrics, RequestSampling, SamplingParams};
pub use args::Strategy;
pub use engine::{Engine, EngineBuilder, EngineError, GenerateParams, Output};
