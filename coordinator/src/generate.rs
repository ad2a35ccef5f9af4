//! `amusd generate`: one prompt, one strategy.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use amusd_model::chat::Message;
use amusd_model::tokenizer::Tokenizer;
use amusd_spec::generate::check_fits;
use amusd_spec::logprobs::{Logprobs, TokenLogprob};
use amusd_spec::{Generation, RequestSampling, StopCriteria};
use anyhow::{bail, Result};
use clap::Args;

use crate::args::{sampling_json, sampling_label, ModelArgs, SamplingArgs, Strategy};
use crate::backend::{bind_in_process, Backend, Request, Workers};
use crate::output::print_text;
use crate::prompt::{prompt_text, Texts};
use crate::supervisor::INTERRUPTED;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// How to decode: the tool's own method by default, `ar` for the verify model alone.
    #[arg(long, value_enum, default_value = "amusd")]
    pub strategy: Strategy,
    /// The user's message (the chat template is applied unless --raw). Without --prompt or
    /// --prompt-file, the prompt is read from standard input when that is not a terminal.
    #[arg(long, short, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Feed the prompt to the model as is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// System message (chat mode).
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Print one JSON object (strategy, prompt tokens, token ids, text, metrics) instead of streaming.
    #[arg(long)]
    pub json: bool,
    /// With --json: each generated token's log-probability under the verify model (the
    /// log-softmax of its raw logits, the same in every strategy) and the N most likely tokens'
    /// at its position (0 to 20).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=20))]
    pub logprobs: Option<u8>,
    /// With --logprobs: the prompt's tokens' too (each but the first, given the tokens before it;
    /// as OpenAI's `echo`), in `prompt_logprobs`. The verify model prefills the whole prompt.
    #[arg(long, requires = "logprobs")]
    pub prompt_logprobs: bool,
    /// Token ids to use as the prompt instead of text (for fake test models).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens 0 generates nothing; pass at least 1");
    }
    if args.logprobs.is_some() && !args.json {
        bail!("--logprobs prints in the JSON output: add --json");
    }
    let sampling = RequestSampling {
        logprobs: args.logprobs.map(usize::from),
        prompt_logprobs: args.prompt_logprobs,
        ..args.sampling.resolve()?
    };
    let messages = messages(&args)?;
    let (m, strategy) = (&args.models, args.strategy);
    let Prepared {
        verify_spec,
        draft_spec,
        texts,
    } = prepare(m, strategy)?;
    let sampling = texts.with_dry_breakers(sampling, &args.sampling.dry.breakers());
    texts.check_sampling(&sampling)?;
    let (prompt, stop_ids) = texts.prompt(&messages, args.raw, args.prompt_ids.as_deref())?;
    let stop = StopCriteria {
        stop_ids,
        max_new_tokens: args.max_new_tokens,
    };
    // Checked before any weight loads: a request that cannot fit is the user's error, not a
    // worker fault to restart.
    check_fits(
        texts.context(strategy.token_limit()),
        prompt.len(),
        args.max_new_tokens,
    )?;
    if strategy == Strategy::Amusd {
        // Ctrl-C then stops the workers and removes the region (ar and sd just exit).
        crate::supervisor::install_signal_handlers();
    }
    let mut backend = Backend::open(strategy, m, &verify_spec, draft_spec.as_deref())?;
    let tokenizer = texts.verify.as_ref().map(|t| &t.tokenizer);
    let request = Request {
        prompt: &prompt,
        stop: &stop,
        sampling: &sampling,
        cancelled: None,
    };
    let result = stream(&mut backend, &request, tokenizer.filter(|_| !args.json));
    if let Backend::Amusd(w) = &backend {
        report_faults(w);
    }
    drop(backend);
    if INTERRUPTED.load(Ordering::SeqCst) {
        println!();
        eprintln!("amusd: interrupted; workers stopped, region removed");
        return Ok(ExitCode::from(130));
    }
    let out = Output {
        strategy,
        prompt_tokens: prompt.len(),
        sampling: &sampling,
        drafter: m.drafter_label(),
        json: args.json,
    };
    finish_output(&out, tokenizer, &result?)?;
    Ok(ExitCode::SUCCESS)
}

/// What a strategy's run needs before its models load: the specs and both models' text side.
pub struct Prepared {
    pub verify_spec: String,
    pub draft_spec: Option<String>,
    pub texts: Texts,
}

/// What [`Prepared::read`] could not do, by whose it is to fix.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// An option's value is wrong: a device, a lookup range, a draft spec for the strategy.
    #[error("{0:#}")]
    Options(anyhow::Error),
    /// A model's spec, tokenizer or chat template does not load.
    #[error("{0:#}")]
    Load(anyhow::Error),
}

