//! `amusd bench` and `amusd report` (to be written).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

#[derive(Args, Debug)]
pub struct ReportArgs {}

pub fn run(_args: BenchArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}

pub fn report(_args: ReportArgs) -> Result<ExitCode> {
    anyhow::bail!("not yet")
}
