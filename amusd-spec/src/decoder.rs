//! Decoders with a rollback-able cache, and the two roles built on them.

use std::sync::Arc;
use std::time::Instant;

use amusd_model::{Batching, BlockHook, KvCache, Llama, LogitsFor, ModelError};

use crate::constraint::{activate, Constraints};
use crate::history::NgramHistory;
use crate::logprobs::Logprobs;
use crate::lookup::{Lookup, LookupGate, NgramRange, Source};
use crate::run_worth::{self, Agreement, ForwardCost};
use crate::sampling::{RequestSampling, Sampler};
use crate::split::SplitOps;
use crate::SpecError;

/// A model that predicts next tokens and caches the positions it has seen.
///
/// Implementations keep keys and values for positions `0..cached()`; [`Decoder::next_tokens`] at
/// `start` forgets everything from `start` on first, which is how both roles roll back.
pub trait Decoder {
    /// Positions currently cached.
    fn cached(&self) -> usize;
    /// The most positions one request can reach.
    fn capacity(&self) -> usize;
    /// Prepares the cache for a request of up to `len` positions whose prompt is `prompt`. With
    /// `reuse`, keeps the cached positions that hold the prompt's first tokens (the next turn of
    /// a conversation starts with the last turn's prompt and answer), at most all but the
    /// prompt's last token, which the caller feeds; otherwise it starts empty. Returns the
    /// positions kept. A position's keys and values depend only on the tokens up to it, and the
    /// verify model's are batch-invariant, so a kept position holds what a fresh prefill would.
    fn start(&mut self, prompt: &[u32], len: usize, reuse: bool) -> Result<usize, SpecError>;
    /// Runs `tokens` at positions `start..` and returns the token `sampler` chooses after each
    /// position from row `first_row` on (row `r` chooses the token at position `start + r + 1`).
    fn next_tokens(
        &mut self,
        tokens: &[u32],
        start: usize,
        first_row: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError>;
    /// Runs `tokens` at positions `start..` into the cache alone, as the bulk of a prompt: the
    /// positions before the last [`BULK_TAIL`] a draft predicts from. A draft model may compute
    /// them more cheaply ([`amusd_model::Llama::prefill_bulk`]); a verify model never runs this.
    fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError>;
    /// Forgets positions from `len` on.
    fn truncate(&mut self, len: usize);
    /// Whether a position's result may depend on the batch it was computed in (see
    /// [`Batching`]). Required, not defaulted, so that wrappers cannot silently drop it.
    fn set_batching(&mut self, batching: Batching);
    /// What a split prefill needs of the model ([`crate::split`]), where it has it.
    fn split_ops(&mut self) -> Option<&mut dyn SplitOps> {
        None
    }
}

/// The error of a request for `len` positions from a decoder that can hold `capacity`.
pub(crate) fn check_reservation(len: usize, capacity: usize) -> Result<(), SpecError> {
    if len > capacity {
        return Err(amusd_model::ModelError::ContextOverflow {
            tokens: len,
            capacity,
        }
        .into());
    }
    Ok(())
}

/// How many of `cached` (the tokens at the cached positions) a request with `prompt` keeps: their
/// common prefix, short of the prompt's last token.
pub(crate) fn kept_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len().saturating_sub(1))
}

/// A prompt's last positions that a draft prefills as it does the rest of its forwards, not as
/// its bulk ([`Decoder::prefill_bulk`]): those it drafts from first. 16, 32 and 64 were measured
/// (README, *A prompt's bulk at 8 bits*): 64 gained little, 16 lost agreement on short prompts.
pub const BULK_TAIL: usize = 32;

/// Runs up to `max` positions of `tokens[cached..len - 1]` into `decoder`'s cache.
fn prefill_chunk<D: Decoder>(
    decoder: &mut D,
    tokens: &[u32],
    max: usize,
) -> Result<usize, SpecError> {
    let start = decoder.cached();
    let end = tokens
        .len()
        .saturating_sub(1)
        .min(start.saturating_add(max));
    if end <= start {
        return Ok(0);
    }
    // Only the cache matters here; the token chosen after the chunk is discarded.
    decoder.next_tokens(
        &tokens[start..end],
        start,
        end - start - 1,
        &mut Sampler::default(),
    )?;
    Ok(end - start)
}

