//! `amusd dump` (to be written).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct DumpArgs {}

pub fn run(_args: DumpArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}

#[derive(Args, Debug)]
pub struct KillArgs {}

pub fn kill(_args: KillArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}
