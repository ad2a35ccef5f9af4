use std::path::PathBuf;

/// Everything that can go wrong loading or running a model. Messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
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
    #[error("{tokens} tokens do not fit in the {capacity}-token context; shorten the prompt or lower --max-new-tokens")]
    ContextOverflow { tokens: usize, capacity: usize },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error("chat template: {0}")]
    Chat(#[from] crate::chat::ChatError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}