/// A [`Llama`] with its own KV cache, and the token at each cached position (so that the next
/// request can keep the prefix it shares, [`Decoder::start`]).
pub struct LlamaDecoder {
    pub model: Llama,
    cache: KvCache,
    /// `tokens[p]` is the token whose keys and values the cache holds at `p`; as long as the cache.
    tokens: Vec<u32>,
}

impl LlamaDecoder {
    pub fn new(model: Llama) -> Self {
        let cache = model.new_cache(0);
        Self {
            model,
            cache,
            tokens: Vec::new(),
        }
    }

    /// After a forward over `tokens`: records them, or where it failed forgets whatever it
    /// wrote into the cache (not known to match `tokens`).
    fn settle<T>(&mut self, tokens: &[u32], done: Result<T, ModelError>) -> Result<T, SpecError> {
        if done.is_err() {
            self.cache.truncate(self.tokens.len());
        } else {
            self.tokens.extend_from_slice(tokens);
            debug_assert_eq!(self.tokens.len(), self.cache.len());
        }
        Ok(done?)
    }
}

impl Decoder for LlamaDecoder {
    fn cached(&self) -> usize {
        self.cache.len()
    }

    fn capacity(&self) -> usize {
        self.model.config.max_position
    }

    fn start(&mut self, prompt: &[u32], len: usize, reuse: bool) -> Result<usize, SpecError> {
        check_reservation(len, self.capacity())?;
        let keep = if reuse {
            kept_prefix(&self.tokens, prompt)
        } else {
            0
        };
        self.truncate(keep);
        self.cache.reserve(len);
        Ok(keep)
    }

    fn next_tokens(
        &mut self,
        tokens: &[u32],
        start: usize,
        first_row: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError> {
        self.tokens.truncate(start);
        let which = LogitsFor::From(first_row);
        if sampler.is_plain_greedy() && !sampler.records() {
            // The argmax of the raw logits is all the sampler would take from them.
            let chosen = (self.model).forward_greedy(tokens, start, &mut self.cache, which);
            return self.settle(tokens, chosen);
        }
        let logits = (self.model).forward(tokens, start, &mut self.cache, which);
        let logits = self.settle(tokens, logits)?;
        // `forward` clamps the first row to the last one.
        let first = start + first_row.min(tokens.len() - 1);
        Ok((0..logits.rows)
            .map(|r| sampler.choose(logits.row(r), &self.tokens[..first + r + 1]))
            .collect())
    }

    fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError> {
        self.tokens.truncate(start);
        let done = self.model.prefill_bulk(tokens, start, &mut self.cache);
        self.settle(tokens, done)
    }
    fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.tokens.truncate(len);
    }
    fn set_batching(&mut self, batching: Batching) {
        self.model.batching = batching;
    }
    fn split_ops(&mut self) -> Option<&mut dyn SplitOps> {
        Some(self)
    }
}

impl SplitOps for LlamaDecoder {
    fn shape(&self) -> (usize, usize) {
        (self.model.blocks.len(), self.model.config.kv_dim())
    }

    fn context_cost(&self) -> f64 {
        let c = &self.model.config;
        let (h, q, kv) = (c.hidden_size, c.q_dim(), c.kv_dim());
        let matrices = 2 * h * q + 2 * h * kv + 3 * h * c.intermediate_size;
        // A score and a weighted value per query value.
        (2 * q) as f64 / matrices.max(1) as f64
    }

    fn prefill_after(
        &mut self,
        prompt: &[u32],
        split: usize,
        end: usize,
        hook: &mut dyn BlockHook,
    ) -> Result<bool, SpecError> {
        self.truncate(0);
        self.cache.cover(split)?;
        let tokens = &prompt[split..end];
        match self
            .model
            .prefill_hooked(tokens, split, &mut self.cache, hook)
        {
            Ok(true) => {
                self.tokens = prompt[..end].to_vec();
                Ok(true)
            }
            done => {
                self.truncate(0);
                Ok(done?)
            }
        }
    }

    fn read_positions(&self, layer: usize, from: usize, k: &mut [f32], v: &mut [f32]) {
        self.cache.read_positions(layer, from, k, v);
    }

    fn verify_twin(&self) -> Option<Llama> {
        self.model.verify_twin()
    }

    fn adopt(
        &mut self,
        tokens: &[u32],
        fill: &mut dyn FnMut(usize, &mut KvCache) -> Result<bool, SpecError>,
    ) -> Result<bool, SpecError> {
        self.truncate(0);
        self.cache.cover(tokens.len())?;
        for layer in 0..self.model.blocks.len() {
            let filled = fill(layer, &mut self.cache);
            if !matches!(filled, Ok(true)) {
                self.truncate(0);
                return filled;
            }
        }
        self.tokens = tokens.to_vec();
        Ok(true)
    }
}

