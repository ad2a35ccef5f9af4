//! Where amusd keeps fetched models and datasets.

use std::path::PathBuf;

/// The checkpoint amusd fetches and uses by default (see `scripts/fetch-assets.sh`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `${AMUSD_HOME:-$HOME/.cache/amusd}`.
pub fn amusd_home() -> PathBuf {
    match std::env::var_os("AMUSD_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/amusd"),
    }
}

pub fn default_model_path() -> PathBuf {
    amusd_home().join("models").join(DEFAULT_MODEL_FILE)
}
