//! `amusd chat`: a conversation in the terminal, as llama.cpp's `llama-cli` conversation mode.
//! The models load once; each line read is a user message, the reply streams as it is committed,
//! and the conversation so far is the next prompt, so each turn prefills only what the previous
//! one did not leave cached.

use std::io::{BufRead, IsTerminal, Write};
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use amusd_model::chat::Message;
use amusd_model::tokenizer::Tokenizer;
use amusd_spec::generate::check_fits;
use amusd_spec::logprobs::Logprobs;
use amusd_spec::{Generation, RequestSampling, StopCriteria};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::args::{ModelArgs, SamplingArgs, Strategy};
use crate::backend::{Backend, Request};
use crate::generate::{prepare, Prepared};
use crate::output::{print_text, stdout_gone};
use crate::prompt::Texts;
use crate::supervisor::{install_signal_handlers, INTERRUPTED};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[arg(long, value_enum, default_value = "amusd")]
    pub strategy: Strategy,
    /// The system message that opens the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// No statistics line on standard error after each reply.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// What the user can type besides a message.
const HELP: &str =
    "one line per message (a line ending in \\ goes on to the next); /reset forgets the conversation, /exit (or end of input) ends the chat";

pub fn run(args: ChatArgs) -> Result<ExitCode> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 generates nothing; pass at least 1");
    }
    // Each turn's prompt starts with the previous one's: keep what that left cached.
    let sampling = RequestSampling {
        cache_prompt: true,
        ..args.sampling.resolve()?
    };
    // Ctrl-C ends the chat under every strategy, the workers stopped and the region removed.
    install_signal_handlers();
    let (m, strategy) = (&args.models, args.strategy);
    let Prepared {
        verify_spec,
        draft_spec,
        texts,
    } = prepare(m, strategy)?;
    let Some(tokenizer) = texts.verify.as_ref().map(|t| t.tokenizer.clone()) else {
        bail!("amusd chat needs a real verify model (a fake one has no text)");
    };
    let sampling = texts.with_dry_breakers(sampling, &args.sampling.dry.breakers());
    texts.check_sampling(&sampling)?;
    let backend = Backend::open(strategy, m, &verify_spec, draft_spec.as_deref())?;
    let opening: Vec<Message> = args.system.iter().cloned().map(Message::system).collect();
    let mut chat = Chat {
        texts,
        tokenizer,
        backend,
        sampling,
        max_new_tokens: args.max_new_tokens,
        limit: strategy.token_limit(),
        messages: opening.clone(),
        opening,
        quiet: args.quiet,
    };
    chat.converse()
}

/// What the user did next.
enum Next {
    Message(String),
    End,
    Interrupted,
}

/// The next message: a line, or lines joined while each ends with `\` (llama.cpp's
/// continuation), prompted by `> ` (then `. `) on a terminal.
fn next_message(lines: &Receiver<std::io::Result<String>>, interactive: bool) -> Result<Next> {
    let mut message = String::new();
    loop {
        if interactive {
            print_text(if message.is_empty() { "> " } else { ". " });
        }
        let line = loop {
            match lines.recv_timeout(Duration::from_millis(50)) {
                _ if INTERRUPTED.load(Ordering::SeqCst) => return Ok(Next::Interrupted),
                // One line of other bytes (Latin-1 pasted in) is said and skipped, as a message
                // too long for the context is; the chat goes on with the next.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    eprintln!("amusd: a line that is not UTF-8 was skipped");
                    message.clear();
                    if interactive {
                        print_text("> ");
                    }
                    continue;
                }
                Ok(line) => break line.context("cannot read standard input")?,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) if message.is_empty() => return Ok(Next::End),
                Err(RecvTimeoutError::Disconnected) => return Ok(Next::Message(message)),
            }
        };
        match line.strip_suffix('\\') {
            Some(part) => {
                message.push_str(part);
                message.push('\n');
            }
            None => {
                message.push_str(&line);
                return Ok(Next::Message(message));
            }
        }
    }
}