impl<D: Decoder + ?Sized> Decoder for Box<D> {
    fn cached(&self) -> usize {
        (**self).cached()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn start(&mut self, prompt: &[u32], len: usize, reuse: bool) -> Result<usize, SpecError> {
        (**self).start(prompt, len, reuse)
    }
    fn next_tokens(
        &mut self,
        tokens: &[u32],
        start: usize,
        first_row: usize,
        sampler: &mut Sampler,
    ) -> Result<Vec<u32>, SpecError> {
        (**self).next_tokens(tokens, start, first_row, sampler)
    }
    fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError> {
        (**self).prefill_bulk(tokens, start)
    }
    fn truncate(&mut self, len: usize) {
        (**self).truncate(len)
    }
    fn set_batching(&mut self, batching: Batching) {
        (**self).set_batching(batching)
    }
    fn split_ops(&mut self) -> Option<&mut dyn SplitOps> {
        (**self).split_ops()
    }
}

/// The verifying role: given the committed tokens and some draft tokens, returns the verify model's own
/// token (as its [`Sampler`] chooses) at every draft position plus one.
///
/// Invariant between calls: the cache holds exactly `committed[..committed.len() - 1]` or a prefix of
/// it (the last committed token is always fed with the draft, since its logits predict the first draft
/// position).
pub struct Verifier<D: Decoder> {
    pub decoder: D,
    /// How the verify model's tokens are chosen; set per request (greedy by default).
    pub sampler: Sampler,
    /// Compiles requests' grammars for this model's vocabulary; without it a request with a
    /// grammar fails.
    pub constraints: Option<Arc<dyn Constraints>>,
}

impl<D: Decoder> Verifier<D> {
    pub fn new(decoder: D) -> Self {
        Self {
            decoder,
            sampler: Sampler::default(),
            constraints: None,
        }
    }

    /// Follows requests' grammars, compiled by `constraints`.
    pub fn with_constraints(mut self, constraints: Option<Arc<dyn Constraints>>) -> Self {
        self.constraints = constraints;
        self
    }

    /// Starts a request of up to `capacity` positions: its sampling, and the cache, keeping the
    /// positions the prompt shares with the previous request's if the request asks
    /// ([`Decoder::start`]). Returns how many were kept.
    pub fn start(
        &mut self,
        prompt: &[u32],
        capacity: usize,
        sampling: &RequestSampling,
    ) -> Result<usize, SpecError> {
        self.sampler = sampling.verifier();
        let grammar = sampling.grammar.as_ref();
        let active = activate(self.constraints.as_deref(), grammar, prompt.len())?;
        self.sampler.constrain(active);
        // The prompt's scores need every position's logits: nothing cached is kept.
        let reuse = sampling.cache_prompt && !sampling.prompt_logprobs;
        self.decoder.start(prompt, capacity, reuse)
    }

    /// Feeds up to `max` of the prompt positions the cache lacks (as [`Self::prefill`], never the
    /// last prompt token) and scores the prompt tokens they predict: returns the position of the
    /// first one scored and their log-probabilities with the `k` most likely tokens'. Empty once
    /// the cache holds `prompt[..prompt.len() - 1]`.
    pub fn prefill_scored(
        &mut self,
        prompt: &[u32],
        k: usize,
        max: usize,
    ) -> Result<(usize, Vec<Logprobs>), SpecError> {
        let start = self.decoder.cached();
        let end = (prompt.len().saturating_sub(1)).min(start.saturating_add(max));
        if end <= start {
            return Ok((start + 1, Vec::new()));
        }
        let mut scorer = Sampler::scoring(prompt.to_vec(), k);
        self.decoder
            .next_tokens(&prompt[start..end], start, 0, &mut scorer)?;
        Ok((start + 1, scorer.take_logprobs()))
    }