impl Prepared {
    /// Reads the models' specs and text side, binding nothing; the user's mistakes (a bad
    /// device, lookup range or chat template) are said before any weight loads.
    pub fn read(m: &ModelArgs, strategy: Strategy) -> Result<Self, PrepareError> {
        let options = PrepareError::Options;
        m.verify_device().map_err(options)?;
        if strategy == Strategy::Amusd {
            m.draft_device().map_err(options)?;
        }
        m.lookup_alone().map_err(options)?;
        let verify_spec = m.verify_spec().map_err(PrepareError::Load)?;
        let draft_spec = match strategy {
            Strategy::Ar => None,
            Strategy::Sd | Strategy::Amusd => Some(m.draft_spec(strategy).map_err(options)?),
        };
        let texts = Texts::load(&verify_spec, draft_spec.as_deref())
            .and_then(|t| t.with_chat_template(m.chat_template_file.as_deref()))
            .map_err(PrepareError::Load)?;
        Ok(Self {
            verify_spec,
            draft_spec,
            texts,
        })
    }
}

/// [`Prepared::read`], then binds this process to the verify device if it decodes here.
pub fn prepare(m: &ModelArgs, strategy: Strategy) -> Result<Prepared> {
    let prepared = Prepared::read(m, strategy)?;
    if strategy != Strategy::Amusd {
        bind_in_process(m.verify_device()?)?;
    }
    Ok(prepared)
}

/// The conversation: the system message if any, then the user's prompt (empty with `--prompt-ids`).
fn messages(args: &GenerateArgs) -> Result<Vec<Message>> {
    let text = if args.prompt_ids.is_some() {
        String::new()
    } else {
        prompt_text(args.prompt.as_deref(), args.prompt_file.as_deref())?
    };
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::system(s.clone()));
    }
    messages.push(Message::user(text));
    Ok(messages)
}

/// Runs the request, printing its text as it comes when `tokenizer` is given; a trailing partial
/// character is flushed at the end.
fn stream(
    backend: &mut Backend,
    request: &Request<'_>,
    tokenizer: Option<&Tokenizer>,
) -> Result<Generation> {
    let mut stream = tokenizer.map(|t| t.stream(true));
    let mut on_tokens = |ids: &[u32], _: &[Logprobs]| {
        if let Some(s) = stream.as_mut() {
            for &id in ids {
                if let Ok(piece) = s.step(id) {
                    if !print_text(&piece) {
                        // Nobody reads on: stop the pair rather than generate for no one.
                        return ControlFlow::Break(());
                    }
                }
            }
        }
        ControlFlow::Continue(())
    };
    let result = backend.generate(request, &mut on_tokens);
    if let Some(rest) = stream.as_mut().and_then(|s| s.finish().ok()) {
        print_text(&rest);
    }
    Ok(result?.generation)
}

fn report_faults(w: &Workers) {
    let f = w.fault_stats();
    if f.restarts > 0 || f.injected > 0 {
        eprintln!(
            "amusd: faults injected {}, worker restarts {}, worst recovery {} ms",
            f.injected,
            f.restarts,
            f.worst_recovery.map_or(0, |d| d.as_millis())
        );
    }
}

/// What a generation's output reports besides the generation itself.
pub struct Output<'a> {
    pub strategy: Strategy,
    pub prompt_tokens: usize,
    pub sampling: &'a RequestSampling,
    /// How sd and amusd draft (`ModelArgs::drafter_label`).
    pub drafter: String,
    pub json: bool,
}

/// Prints the trailing newline and summary, or the JSON object (without text for a fake model,
/// which has no tokenizer).
pub fn finish_output(
    out: &Output<'_>,
    tokenizer: Option<&Tokenizer>,
    g: &Generation,
) -> Result<()> {
    if !out.json {
        print_text("\n");
        let drafter = if out.strategy == Strategy::Ar {
            String::new()
        } else {
            format!("; {} draft", out.drafter)
        };
        eprintln!(
            "{}; {}{drafter}",
            summary_line(out.strategy, &g.metrics),
            sampling_label(out.sampling)
        );
        return Ok(());
    }
    let mut json = serde_json::json!({
        "strategy": out.strategy.name(),
        "drafter": out.drafter,
        "prompt_tokens": out.prompt_tokens,
        "tokens": g.tokens,
        "finish_reason": g.finish,
        "sampling": sampling_json(out.sampling),
        "metrics": summary_json(&g.metrics),
    });
    if let Some(t) = tokenizer {
        json["text"] = t.decode(&g.tokens, true)?.into();
    }
    if out.sampling.logprobs.is_some() {
        json["logprobs"] = logprobs_json(&g.logprobs, tokenizer)?;
    }
    if out.sampling.prompt_logprobs {
        json["prompt_logprobs"] = logprobs_json(&g.prompt_logprobs, tokenizer)?;
    }
    print_text(&format!("{json}\n"));
    Ok(())
}