/// Standard input's lines, read on a thread of their own; the channel closes at its end.
fn read_lines() -> Receiver<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn interrupted() -> ExitCode {
    println!();
    eprintln!("amusd: interrupted; workers stopped, region removed");
    ExitCode::from(130)
}

/// A conversation and the models it runs on.
struct Chat {
    texts: Texts,
    tokenizer: Tokenizer,
    backend: Backend,
    sampling: RequestSampling,
    max_new_tokens: usize,
    /// The most tokens a request may hold under the strategy.
    limit: usize,
    /// The system message, kept across `/reset`.
    opening: Vec<Message>,
    messages: Vec<Message>,
    quiet: bool,
}

impl Chat {
    /// Reads messages until the input ends or the user leaves, answering each. Ctrl-C ends the
    /// chat at once, waiting for input or not (the lines are read on their own thread).
    fn converse(&mut self) -> Result<ExitCode> {
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!("amusd: chat ready ({HELP})");
        }
        let lines = read_lines();
        loop {
            let message = match next_message(&lines, interactive)? {
                Next::Message(m) => m,
                Next::End => return Ok(ExitCode::SUCCESS),
                Next::Interrupted => return Ok(interrupted()),
            };
            match message.trim() {
                "" => {}
                "/exit" | "/quit" => return Ok(ExitCode::SUCCESS),
                "/reset" => self.messages = self.opening.clone(),
                "/help" => eprintln!("amusd: {HELP}"),
                _ => self.turn(message)?,
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Ok(interrupted());
            }
            if stdout_gone() {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }

    /// One exchange: the user's message, the reply streamed and kept. A conversation grown past
    /// the context is said, and the message dropped, so the chat can go on after `/reset`.
    fn turn(&mut self, text: String) -> Result<()> {
        self.messages.push(Message::user(text));
        let (prompt, stop_ids) = self.texts.prompt(&self.messages, false, None)?;
        let capacity = self.texts.context(self.limit);
        if let Err(e) = check_fits(capacity, prompt.len(), self.max_new_tokens) {
            self.messages.pop();
            eprintln!("amusd: {e}; /reset starts a new conversation");
            return Ok(());
        }
        let stop = StopCriteria {
            stop_ids,
            max_new_tokens: self.max_new_tokens,
        };
        let request = Request {
            prompt: &prompt,
            stop: &stop,
            sampling: &self.sampling,
            cancelled: None,
        };
        let g = reply(&mut self.backend, &self.tokenizer, &request)?;
        print_text("\n");
        let reply = self.tokenizer.decode(&g.tokens, true)?;
        self.messages.push(Message::assistant(reply));
        if !self.quiet {
            let m = &g.metrics;
            eprintln!(
                "[{} tokens, {:.0} ms to the first ({} of {} prompt tokens cached), {:.1} ms/token, {}/{} drafts accepted]",
                g.tokens.len(),
                1e3 * m.ttft,
                m.cached_prompt_tokens,
                prompt.len(),
                m.ms_per_token(),
                m.accepted,
                m.proposed
            );
        }
        Ok(())
    }
}

/// Runs the request, printing the reply as it is committed.
fn reply(
    backend: &mut Backend,
    tokenizer: &Tokenizer,
    request: &Request<'_>,
) -> Result<Generation> {
    let mut stream = tokenizer.stream(true);
    let mut on_tokens = |ids: &[u32], _: &[Logprobs]| {
        for &id in ids {
            if let Ok(piece) = stream.step(id) {
                print_text(&piece);
            }
        }
        // Ctrl-C, or stdout's reader leaving, ends the reply at its next tokens under every
        // strategy (the worker pair's supervisor stops as well).
        match INTERRUPTED.load(Ordering::SeqCst) || stdout_gone() {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    };
    let result = backend.generate(request, &mut on_tokens);
    if let Ok(rest) = stream.finish() {
        print_text(&rest);
    }
    let _ = std::io::stdout().flush();
    Ok(result?.generation)
}
