//! The decode thread: takes jobs from the bounded queue one at a time, runs them through the
//! [`Generator`], turns tokens into text (stop strings applied) and sends it to the request's
//! handler. The async side never touches the model.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::ApiError;
use crate::generator::{
    Codec, GenError, GenRequest, GenStats, Generator, GeneratorFactory, TokenLogprobs, IDLE_EVERY,
};
use crate::metrics::Metrics;
use crate::stop::StopMatcher;

/// One queued request.
pub struct Job {
    /// The response's id, which the request log names.
    pub id: String,
    /// The first choice's generation; choice `i` adds `i` to its seed ([`Job::choice`]).
    pub request: GenRequest,
    /// Choices to generate, one after another.
    pub n: usize,
    pub stop: Vec<String>,
    pub arrived: Instant,
    /// `--request-timeout`, counted from arrival.
    pub deadline: Option<Instant>,
    pub events: UnboundedSender<Event>,
    /// Send the generated token ids with the text (llama.cpp's `return_tokens`).
    pub return_tokens: bool,
}

impl Job {
    /// Choice `i`'s generation: the request's, its seed (if it has one) plus `i`, so a seeded
    /// request's choices differ and each can be repeated alone (choice 0 is the `n = 1` answer;
    /// without a seed each gets a random one; greedy choices are all the same text).
    pub fn choice(&self, i: usize) -> GenRequest {
        let mut r = self.request.clone();
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i as u64));
        r
    }
}