    /// One batched forward over `committed[cached..] ++ draft`. Returns `draft.len() + 1` tokens:
    /// element `i` is the verify model's token for position `committed.len() + i` (and, if the
    /// request asked for them, its log-probabilities are the sampler's `i`th record,
    /// [`Sampler::take_logprobs`]).
    pub fn verify(&mut self, committed: &[u32], draft: &[u32]) -> Result<Vec<u32>, SpecError> {
        let n = committed.len();
        if n == 0 {
            return Err(SpecError::Protocol("cannot verify without a prompt".into()));
        }
        // What an earlier call recorded and nobody took belongs to no row of this one.
        self.sampler.take_logprobs();
        let start = self.decoder.cached().min(n - 1);
        let mut input = Vec::with_capacity(n - start + draft.len());
        input.extend_from_slice(&committed[start..]);
        input.extend_from_slice(draft);
        self.decoder
            .next_tokens(&input, start, n - 1 - start, &mut self.sampler)
    }

    /// Feeds the cache up to `max` of the committed positions it lacks, leaving the last committed
    /// token (which [`verify`](Self::verify) feeds with the draft). Returns how many it fed; 0 when
    /// caught up. A long prefill run in chunks this way gives a worker room to heartbeat between
    /// them; the verify model being batch-invariant, chunking changes no logit.
    pub fn prefill(&mut self, committed: &[u32], max: usize) -> Result<usize, SpecError> {
        prefill_chunk(&mut self.decoder, committed, max)
    }

    /// Drops cached positions that are not committed, after `committed_len` tokens were committed.
    pub fn commit(&mut self, committed_len: usize) {
        self.decoder.truncate(committed_len.saturating_sub(1));
    }
}

/// The drafting role: extends its own copy of the sequence one token at a time, and rolls back to
/// agree with the committed tokens whenever they diverge from it.
pub struct Drafter<D: Decoder> {
    pub decoder: D,
    /// How proposals are chosen: the request's sampling (the same noise as the verify model, on the
    /// draft's logits), set per request; greedy by default.
    pub sampler: Sampler,
    /// Compiles requests' grammars for the draft model's vocabulary; without it the draft
    /// proposes unconstrained (the verify model rejects what the grammar forbids).
    pub constraints: Option<Arc<dyn Constraints>>,
    /// The draft's sequence: committed tokens it has adopted, then its own proposals.
    seq: Vec<u32>,
    /// `seq[..agreed]` is known to equal the committed tokens.
    agreed: usize,
    /// Prompt lookup, drafting alone or ahead of the model (see [`crate::lookup`]); kept in step
    /// with `seq`.
    lookup: Option<Lookup>,
    /// Whether the model drafts: false when the lookup drafts alone (the decoder is [`NoModel`]).
    ///
    /// [`NoModel`]: crate::lookup::NoModel
    model: bool,
    /// The current request turned the lookup off ([`RequestSampling::no_draft_lookup`]): the
    /// model drafts alone. The lookup's index still follows the sequence.
    lookup_off: bool,
    /// What followed short contexts in earlier committed text, this request's included (see
    /// [`crate::history`]); guesses where the lookup has no match.
    history: Option<NgramHistory>,
    /// The committed tokens of this request the history has learnt.
    learnt: usize,
    /// The model's forward time by width, which prices the guesses a forward checks.
    cost: ForwardCost,
    /// How often the model agreed with the lookup's guesses, and with the history's, lately.
    lookup_agreement: Agreement,
    history_agreement: Agreement,
}

impl<D: Decoder> Drafter<D> {
    pub fn new(mut decoder: D) -> Self {
        // The draft's logits only choose proposals and the verify model decides every token, so the
        // draft may batch for speed: its prompt prefill is many times faster in a quantized format.
        decoder.set_batching(Batching::Throughput);
        Self {
            decoder,
            sampler: Sampler::default(),
            constraints: None,
            seq: Vec::new(),
            agreed: 0,
            lookup: None,
            model: true,
            lookup_off: false,
            history: None,
            learnt: 0,
            cost: ForwardCost::measured(),
            lookup_agreement: Agreement::default(),
            history_agreement: Agreement::default(),
        }
    }

    /// Prices the model's rows as `cost` says instead of timing its forwards (tests, whose fake
    /// models' times say nothing).
    pub fn with_forward_cost(mut self, cost: ForwardCost) -> Self {
        self.cost = cost;
        self
    }

    /// Adds the n-gram history across requests: where the lookup finds no match, the history's
    /// guesses for the next tokens go into the model's forward beside its own (a model drafter
    /// with the lookup only; a request that turns the lookup off turns this off too).
    pub fn with_history(mut self, history: NgramHistory) -> Self {
        self.history = Some(history);
        self
    }

