//! Finding, and on first use fetching, the default model.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The fetch script, embedded so an installed binary can fetch without the source tree.
const FETCH_SCRIPT: &str = include_str!("../../scripts/fetch-assets.sh");

/// The default model's path, fetching it first if it is missing.
pub fn ensure_default_model() -> Result<PathBuf> {
    let path = amusd_model::default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    fetch(&["model"])?;
    if !path.is_file() {
        bail!(
            "the default model is still missing at {} after fetching",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `scripts/fetch-assets.sh WHAT...`.
pub fn fetch(what: &[&str]) -> Result<()> {
    let status = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-assets.sh")
        .args(what)
        .env("AMUSD_SRC_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .context("cannot run bash to fetch the model; run scripts/fetch-assets.sh by hand")?;
    if !status.success() {
        bail!(
            "fetching {} failed (see above); pass a model path with --verify-model/--draft-model",
            what.join(", ")
        );
    }
    Ok(())
}