/// What the decode thread tells a request's handler: choice `i`'s text as it comes and its end,
/// the choices in order; or a failure, which ends the request.
#[derive(Debug)]
pub enum Event {
    /// Text of choice `i`, and the log-probabilities and the ids of the tokens that completed it
    /// (each when asked for; a token whose text is held back, a multi-byte character's or a
    /// possible stop string's, comes with the text that releases it).
    Text(usize, String, Vec<LogprobEntry>, Vec<u32>),
    Done(usize, Summary),
    Failed(ApiError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    Stop,
    Length,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens: how many were found cached.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

/// llama.cpp's server `timings` object, so dashboards made for it read ours.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timings {
    pub prompt_n: usize,
    /// From the start of generation to the first token (prefill and first step).
    pub prompt_ms: f64,
    pub predicted_n: usize,
    /// From the first token to the last.
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
    pub draft_n: u64,
    pub draft_n_accepted: u64,
    /// Prompt tokens reused from the previous request's cache.
    pub cache_n: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub finish: Finish,
    /// A stop string ended it (llama.cpp's `stop_type` "word"), not the model.
    pub stopped_by_word: bool,
    pub usage: Usage,
    pub timings: Timings,
    /// Each generated token's log-probability, with its text, when the request asked.
    pub logprobs: Option<Vec<LogprobEntry>>,
    /// The prompt's tokens' from its second token on, when the request asked (`echo`).
    pub prompt_logprobs: Option<Vec<LogprobEntry>>,
    /// Each generated token's id, when the request asked (llama.cpp's `return_tokens`).
    pub tokens: Option<Vec<u32>>,
}

/// A generated token's text and log-probability, and its position's most likely tokens'.
#[derive(Clone, Debug, PartialEq)]
pub struct LogprobEntry {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl LogprobEntry {
    fn of(codec: &dyn Codec, l: &TokenLogprobs) -> Self {
        Self {
            text: codec.token_text(l.token),
            logprob: l.logprob,
            top: (l.top.iter())
                .map(|&(t, lp)| (codec.token_text(t), lp))
                .collect(),
        }
    }
}

impl Summary {
    /// The usage and timings of a request's choices together: the prompt once (the first
    /// choice's prefill; the later ones find it cached), the generated tokens, their time and the
    /// drafts summed.
    pub fn combined(all: &[&Summary]) -> (Usage, Timings) {
        let first = all[0];
        let completion: usize = all.iter().map(|s| s.usage.completion_tokens).sum();
        let usage = Usage {
            completion_tokens: completion,
            total_tokens: first.usage.prompt_tokens + completion,
            ..first.usage.clone()
        };
        let sum = |f: fn(&Timings) -> f64| all.iter().map(|s| f(&s.timings)).sum::<f64>();
        let predicted_ms = sum(|t| t.predicted_ms);
        let gaps = sum(|t| t.predicted_n.saturating_sub(1) as f64);
        let timings = Timings {
            predicted_n: completion,
            predicted_ms,
            predicted_per_second: if predicted_ms > 0.0 {
                gaps * 1e3 / predicted_ms
            } else {
                0.0
            },
            draft_n: all.iter().map(|s| s.timings.draft_n).sum(),
            draft_n_accepted: all.iter().map(|s| s.timings.draft_n_accepted).sum(),
            ..first.timings.clone()
        };
        (usage, timings)
    }
}

/// State shared by the handlers and the decode thread.
#[derive(Default)]
pub struct Shared {
    pub metrics: Metrics,
    /// The generator is loaded (`/health` says 200 unless it is [`Self::unavailable`]).
    pub ready: AtomicBool,
    /// [`Generator::unavailable`] as of the last job or idle step.
    pub unavailable: std::sync::Mutex<Option<String>>,
    /// Shutting down: the running request is cancelled, queued ones are refused.
    pub shutting_down: AtomicBool,
    /// Numbers response ids.
    pub next_id: AtomicU64,
}

/// Builds the generator, then serves jobs until every sender is gone. `loaded` hears whether the
/// generator could be built.
pub fn run(
    factory: GeneratorFactory,
    codec: Arc<dyn Codec>,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    loaded: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> Result<(), GenError> {
    let mut gen = match factory() {
        Ok(g) => g,
        Err(e) => {
            let _ = loaded.send(Err(e.to_string()));
            return Err(e);
        }
    };
    shared.ready.store(true, Ordering::SeqCst);
    let _ = loaded.send(Ok(()));
    let mut restarts = gen.worker_restarts();
    loop {
        match jobs.recv_timeout(IDLE_EVERY) {
            Ok(job) => {
                shared.metrics.queue_depth.dec();
                serve(gen.as_mut(), codec.as_ref(), job, &shared);
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = gen.idle() {
                    tracing::warn!(error = %e, "idle step failed");
                }
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
        *shared.unavailable.lock().unwrap_or_else(|e| e.into_inner()) = gen.unavailable();
        let now = gen.worker_restarts();
        shared
            .metrics
            .worker_restarts
            .inc_by(now.saturating_sub(restarts));
        restarts = now;
    }
}

/// Tokens to text for one choice of a job, stop strings applied.
struct Progress<'a> {
    choice: usize,
    codec: &'a dyn Codec,
    text: Box<dyn crate::generator::TextStream + 'a>,
    stop: StopMatcher,
    events: &'a UnboundedSender<Event>,
    tokens: usize,
    first_token: Option<Instant>,
    /// Every counted token's log-probabilities, when the request asked.
    logprobs: Option<Vec<LogprobEntry>>,
    /// Those not sent yet (their text is held back).
    pending: Vec<LogprobEntry>,
    /// Every counted token's id, when the request asked; those not sent yet.
    ids: Option<Vec<u32>>,
    pending_ids: Vec<u32>,
}

impl Progress<'_> {
    /// Tokens `ids` and their log-probabilities (as many, or none when not asked).
    fn push(&mut self, ids: &[u32], logprobs: &[TokenLogprobs]) {
        for (j, &id) in ids.iter().enumerate() {
            if self.stop.stopped() {
                return;
            }
            self.first_token.get_or_insert_with(Instant::now);
            self.tokens += 1;
            if let (Some(all), Some(l)) = (self.logprobs.as_mut(), logprobs.get(j)) {
                let entry = LogprobEntry::of(self.codec, l);
                all.push(entry.clone());
                self.pending.push(entry);
            }
            if let Some(all) = self.ids.as_mut() {
                all.push(id);
                self.pending_ids.push(id);
            }
            let piece = self.text.push(id);
            let out = self.stop.push(&piece);
            self.send(out);
        }
    }

    /// The end of the text: what the detokenizer and the stop matcher held back.
    fn flush(&mut self) {
        if !self.stop.stopped() {
            let piece = self.text.finish();
            let out = self.stop.push(&piece);
            self.send(out);
            let rest = self.stop.finish();
            self.send(rest);
        }
        if !self.pending.is_empty() || !self.pending_ids.is_empty() {
            self.release(String::new());
        }
    }

    fn send(&mut self, text: String) {
        if !text.is_empty() {
            self.release(text);
        }
    }

    /// `text` with the tokens not sent yet.
    fn release(&mut self, text: String) {
        let logprobs = std::mem::take(&mut self.pending);
        let ids = std::mem::take(&mut self.pending_ids);
        let _ = (self.events).send(Event::Text(self.choice, text, logprobs, ids));
    }
}

fn serve(gen: &mut dyn Generator, codec: &dyn Codec, job: Job, shared: &Shared) {
    if job.events.is_closed() {
        return; // The client left while it waited.
    }
    if shared.shutting_down.load(Ordering::SeqCst) {
        let e = shutting_down();
        let status = e.status.as_u16();
        tracing::warn!(id = %job.id, status, error = %e.message, "request failed");
        let _ = job.events.send(Event::Failed(e));
        return;
    }
    for i in 0..job.n {
        let event = match serve_choice(gen, codec, &job, i, shared) {
            None => {
                tracing::info!(id = %job.id, choice = i, "request cancelled: the client left");
                return;
            }
            Some(Ok(summary)) => {
                log_done(&job.id, i, &summary);
                Event::Done(i, summary)
            }
            Some(Err(e)) => {
                let status = e.status.as_u16();
                tracing::warn!(id = %job.id, choice = i, status, error = %e.message, "request failed");
                Event::Failed(e)
            }
        };
        let failed = matches!(event, Event::Failed(_));
        let _ = job.events.send(event);
        if failed {
            return;
        }
    }
}

/// One line per finished choice: what llama.cpp's server prints per request, in fields.
fn log_done(id: &str, choice: usize, s: &Summary) {
    let t = &s.timings;
    let ms_per_token = match t.predicted_per_second {
        r if r > 0.0 => 1e3 / r,
        _ => 0.0,
    };
    tracing::info!(
        id,
        choice,
        prompt_tokens = s.usage.prompt_tokens,
        cached_tokens = t.cache_n,
        completion_tokens = s.usage.completion_tokens,
        ttft_ms = format_args!("{:.0}", t.prompt_ms),
        ms_per_token = format_args!("{ms_per_token:.1}"),
        drafts_accepted = format_args!("{}/{}", t.draft_n_accepted, t.draft_n),
        finish = ?s.finish,
        "request done"
    );
}

/// Generates choice `i` of `job`, streaming its text; its summary, or why it failed (`None`: the
/// client left, and nobody is listening).
fn serve_choice(
    gen: &mut dyn Generator,
    codec: &dyn Codec,
    job: &Job,
    i: usize,
    shared: &Shared,
) -> Option<Result<Summary, ApiError>> {
    let started = Instant::now();
    let mut p = Progress {
        choice: i,
        codec,
        text: codec.text_stream(),
        stop: StopMatcher::new(&job.stop),
        events: &job.events,
        tokens: 0,
        first_token: None,
        logprobs: job.request.sampling.logprobs.map(|_| Vec::new()),
        pending: Vec::new(),
        ids: job.return_tokens.then(Vec::new),
        pending_ids: Vec::new(),
    };
    let stop_hit = Cell::new(false);
    let timed_out = || job.deadline.is_some_and(|d| Instant::now() >= d);
    let cancelled = || {
        stop_hit.get()
            || job.events.is_closed()
            || shared.shutting_down.load(Ordering::SeqCst)
            || timed_out()
    };
    let result = gen.generate(
        &job.choice(i),
        &mut |ids, logprobs| {
            p.push(ids, logprobs);
            stop_hit.set(p.stop.stopped());
        },
        &cancelled,
    );
    let end = Instant::now();
    let stats = result.as_ref().ok().cloned().unwrap_or_default();
    let outcome = match result {
        _ if job.events.is_closed() => return None,
        Ok(_) if stop_hit.get() => Ok(Finish::Stop),
        _ if shared.shutting_down.load(Ordering::SeqCst) => Err(shutting_down()),
        _ if timed_out() => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the request ran past the server's --request-timeout; ask for fewer tokens",
        )),
        Ok(s) if s.stopped_by_model => Ok(Finish::Stop),
        Ok(_) => Ok(Finish::Length),
        Err(GenError::BadRequest(m)) => Err(ApiError::bad_request(m)),
        Err(GenError::Failed(m)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("generation failed: {m}"),
        )),
    };
    Some(outcome.map(|finish| {
        p.flush();
        let mut summary = summarize(job, &p, finish, started, end, &stats);
        summary.stopped_by_word = stop_hit.get();
        summary.logprobs = p.logprobs.take();
        summary.tokens = p.ids.take();
        summary.prompt_logprobs = (job.request.sampling.prompt_logprobs).then(|| {
            (stats.prompt_logprobs.iter())
                .map(|l| LogprobEntry::of(codec, l))
                .collect()
        });
        record(&shared.metrics, job, i, &summary, p.first_token);
        shared.metrics.rollbacks.inc_by(stats.rollbacks);
        summary
    }))
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "the server is shutting down; retry on another instance",
    )
}