/// Each generated token's log-probability and its position's most likely tokens, with their
/// text where there is a tokenizer.
fn logprobs_json(all: &[Logprobs], tokenizer: Option<&Tokenizer>) -> Result<serde_json::Value> {
    let entry = |t: &TokenLogprob| -> Result<serde_json::Value> {
        let mut v = serde_json::json!({"token": t.token, "logprob": t.logprob});
        if let Some(tok) = tokenizer {
            v["text"] = tok.decode(&[t.token], false)?.into();
        }
        Ok(v)
    };
    let rows = all.iter().map(|l| -> Result<serde_json::Value> {
        let mut v = entry(&l.chosen)?;
        v["top"] = l.top.iter().map(entry).collect::<Result<Vec<_>>>()?.into();
        Ok(v)
    });
    Ok(rows.collect::<Result<Vec<_>>>()?.into())
}

pub fn summary_json(m: &amusd_spec::Metrics) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": m.prompt_tokens,
        "split_prompt_tokens": m.split_prompt_tokens,
        "new_tokens": m.new_tokens,
        "ttft_ms": m.ttft * 1e3,
        "decode_tokens": m.decode_tokens,
        "decode_ms_per_token": m.ms_per_token(),
        "tokens_per_s": if m.ms_per_token() > 0.0 { 1e3 / m.ms_per_token() } else { 0.0 },
        "e2e_tokens_per_s": m.e2e_tokens_per_s(),
        "total_time_s": m.total_time,
        "draft_forwards": m.draft_forwards(),
        "proposed": m.proposed,
        "accepted": m.accepted,
        "proposed_lookup": m.proposed_lookup,
        "accepted_lookup": m.accepted_lookup,
        "proposed_model": m.proposed - m.proposed_lookup,
        "accepted_model": m.accepted - m.accepted_lookup,
        "acceptance_rate": m.acceptance_rate(),
        "verify_steps": m.verify_steps,
        "tokens_per_verify_step": m.tokens_per_step(),
        "rollbacks": m.rollbacks,
    })
}

pub fn summary_line(strategy: Strategy, m: &amusd_spec::Metrics) -> String {
    let (name, prompt) = (strategy.name(), m.prompt_tokens);
    let split = match m.split_prompt_tokens {
        0 => String::new(),
        n => format!(" ({n} prefilled by the draft worker)"),
    };
    // No token (a grammar that allows only the empty answer): no rate to give.
    let mut s = if m.new_tokens == 0 {
        let ms = m.total_time * 1e3;
        format!("[{name}] prompt {prompt} tokens{split}, generated 0 tokens in {ms:.0} ms")
    } else {
        let tps = if m.ms_per_token() > 0.0 {
            1e3 / m.ms_per_token()
        } else {
            0.0
        };
        format!(
            "[{name}] prompt {prompt} tokens{split}, generated {} tokens, ttft {:.0} ms, decode {:.1} ms/token ({:.1} tokens/s), end to end {:.1} tokens/s",
            m.new_tokens,
            m.ttft * 1e3,
            m.ms_per_token(),
            tps,
            m.e2e_tokens_per_s()
        )
    };
    if strategy != Strategy::Ar {
        s.push_str(&format!(
            "; draft forwards {}, offered {}, accepted {} ({:.0}%), {:.2} tokens/verify step, {} rollbacks",
            m.draft_forwards(),
            m.proposed,
            m.accepted,
            100.0 * m.acceptance_rate(),
            m.tokens_per_step(),
            m.rollbacks
        ));
        if m.proposed_lookup > 0 {
            s.push_str(&format!(
                "; by source: lookup {}/{} accepted, model {}/{}",
                m.accepted_lookup,
                m.proposed_lookup,
                m.accepted - m.accepted_lookup,
                m.proposed - m.proposed_lookup
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No token generated: the summary gives no rate (before, 0 tokens read "3.8 tokens/s").
    #[test]
    fn a_summary_of_no_tokens_gives_no_rate() {
        let m = amusd_spec::Metrics {
            prompt_tokens: 5,
            total_time: 0.2625,
            ..Default::default()
        };
        let line = summary_line(Strategy::Ar, &m);
        assert_eq!(line, "[ar] prompt 5 tokens, generated 0 tokens in 262 ms");
        let m = amusd_spec::Metrics {
            new_tokens: 2,
            decode_tokens: 1,
            decode_time: 0.01,
            ..m
        };
        assert!(summary_line(Strategy::Ar, &m).contains("10.0 ms/token (100.0 tokens/s)"));
    }
}
