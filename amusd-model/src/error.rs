use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The cause is in the message, so it is not also a `source()`: a chain printed with `{:#}`
    // would say it twice. Likewise below.
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a model amusd can read: {reason}")]
    NotAModel { path: PathBuf, reason: String },
    #[error("{path}: {reason} (the file may be truncated or corrupt; fetch it again)")]
    Corrupt { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("missing tensor '{0}' in the checkpoint")]
    MissingTensor(String),
    #[error("bad model config: {0}")]
    Config(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("{0}")]
    Spec(String),
    #[error("device: {0}")]
    Device(String),
    #[error("{tokens} tokens do not fit in the {capacity}-token context; shorten the prompt or ask for fewer new tokens (--max-new-tokens; a program's max_new_tokens)")]
    ContextOverflow { tokens: usize, capacity: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(crate::tokenizer::TokenizerError),
    #[error("chat template: {0}")]
    Chat(crate::chat::ChatError),
    /// candle's message, its first line (candle appends a backtrace when `RUST_BACKTRACE` is set).
    #[error("{0}")]
    Candle(String),
}

impl From<crate::tokenizer::TokenizerError> for ModelError {
    fn from(e: crate::tokenizer::TokenizerError) -> Self {
        Self::Tokenizer(e)
    }
}

impl From<crate::chat::ChatError> for ModelError {
    fn from(e: crate::chat::ChatError) -> Self {
        Self::Chat(e)
    }
}

impl From<candle_core::Error> for ModelError {
    fn from(e: candle_core::Error) -> Self {
        Self::Candle(printable(&e.to_string()))
    }
}

/// The first line of an error text from another crate, control characters escaped: candle
/// appends backtraces, and a corrupt file's names can hold any bytes.
pub(crate) fn printable(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default().trim();
    line.chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}