fn summarize(
    job: &Job,
    p: &Progress<'_>,
    finish: Finish,
    started: Instant,
    end: Instant,
    stats: &GenStats,
) -> Summary {
    let first = p.first_token.unwrap_or(end);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let predicted_ms = ms(end - first);
    let prompt_n = job.request.prompt.len();
    Summary {
        finish,
        stopped_by_word: false,
        usage: Usage {
            prompt_tokens: prompt_n,
            completion_tokens: p.tokens,
            total_tokens: prompt_n + p.tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: stats.cache_n,
            },
        },
        timings: Timings {
            prompt_n,
            prompt_ms: ms(first - started),
            predicted_n: p.tokens,
            predicted_ms,
            predicted_per_second: if p.tokens > 1 && predicted_ms > 0.0 {
                (p.tokens - 1) as f64 * 1e3 / predicted_ms
            } else {
                0.0
            },
            draft_n: stats.draft_n,
            draft_n_accepted: stats.draft_n_accepted,
            cache_n: stats.cache_n,
        },
        logprobs: None,
        prompt_logprobs: None,
        tokens: None,
    }
}

/// Choice `i`'s figures into the metrics: the prompt and the time to first token once per
/// request (choice 0's), the rest per choice.
fn record(m: &Metrics, job: &Job, i: usize, s: &Summary, first_token: Option<Instant>) {
    m.completion_tokens.inc_by(s.usage.completion_tokens as u64);
    if i == 0 {
        m.prompt_tokens.inc_by(s.usage.prompt_tokens as u64);
        if let Some(first) = first_token {
            m.ttft.observe((first - job.arrived).as_secs_f64());
        }
    }
    if s.usage.completion_tokens > 1 {
        m.per_token
            .observe(s.timings.predicted_ms * 1e-3 / (s.usage.completion_tokens - 1) as f64);
    }
    m.draft_proposed.inc_by(s.timings.draft_n);
    m.draft_accepted.inc_by(s.timings.draft_n_accepted);
}