    /// The history learns the committed tokens it has not seen yet.
    fn learn(&mut self, committed: &[u32]) {
        if let Some(h) = self.history.as_mut() {
            h.learn(committed, self.learnt);
        }
        self.learnt = committed.len();
    }

    /// Follows requests' grammars, compiled by `constraints`.
    pub fn with_constraints(mut self, constraints: Option<Arc<dyn Constraints>>) -> Self {
        self.constraints = constraints;
        self
    }

    /// Drafts the next request (its prompt `prompt_len` tokens) as it asks: with its sampler (or
    /// greedily) and its grammar, and with the lookup unless it turns the lookup off (which a
    /// lookup without a model ignores). Fails only on a grammar that does not compile.
    pub fn set_request(
        &mut self,
        sampling: &RequestSampling,
        prompt_len: usize,
    ) -> Result<(), SpecError> {
        self.sampler = sampling.drafter();
        self.lookup_off = sampling.no_draft_lookup && self.model;
        // Without constraints the draft proposes unconstrained: slower, never wrong.
        if let Some(c) = self.constraints.as_deref() {
            let active = activate(Some(c), sampling.grammar.as_ref(), prompt_len)?;
            self.sampler.constrain(active);
        }
        Ok(())
    }

    /// Adds prompt lookup: `alone`, it is the only drafter (the model is never run); otherwise a
    /// lookup run goes first wherever its gate allows one, checked by the model in one forward,
    /// and the model drafts the rest.
    /// `max_run` bounds one lookup run.
    pub fn with_lookup(mut self, range: NgramRange, alone: bool, max_run: usize) -> Self {
        let floor = if alone {
            LookupGate::FLOOR_ALONE
        } else {
            LookupGate::FLOOR_CHECKED
        };
        self.lookup = Some(Lookup::new(range, floor, max_run));
        self.model = !alone;
        self
    }

    /// Where the token at `position` came from (the model for committed tokens it adopted).
    pub fn source(&self, position: usize) -> Source {
        self.lookup
            .as_ref()
            .map_or(Source::Model, |l| l.source(position))
    }

    /// The sources of the sequence's tokens from `from` on.
    pub fn sources(&self, from: usize) -> Vec<Source> {
        (from..self.seq.len()).map(|p| self.source(p)).collect()
    }

    /// Appends to the sequence, keeping the lookup in step.
    fn push(&mut self, token: u32, source: Source, guess: Option<u32>) {
        self.seq.push(token);
        if let Some(l) = self.lookup.as_mut() {
            l.push(token, source, guess);
        }
    }

    /// Starts a request: the sequence becomes `prompt`; with `reuse` the model keeps the cached
    /// positions the prompt starts with ([`Decoder::start`]).
    pub fn start(&mut self, prompt: &[u32], capacity: usize, reuse: bool) -> Result<(), SpecError> {
        self.decoder.start(prompt, capacity, reuse)?;
        self.seq.clear();
        self.seq.extend_from_slice(prompt);
        self.agreed = prompt.len();
        if let Some(l) = self.lookup.as_mut() {
            l.start(prompt);
        }
        self.learnt = 0;
        self.learn(prompt);
        Ok(())
    }

    pub fn seq(&self) -> &[u32] {
        &self.seq
    }

    /// Proposals beyond the committed tokens (as of the last sync).
    pub fn ahead(&self, committed_len: usize) -> usize {
        self.seq.len().saturating_sub(committed_len)
    }

    /// Makes the sequence agree with `committed`: on the first disagreement, drops the draft from there
    /// (rolling back its cache in O(1)), then adopts any committed tokens it lacks. Returns the
    /// position rolled back to, if the draft disagreed.
    pub fn sync(&mut self, committed: &[u32]) -> Option<usize> {
        let mut rollback_to = None;
        let common = self.seq.len().min(committed.len());
        let from = self.agreed.min(common);
        let diverged = (from..common).find(|&p| self.seq[p] != committed[p]);
        if let Some(l) = self.lookup.as_mut() {
            // Guesses past a divergence were made on a wrong prefix: they say nothing.
            l.score(committed, from..diverged.map_or(common, |p| p + 1));
        }
        if let Some(p) = diverged {
            self.seq.truncate(p);
            self.decoder.truncate(p);
            if let Some(l) = self.lookup.as_mut() {
                l.truncate(p);
            }
            rollback_to = Some(p);
        }
        if committed.len() > self.seq.len() {
            for &t in &committed[self.seq.len()..] {
                self.push(t, Source::Model, None);
            }
        }
        self.agreed = committed.len();
        self.learn(committed);
        rollback_to
    }

