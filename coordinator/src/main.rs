//! `amusd`: the coordinator command line.

use std::process::ExitCode;

use amusd::{bench, chat, dump, generate, serve, signal};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "amusd",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("AMUSD_COMMIT"), ")"),
    about = "Asynchronous multi-device speculative decoding (AMUSD)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt with one strategy (ar, sd or amusd).
    Generate(Box<generate::GenerateArgs>),
    /// Chat in the terminal: one line per message, replies streamed, the models loaded once.
    Chat(Box<chat::ChatArgs>),
    /// Run a dataset through several strategies, check they agree, record timings.
    Bench(Box<bench::BenchArgs>),
    /// Serve the OpenAI API (chat and text completions, streamed or not) on one worker pair.
    Serve(Box<serve::ServeArgs>),
    /// Print the paper-style table from `amusd bench` results.
    Report(bench::ReportArgs),
    /// List amusd shared-memory regions, or show one: request, buffers, workers, recent events.
    Dump(dump::DumpArgs),
    /// Send a signal to one worker of a running amusd (fault testing).
    WorkerKill(signal::KillArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::Chat(args) => chat::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Report(args) => bench::report(args),
        Command::Dump(args) => dump::run(args),
        Command::WorkerKill(args) => signal::kill(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, the causes joined: user errors are not bugs and get no backtrace.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("amusd: error: {msg}");
            ExitCode::from(2)
        }
    }
}
