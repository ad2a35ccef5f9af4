//! When each forward pass of a request ran, for the bench's timeline.

use amusd_shm::{now_us, EventRecord, Role};
use amusd_spec::{Decoder, Sampler, SpecError};

/// One forward pass, CLOCK_MONOTONIC µs (the clock the workers' event rings use).
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub t0: u64,
    pub t1: u64,
    /// Tokens fed (more than one on a prefill or catch-up).
    pub n_in: usize,
}

impl Span {
    /// The span in µs since `start`.
    pub fn since(&self, start: u64) -> Self {
        Self {
            t0: self.t0.saturating_sub(start),
            t1: self.t1.saturating_sub(start),
            n_in: self.n_in,
        }
    }
}

/// What happened when during one generation, in µs since the request started.
#[derive(Default, Debug)]
pub struct Trace {
    /// Each time tokens reached the caller: (time, how many).
    pub commits: Vec<(u64, usize)>,
    /// In-process forwards (ar, sd).
    pub verify: Vec<Span>,
    pub draft: Vec<Span>,
    /// The workers' events (amusd).
    pub events: Vec<(Role, EventRecord)>,
    /// Worker events overwritten before they could be read (the timeline misses them).
    pub lost_events: u64,
}

/// A [`Decoder`] that logs when each forward pass ran. `Metrics` keeps only durations; the timeline
/// needs start times too. Two clock reads per forward are noise next to a forward pass.
pub struct Timed<D> {
    inner: D,
    spans: Vec<Span>,
}

impl<D> Timed<D> {
    pub fn new(inner: D) -> Self {
        Self {
            inner,
            spans: Vec::new(),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The spans logged since the last call, relative to `start`.
    pub fn take_spans(&mut self, start: u64) -> Vec<Span> {
        self.spans.drain(..).map(|s| s.since(start)).collect()
    }
}

impl<D: Decoder> Decoder for Timed<D> {
    fn cached(&self) -> usize {
        self.inner.cached()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn start(&mut self, prompt: &[u32], len: usize, reuse: bool) -> Result<usize, SpecError> {
        self.inner.start(prompt, len, reuse)
    }
    fn next_tokens(
        &mut self,
        tokens: &[u32],
        start: usize,
        first_row: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError> {
        let t0 = now_us();
        let out = self.inner.next_tokens(tokens, start, first_row, sampler);
        self.spans.push(Span {
            t0,
            t1: now_us(),
            n_in: tokens.len(),
        });
        out
    }
    fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError> {
        let t0 = now_us();
        let out = self.inner.prefill_bulk(tokens, start);
        self.spans.push(Span {
            t0,
            t1: now_us(),
            n_in: tokens.len(),
        });
        out
    }
    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
    fn set_batching(&mut self, batching: amusd_model::Batching) {
        self.inner.set_batching(batching)
    }
}