    /// Feeds the model up to `max` positions of the sequence's bulk that it lacks: every position
    /// short of the last [`BULK_TAIL`], which the next draft forward runs
    /// ([`Decoder::prefill_bulk`]). Returns how many it fed; 0 when the bulk is in (or there is
    /// no model). A long prompt fed in chunks this way gives a worker room to heartbeat.
    pub fn prefill_bulk(&mut self, max: usize) -> Result<usize, SpecError> {
        let start = self.decoder.cached();
        let end = (self.seq.len().saturating_sub(BULK_TAIL)).min(start.saturating_add(max));
        if !self.model || end <= start {
            return Ok(0);
        }
        self.decoder.prefill_bulk(&self.seq[start..end], start)?;
        Ok(end - start)
    }

    /// Drafts what comes next: a lookup run where the lookup has a match and its gate allows one
    /// (checked by the model first when there is one: `draft_checked`), else the n-gram history's
    /// run where it has one (checked the same way), else one model token. Model tokens stop
    /// `lookahead` ahead of `committed_len`; a lookup run may reach as far as the gate's cap when
    /// that is longer (a run the lookup has earned is cheap to verify in one forward). Nothing is drafted at or past `max_len`, nor after a stop
    /// token in a lookup run. Returns how many tokens were drafted (0: nothing to draft) and
    /// [`Source::Model`] if the model ran a forward for them ([`Source::Lookup`]: the lookup
    /// drafted alone); [`Self::source`] says where each token came from.
    pub fn extend(
        &mut self,
        committed_len: usize,
        lookahead: usize,
        max_len: usize,
        stop_ids: &[u32],
    ) -> Result<(usize, Source), SpecError> {
        let ahead = self.ahead(committed_len);
        let left = max_len.saturating_sub(self.seq.len());
        let room = |limit: usize| limit.saturating_sub(ahead).min(left);
        let run = match &self.lookup {
            Some(l) if !self.lookup_off => l.propose(room(lookahead.max(l.cap())), stop_ids),
            _ => Vec::new(),
        };
        if !run.is_empty() && !self.model {
            for &t in &run {
                self.push(t, Source::Lookup, Some(t));
            }
            return Ok((run.len(), Source::Lookup));
        }
        let run = self.priced(run, Source::Lookup);
        if !run.is_empty() {
            return self.draft_checked(&run, Source::Lookup, max_len, stop_ids);
        }
        if self.model && room(lookahead) > 0 {
            let run = self.history_run(room(lookahead).min(NgramHistory::MAX_RUN), stop_ids);
            let run = self.priced(run, Source::History);
            if !run.is_empty() {
                return self.draft_checked(&run, Source::History, max_len, stop_ids);
            }
            self.draft_one()?;
            return Ok((1, Source::Model));
        }
        Ok((0, Source::Model))
    }

    /// A lookup or history run (`source`) checked by the draft model in one forward before it is
    /// proposed: the run's longest prefix the model itself would have drafted, then the model's
    /// own next token (the first it disagrees on, or the one after the run). So the drafts are the model's, as from
    /// [`Self::draft_one`], but a right run yields many per forward, and a wrong one costs a wider
    /// forward instead of a verify step and a rollback. Returns what [`Self::extend`] does: the
    /// model ran, whichever source each token is recorded with.
    fn draft_checked(
        &mut self,
        run: &[u32],
        source: Source,
        max_len: usize,
        stop_ids: &[u32],
    ) -> Result<(usize, Source), SpecError> {
        let len = self.seq.len();
        let start = self.decoder.cached().min(len - 1);
        let mut input = self.seq[start..].to_vec();
        input.extend_from_slice(run);
        let own = self.forward(&input, start, len - 1 - start)?;
        let agree = run.iter().zip(&own).take_while(|(a, b)| a == b).count();
        self.agreement(source).observe_run(agree, run.len());
        // A history run is not the lookup's guess: its gate only hears of its own.
        let lookup_guess = |t: u32| (source == Source::Lookup).then_some(t);
        for &t in &run[..agree] {
            self.push(t, source, lookup_guess(t));
        }
        // The cache holds the run's positions; those past the agreed prefix are the run's, not the
        // model's.
        self.decoder.truncate(len + agree);
        let stopped = agree > 0 && stop_ids.contains(&run[agree - 1]);
        if self.seq.len() < max_len && !stopped {
            let tok = *own
                .get(agree)
                .ok_or_else(|| SpecError::Protocol("decoder returned too few tokens".into()))?;
            self.push(
                tok,
                Source::Model,
                run.get(agree).copied().and_then(lookup_guess),
            );
        }
        Ok((self.seq.len() - len, Source::Model))
    }

    /// The history's run after the sequence (up to `max`), unless the lookup is off.
    fn history_run(&self, max: usize, stop_ids: &[u32]) -> Vec<u32> {
        match &self.history {
            Some(h) if self.lookup.is_some() && !self.lookup_off => {
                h.propose(&self.seq, max, stop_ids)
            }
            _ => Vec::new(),
        }
    }

    /// Drafts one token after the current sequence (catching the cache up on adopted tokens first).
    pub fn draft_one(&mut self) -> Result<u32, SpecError> {
        // What the lookup would have proposed here, scored once the position is committed, so a
        // closed gate can reopen.
        let guess = self.lookup.as_ref().and_then(Lookup::guess);
        let history_guess = self.history_run(1, &[]).first().copied();
        let start = self.decoder.cached().min(self.seq.len() - 1);
        let input = self.seq[start..].to_vec();
        let tok = *self
            .forward(&input, start, input.len() - 1)?
            .last()
            .ok_or_else(|| SpecError::Protocol("decoder returned no token".into()))?;
        // What the guesses would have yielded here keeps their agreement current while no run
        // of theirs is worth checking.
        if let Some(g) = guess {
            self.lookup_agreement.observe(g == tok);
        }
        if let Some(g) = history_guess {
            self.history_agreement.observe(g == tok);
        }
        self.push(tok, Source::Model, guess);
        Ok(tok)
    }

    /// The model's forward over `input` (from position `start`, tokens from row `first_row`
    /// on), timed for [`ForwardCost`].
    fn forward(
        &mut self,
        input: &[u32],
        start: usize,
        first_row: usize,
    ) -> Result<Vec<u32>, SpecError> {
        let t = Instant::now();
        let out = self
            .decoder
            .next_tokens(input, start, first_row, &mut self.sampler)?;
        self.cost.observe(input.len(), t.elapsed().as_secs_f64());
        Ok(out)
    }

    /// The agreement of a guessing source (the model guesses nothing: only the two others are
    /// asked for).
    fn agreement(&mut self, source: Source) -> &mut Agreement {
        match source {
            Source::History => &mut self.history_agreement,
            Source::Lookup | Source::Model => &mut self.lookup_agreement,
        }
    }

    /// As much of a guessed `run` (from `source`) as is worth a wider forward
    /// ([`run_worth::worth_checking`]); the forward already catches up the positions the cache
    /// lacks.
    fn priced(&mut self, mut run: Vec<u32>, source: Source) -> Vec<u32> {
        if run.is_empty() {
            return run;
        }
        let base = self.seq.len() - self.decoder.cached().min(self.seq.len() - 1);
        let extra = self.cost.extra_row(base);
        run.truncate(run_worth::worth_checking(
            run.len(),
            self.agreement(source).rate(),
            extra,
        ));
        run
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny random-weight model in f32 (the verify model's arithmetic, batch-invariant).
    fn tiny_decoder() -> LlamaDecoder {
        let dir = tempfile::tempdir().unwrap();
        let tiny = amusd_model::testing::TinyModel {
            seed: 5,
            ..Default::default()
        };
        tiny.write_hf(dir.path()).unwrap();
        let spec = format!("{}:f32", dir.path().display()).parse().unwrap();
        LlamaDecoder::new(amusd_model::load(&spec).unwrap().llama)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn the_kept_prefix_is_the_common_one_short_of_the_last_prompt_token() {
        assert_eq!(kept_prefix(&[1, 2, 3, 4], &[1, 2, 9]), 2);
        assert_eq!(
            kept_prefix(&[1, 2, 3, 4], &[1, 2, 3]),
            2,
            "the last is fed again"
        );
        assert_eq!(kept_prefix(&[1, 2], &[1, 2, 3, 4]), 2);
        assert_eq!(kept_prefix(&[5, 2], &[1, 2, 3]), 0);
        assert_eq!(kept_prefix(&[1], &[]), 0);
        assert_eq!(kept_prefix(&[], &[1, 2]), 0);
    }

    /// A conversation's next turn keeps the positions it shares with the last one, and the rest of
    /// its prompt then gets the logits of a fresh prefill, bit for bit; without `reuse`, or after a
    /// failed forward, nothing stale is kept.
    #[test]
    fn a_kept_prefix_gives_the_bits_of_a_fresh_prefill() {
        let (mut warm, mut cold) = (tiny_decoder(), tiny_decoder());
        let first: Vec<u32> = (1..31).collect();
        assert_eq!(warm.start(&first, 64, true).unwrap(), 0);
        let mut greedy = Sampler::default();
        warm.next_tokens(&first, 0, first.len() - 1, &mut greedy)
            .unwrap();
        let second: Vec<u32> = first[..20].iter().copied().chain(40..52).collect();
        assert_eq!(warm.start(&second, 64, true).unwrap(), 20);
        assert_eq!(
            (warm.cached(), cold.start(&second, 64, true).unwrap()),
            (20, 0)
        );
        let all = LogitsFor::From(0);
        let kept = warm
            .model
            .forward(&second[20..], 20, &mut warm.cache, all)
            .unwrap();
        let fresh = cold
            .model
            .forward(&second, 0, &mut cold.cache, all)
            .unwrap();
        for r in 0..second.len() - 20 {
            assert_eq!(
                bits(kept.row(r)),
                bits(fresh.row(20 + r)),
                "position {}",
                20 + r
            );
        }
        // (The forward above went around the token record; start again through `next_tokens`.)
        warm.truncate(0);
        warm.next_tokens(&second, 0, 0, &mut greedy).unwrap();
        assert_eq!(warm.start(&second, 64, false).unwrap(), 0);
        assert_eq!(warm.cached(), 0);
        warm.next_tokens(&second, 0, 0, &mut greedy).unwrap();
        // A forward that fails leaves the record and the cache in step, keeping nothing it fed.
        let too_long: Vec<u32> = (0..80).map(|i| i % 50 + 1).collect();
        assert!(warm.next_tokens(&too_long, 10, 0, &mut greedy).is_err());
        assert_eq!(warm.cached(), warm.tokens.len());
        assert!(warm.start(&second, 64, true).unwrap() <= 10);
    }

    /// A fake decoder that records each forward: its start, its rows and whether it was a bulk.
    struct Recording {
        inner: crate::fake::FakeDecoder,
        forwards: Vec<(usize, usize, bool)>,
    }

    impl Decoder for Recording {
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
            self.forwards.push((start, tokens.len(), false));
            self.inner.next_tokens(tokens, start, first_row, sampler)
        }
        fn prefill_bulk(&mut self, tokens: &[u32], start: usize) -> Result<(), SpecError> {
            self.forwards.push((start, tokens.len(), true));
            self.inner.prefill_bulk(tokens, start)
        }
        fn truncate(&mut self, len: usize) {
            self.inner.truncate(len)
        }
        fn set_batching(&mut self, batching: Batching) {
            self.inner.set_batching(batching)
        }
    }

    /// A drafter feeds a long prompt's bulk in chunks as a bulk and its last [`BULK_TAIL`]
    /// positions with its first draft; a short prompt has no bulk.
    #[test]
    fn a_prompts_bulk_stops_its_tail_short_of_the_end() {
        let model = crate::fake::FakeModel::default();
        for len in [150u32, 10] {
            let end = (len as usize).saturating_sub(BULK_TAIL);
            let chunks = (0..end).step_by(64);
            let bulk: Vec<_> = chunks.map(|s| (s, (end - s).min(64), true)).collect();
            assert_eq!(bulk.is_empty(), len == 10, "BULK_TAIL is well under 150");
            let recording = Recording {
                inner: crate::fake::FakeDecoder::new(model.clone()),
                forwards: Vec::new(),
            };
            let mut d = Drafter::new(recording);
            let prompt: Vec<u32> = (0..len).map(|i| i % 50 + 1).collect();
            d.start(&prompt, 400, false).unwrap();
            while d.prefill_bulk(64).unwrap() > 0 {}
            assert_eq!(d.decoder.forwards, bulk, "a {len}-token prompt");
            d.extend(prompt.len(), 1, 400, &[]).unwrap();
            assert_eq!(
                d.decoder.forwards[bulk.len()..],
                [(end, prompt.len() - end, false)],
                "the tail with the first draft"
            );
            assert_eq!(d.seq()[len as usize], model.next(&prompt));
        }
    }
}
