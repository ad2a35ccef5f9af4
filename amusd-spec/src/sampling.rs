//! Sampling that keeps speculative decoding exact: Gumbel-max with counter-based noise.
//!
//! # Why the strategies still agree
//! A token is chosen as `argmax_i (s_i + g_i)` over the tokens that survive masking, where `s` are
//! the processed logits and `g_i` is Gumbel(0, 1) noise that depends only on `(seed, position,
//! i)`: `position` is the absolute index the chosen token will have in the sequence (prompt
//! included). So the verify model's token at a position is a pure function of its logits there, the
//! seed and the position; given the batch-invariant forward pass of `amusd-model` those logits are
//! the same whichever strategy computed them, and nothing else enters. Verification stays "accept
//! while the draft's token equals the verify model's", `ar`, `sd` and `amusd` commit the same tokens,
//! and a rollback or a restarted worker needs no generator state: the noise of a position is
//! recomputed, not remembered. The draft uses the same noise on its own logits, so where its
//! distribution is close to the verify model's it proposes the same sample.
//!
//! Gumbel-max is an exact sampler: with independent Gumbel(0, 1) noise, `argmax (s_i + g_i)` is
//! distributed as `softmax(s)` over the survivors. Every position (and every token) has its own
//! counter, so the noise is independent across positions. The noise is a function of the
//! position, not of the prompt: two requests with the same seed share it (each one is still an
//! exact sample; only their correlation is fixed).
//!
//! # The noise: Philox4x32-10
//! The counter-based generator of Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3"
//! (SC'11), as in Random123, cuRAND, JAX and PyTorch: ten rounds of two 32x32->64-bit multiplies,
//! it passes TestU01's BigCrush for any counter pattern, and a CUDA port would compute the same
//! bits. No crate provides it in a well-kept state (the `philox` crate is an unmaintained 0.0.0), so
//! it is the 20 lines below, checked against Random123's published known-answer vectors. Counter =
//! `[token, position low 32 bits, position high 32 bits, 0]`, key = the seed's two halves. The
//! first two output words make 64 bits `x`; `u = ((x >> 12) + 0.5) / 2^52` is uniform on (0, 1)
//! (never 0 or 1: every such value is exact in f64), and `g = -ln(-ln u)`, computed in f64 with the `libm` crate (a pure-Rust port of
//! musl's libm) so the noise is bit-for-bit the same on every platform.
//!
//! # Logits processing, in this fixed order
//! 0. The grammar's mask, if the request has a grammar ([`crate::constraint`]): `-inf` for every
//!    token it forbids after the tokens generated so far. Then the logit bias, if the request has
//!    one ([`crate::logit_bias`]), then the repetition penalties, if it has any
//!    ([`crate::penalty`]), then DRY's, if on ([`crate::dry`]): functions of the logits and the
//!    tokens before the position.
//! 1. Temperature 0 is greedy: [`kernels::argmax`] of the (biased, penalized) logits, exactly as
//!    before sampling existed (top-k, top-p and min-p never remove the argmax, so they are moot).
//!
//! A request may also ask for log-probabilities ([`crate::logprobs`]): the verify model's sampler
//! then records, for each choice, those of the raw logits (before step 0).
//! 2. `s_i = logit_i / T` in f32; a NaN logit is masked (as -inf). With a dynamic temperature
//!    (llama.cpp's `dynatemp_range`), `T` is the position's, from the entropy of the logits'
//!    distribution ([`SamplingParams::temperature_at`]).
//!    Then top-n-sigma (`n > 0`, llama.cpp's `--top-n-sigma`): keep the tokens with
//!    `s_i >= s_max - n * sigma`, `sigma` the standard deviation of the unmasked `s` (mean and
//!    variance f32 sums in increasing id order).
//! 3. top-k (`k > 0`): keep the k largest `s_i`, ties to the lowest id.
//! 4. top-p (`p < 1`): with `q_i = expf(s_i - s_max)` (f32) and `Z` their f32 sum over the
//!    survivors in increasing id order, keep the shortest run of survivors in decreasing `s` order
//!    (ties: lowest id first) whose f32 running sum of `q` reaches `p * Z`.
//! 5. min-p (`m > 0`): keep survivors with `expf(s_i - s_max) >= m` (f32), i.e. a probability at
//!    least `m` times the most likely token's.
//! 6. Typical-p (`tau < 1`, Meister et al., "Locally Typical Sampling", 2023; llama.cpp's
//!    `--typical`): keep the shortest run of survivors in increasing `|-ln p_i - H|` order (`H`
//!    the entropy; ties: lowest id first) whose f32 running sum of `p` reaches `tau`, with
//!    `p_i = q_i / Z` over the survivors and `-ln p_i - H` computed as `|x_i - sum_j p_j x_j|`,
//!    `x_i = s_i - s_max` (the same quantity, without a logarithm per token; f32, sums in
//!    increasing id order).
//! 7. XTC (`P > 0`, "exclude top choices", llama.cpp's `--xtc-probability` and
//!    `--xtc-threshold t`): with probability `P`, a uniform draw from the noise's generator at the
//!    position's counter `u32::MAX` (no token's), if two survivors or more have `p_i >= t`, all of
//!    them but the least likely (ties: the highest id) go.
//! 8. Choose `argmax (s_i + g_i)` over the survivors, the sum in f64 (`s_i` widened exactly), ties
//!    to the lowest id.
//!
//! Only the survivors' noise matters, and most tokens cannot win: a token is skipped, without its
//! two logarithms, when a bound on its noise read from the generator's bits (or the largest noise
//! any bits can give) cannot lift it above the best key so far. The bounds are strict, so the
//! choice is exactly the one the full computation makes.

use amusd_model::kernels;

pub use crate::constraint::{ActiveConstraint, Grammar};
pub use crate::dry::Dry;
pub use crate::logit_bias::LogitBias;
use crate::logprobs::{logprobs_of, Logprobs};
pub use crate::penalty::Penalties;
use crate::philox::noise_bits8;
pub use crate::philox::{noise_bits, philox4x32_10};

/// Sampling parameters that fail [`SamplingParams::validate`].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {0}")]
    Temperature(f32),
    #[error("top-p must be in (0, 1] (1 turns it off), got {0}")]
    TopP(f32),
    #[error("min-p must be in [0, 1] (0 turns it off), got {0}")]
    MinP(f32),
    #[error(
        "the dynamic temperature's range must be a finite number >= 0 (0 turns it off), got {0}"
    )]
    DynatempRange(f32),
    #[error("the dynamic temperature's exponent must be a finite number > 0, got {0}")]
    DynatempExponent(f32),
    #[error("top-n-sigma must be a finite number (0 or less turns it off), got {0}")]
    TopNSigma(f32),
    #[error("typical-p must be in (0, 1] (1 turns it off), got {0}")]
    TypicalP(f32),
    #[error("the XTC probability must be in [0, 1] (0 turns it off), got {0}")]
    XtcProbability(f32),
    #[error("the XTC threshold must be in [0, 1], got {0}")]
    XtcThreshold(f32),
    #[error("the repeat penalty must be a finite number > 0 (1 turns it off), got {0}")]
    RepeatPenalty(f32),
    #[error("the frequency penalty must be in [-2, 2] (0 turns it off), got {0}")]
    FrequencyPenalty(f32),
    #[error("the presence penalty must be in [-2, 2] (0 turns it off), got {0}")]
    PresencePenalty(f32),
    #[error("the DRY multiplier must be a finite number >= 0 (0 turns it off), got {0}")]
    DryMultiplier(f32),
    #[error("the DRY base must be in [1, 4], got {0}")]
    DryBase(f32),
    #[error("the logit bias of token {0} must be in [-100, 100] or -inf, got {1}")]
    LogitBias(u32, f32),
    #[error("the logit bias names token {0} twice")]
    LogitBiasTwice(u32),
    #[error("the logit bias names {0} tokens; at most {max} may be biased", max = crate::logit_bias::MAX_ENTRIES)]
    LogitBiasCount(usize),
    #[error("the logit bias names token {0}, but the model's vocabulary has {1} tokens")]
    LogitBiasToken(u32, usize),
}

/// The smallest temperature other than 0: below it, logits divided by it overflow f32.
pub const MIN_TEMPERATURE: f32 = 1e-3;

/// How a request chooses its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy. Otherwise logits are divided by it.
    pub temperature: f32,
    /// Dynamic temperature: with a range `r > 0`, each position samples at a temperature from
    /// `temperature - r` to `temperature + r` by how spread its distribution is (llama.cpp's
    /// `dynatemp_range`; 0 turns it off).
    pub dynatemp_range: f32,
    /// How the spread maps onto that range (`dynatemp_exponent`, 1: linearly).
    pub dynatemp_exponent: f32,
    /// Keep only the k most likely tokens; 0 turns it off (as llama.cpp and OpenAI-style servers).
    pub top_k: u32,
    /// Keep the most likely tokens whose probabilities add up to `top_p`; 1 turns it off.
    pub top_p: f32,
    /// Keep tokens at least `min_p` times as likely as the most likely one; 0 turns it off.
    pub min_p: f32,
    /// Keep tokens within this many standard deviations of the largest logit (llama.cpp's
    /// `top_n_sigma`); 0 or less turns it off.
    pub top_n_sigma: f32,
    /// Keep the tokens closest to the expected information content, `typical_p` of the
    /// probability mass; 1 turns it off.
    pub typical_p: f32,
    /// How often XTC removes the likeliest tokens; 0 turns it off.
    pub xtc_probability: f32,
    /// The probability from which XTC counts a token as a top choice.
    pub xtc_threshold: f32,
    /// The noise's key: the same seed gives the same tokens.
    pub seed: u64,
    /// Penalties for the tokens just seen, greedy or not.
    pub penalties: Penalties,
    /// Added to given tokens' logits first, greedy or not.
    pub logit_bias: LogitBias,
    /// The penalty of repetitions, after the penalties, greedy or not.
    pub dry: Dry,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::GREEDY
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, every filter off.
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        dynatemp_range: 0.0,
        dynatemp_exponent: 1.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        top_n_sigma: 0.0,
        typical_p: 1.0,
        xtc_probability: 0.0,
        xtc_threshold: 0.1,
        seed: 0,
        penalties: Penalties::OFF,
        logit_bias: LogitBias::NONE,
        dry: Dry::OFF,
    };

    /// `self` if every value is in its domain.
    pub fn validate(self) -> Result<Self, SamplingError> {
        let t = self.temperature;
        if !(t == 0.0 || (t.is_finite() && t >= MIN_TEMPERATURE)) {
            return Err(SamplingError::Temperature(t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(self.dynatemp_range.is_finite() && self.dynatemp_range >= 0.0) {
            return Err(SamplingError::DynatempRange(self.dynatemp_range));
        }
        if !(self.dynatemp_exponent.is_finite() && self.dynatemp_exponent > 0.0) {
            return Err(SamplingError::DynatempExponent(self.dynatemp_exponent));
        }
        if !self.top_n_sigma.is_finite() {
            return Err(SamplingError::TopNSigma(self.top_n_sigma));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(SamplingError::TypicalP(self.typical_p));
        }
        if !(0.0..=1.0).contains(&self.xtc_probability) {
            return Err(SamplingError::XtcProbability(self.xtc_probability));
        }
        if !(0.0..=1.0).contains(&self.xtc_threshold) {
            return Err(SamplingError::XtcThreshold(self.xtc_threshold));
        }
        self.penalties.validate()?;
        let dry = self.dry.validate()?;
        Ok(Self { dry, ..self })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The temperature a position with these (penalized) logits samples at (step 2 of the
    /// module docs): the request's, or with a dynamic range `r`, from `max(T - r, 0)` to `T + r`
    /// by the distribution's entropy over the most it could be, raised to the exponent
    /// (llama.cpp's mapping), never below [`MIN_TEMPERATURE`].
    pub fn temperature_at(&self, logits: &[f32]) -> f32 {
        let t = self.temperature;
        if self.dynatemp_range <= 0.0 {
            return t;
        }
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // The entropy without a logarithm per token: ln Z - E[x], with x = logit - top.
        let (mut z, mut zx, mut n) = (0f32, 0f32, 0u32);
        for &l in logits.iter().filter(|&&l| l > f32::NEG_INFINITY) {
            let x = l - top;
            let q = libm::expf(x);
            (z, zx, n) = (z + q, zx + q * x, n + 1);
        }
        if n <= 1 || top == f32::NEG_INFINITY {
            return t;
        }
        let entropy = libm::logf(z) - zx / z;
        let spread = (entropy / libm::logf(n as f32)).clamp(0.0, 1.0);
        let low = (t - self.dynatemp_range).max(0.0);
        let high = t + self.dynatemp_range;
        (low + (high - low) * libm::powf(spread, self.dynatemp_exponent)).max(MIN_TEMPERATURE)
    }

    /// Greedy without penalties or bias: every token is the argmax of the raw logits, as before
    /// sampling existed.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy() && !self.processes_logits()
    }

    /// Whether the logits change before temperature: a bias or a penalty.
    fn processes_logits(&self) -> bool {
        !(self.penalties.is_off() && self.logit_bias.is_empty() && self.dry.is_off())
    }
}

/// A request's sampling: the verify model's parameters, and how the draft proposes: sampling with
/// them (the default) or its greedy tokens (llama.cpp's scheme, kept to compare acceptance); with
/// its prompt lookup ahead of the model, if it has one, or with the model alone. Neither choice
/// changes a committed token.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestSampling {
    pub params: SamplingParams,
    pub greedy_draft: bool,
    /// The draft model drafts alone for this request: a drafter with prompt lookup ahead of its
    /// model leaves the lookup out (to compare the two on the same workers, request by request),
    /// and the verify worker steps without its wait for lookup runs (`--verify-wait-us`). A
    /// lookup that drafts alone has no model to fall back on and keeps drafting.
    pub no_draft_lookup: bool,
    /// Both models keep the cached positions this request's prompt starts with (left by the
    /// previous request: a conversation's next turn), as llama.cpp's `cache_prompt` does; else
    /// each prefills the whole prompt. Changes no token ([`crate::Decoder::start`]).
    pub cache_prompt: bool,
    /// `Some(k)`: report each generated token's log-probability and the `k` most likely tokens'
    /// ([`crate::logprobs`]; the verify model's sampler records them). Changes no token.
    pub logprobs: Option<usize>,
    /// A grammar the generated text follows ([`crate::constraint`]), compiled by each process
    /// that decodes the request.
    pub grammar: Option<Grammar>,
    /// With [`Self::logprobs`]: the prompt's tokens' too (each given the tokens before it, the
    /// first one's excepted), as OpenAI's `echo` reports them. The verify model then prefills the
    /// whole prompt, keeping nothing cached. Changes no token.
    pub prompt_logprobs: bool,
}

impl RequestSampling {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            ..Self::default()
        }
    }

    /// The verify model's sampler, recording log-probabilities if the request asks for them.
    pub fn verifier(&self) -> Sampler {
        Sampler {
            record: self.logprobs,
            ..Sampler::new(self.params.clone())
        }
    }

    /// The draft model's sampler: a greedy draft keeps the request's penalties and bias, which
    /// the verify model's greedy choices follow too.
    pub fn drafter(&self) -> Sampler {
        Sampler::new(if self.greedy_draft {
            SamplingParams {
                penalties: self.params.penalties,
                logit_bias: self.params.logit_bias.clone(),
                dry: self.params.dry.clone(),
                ..SamplingParams::GREEDY
            }
        } else {
            self.params.clone()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The noise
// ---------------------------------------------------------------------------------------------

/// The uniform on (0, 1) made of `bits`: `((bits >> 12) + 0.5) / 2^52`, exact in f64 (with one
/// more bit, `1 - 2^-54` would round to 1).
pub fn uniform(bits: u64) -> f64 {
    ((bits >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

/// Gumbel(0, 1) noise made of `bits`: `-ln(-ln u)`.
pub fn gumbel_of_bits(bits: u64) -> f64 {
    -libm::log(-libm::log(uniform(bits)))
}

/// The Gumbel noise of token `token` at `position` under `seed`.
pub fn gumbel(seed: u64, position: u64, token: u32) -> f64 {
    gumbel_of_bits(noise_bits(seed, position, token))
}

/// Above any noise: the largest `u` is `1 - 2^-53`, whose noise is `-ln(-ln u) < 53 ln 2 = 36.74`.
const NOISE_MAX: f64 = 37.5;

/// An upper bound of [`gumbel_of_bits`] read from the bits alone: with `L` leading one bits in
/// the 52 that make `u`, `1 - u >= 2^-(L+1)`, and `-ln u > 1 - u`, so
/// `-ln(-ln u) < -ln(1 - u) <= (L + 1) ln 2` (the callers add a margin for rounding).
fn noise_bound(bits: u64) -> f64 {
    let ones = bits.leading_ones().min(52);
    f64::from(ones + 1) * std::f64::consts::LN_2
}

// ---------------------------------------------------------------------------------------------
// The sampler
// ---------------------------------------------------------------------------------------------

/// Chooses tokens from logits under [`SamplingParams`]; owns scratch buffers so that choosing
/// allocates nothing after the first call.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    /// The logits after the bias and the penalties, when there are any.
    processed: Vec<f32>,
    /// The penalties' window, sorted.
    window: Vec<u32>,
    /// DRY's Z-function.
    dry_scratch: Vec<usize>,
    scaled: Vec<f32>,
    survivors: Vec<u32>,
    /// top-p's `q` of each survivor, computed once.
    weights: Vec<f32>,
    /// `Some(k)`: each choice also records its log-probabilities and the top `k`'s, from the raw
    /// logits, into `recorded` ([`Sampler::take_logprobs`]).
    record: Option<usize>,
    recorded: Vec<Logprobs>,
    /// The request's grammar, if it has one: masks the logits before anything else.
    constraint: Option<ActiveConstraint>,
    /// Scoring ([`Sampler::scoring`]): the sequence whose tokens the records are of.
    scored: Option<Vec<u32>>,
}

impl Default for Sampler {
    fn default() -> Self {
        Self::new(SamplingParams::GREEDY)
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            processed: Vec::new(),
            window: Vec::new(),
            dry_scratch: Vec::new(),
            scaled: Vec::new(),
            survivors: Vec::new(),
            weights: Vec::new(),
            record: None,
            recorded: Vec::new(),
            constraint: None,
            scored: None,
        }
    }

    /// A sampler that records, for each row, the log-probabilities of `sequence`'s own token at
    /// that position and the `k` most likely tokens' (its choices are greedy and meant to be
    /// dropped): a prompt scored as the model reads it.
    pub fn scoring(sequence: Vec<u32>, k: usize) -> Self {
        Self {
            record: Some(k),
            scored: Some(sequence),
            ..Self::default()
        }
    }

    /// Follows `constraint` from now on (none: no grammar).
    pub fn constrain(&mut self, constraint: Option<ActiveConstraint>) {
        self.constraint = constraint;
    }

    /// Every choice is the argmax of the raw logits: greedy, with no grammar, bias or penalty.
    pub fn is_plain_greedy(&self) -> bool {
        self.params.is_plain_greedy() && self.constraint.is_none()
    }

    /// Whether choices record their log-probabilities (the request asked for them).
    pub fn records(&self) -> bool {
        self.record.is_some()
    }

    /// The log-probabilities recorded since the last call, one per choice in order (empty unless
    /// the request asked for them).
    pub fn take_logprobs(&mut self) -> Vec<Logprobs> {
        std::mem::take(&mut self.recorded)
    }

    /// The token after `prefix` (the sequence before it, prompt included: the token's position is
    /// `prefix.len()`), given the logits that predict it.
    pub fn choose(&mut self, logits: &[f32], prefix: &[u32]) -> u32 {
        let token = self.choose_processed(logits, prefix);
        if let Some(k) = self.record {
            let scored = (self.scored.as_ref()).and_then(|s| s.get(prefix.len()).copied());
            self.recorded
                .push(logprobs_of(logits, scored.unwrap_or(token), k));
        }
        token
    }

    /// [`Sampler::choose`] without the recording.
    fn choose_processed(&mut self, logits: &[f32], prefix: &[u32]) -> u32 {
        if !self.params.processes_logits() && self.constraint.is_none() {
            return self.choose_at(logits, prefix.len());
        }
        let mut processed = std::mem::take(&mut self.processed);
        processed.clear();
        processed.extend_from_slice(logits);
        if let Some(c) = &self.constraint {
            c.mask(prefix, &mut processed);
        }
        self.params.logit_bias.apply(&mut processed);
        let penalties = self.params.penalties;
        if !penalties.is_off() {
            penalties.apply(&mut processed, prefix, &mut self.window);
        }
        if !self.params.dry.is_off() {
            let mut z = std::mem::take(&mut self.dry_scratch);
            self.params.dry.apply(&mut processed, prefix, &mut z);
            self.dry_scratch = z;
        }
        let token = self.choose_at(&processed, prefix.len());
        self.processed = processed;
        token
    }

    /// [`Sampler::choose`] after the bias and the penalties: the token at absolute `position`.
    fn choose_at(&mut self, logits: &[f32], position: usize) -> u32 {
        if self.params.is_greedy() {
            return kernels::argmax(logits);
        }
        let Some(top) = self.mask(logits, position as u64) else {
            // Every logit NaN or -inf: nothing to sample from; answer as greedy does.
            return kernels::argmax(logits);
        };
        gumbel_argmax(
            &self.scaled,
            &self.survivors,
            top,
            self.params.seed,
            position as u64,
        )
    }

    /// The tokens that may be chosen at these (penalized) logits at absolute `position` (steps 2
    /// to 7 of the module docs), in no particular order. Empty when greedy.
    pub fn survivors(&mut self, logits: &[f32], position: u64) -> &[u32] {
        self.survivors.clear();
        if !self.params.is_greedy() {
            self.mask(logits, position);
        }
        &self.survivors
    }

    /// Fills `scaled` and `survivors`; returns the survivor with the largest scaled logit (lowest id
    /// on ties), `None` when there is none.
    fn mask(&mut self, logits: &[f32], position: u64) -> Option<u32> {
        let temperature = self.params.temperature_at(logits);
        let p = &self.params;
        self.scaled.clear();
        self.scaled.extend(logits.iter().map(|&l| {
            let s = l / temperature;
            if s.is_nan() {
                f32::NEG_INFINITY
            } else {
                s
            }
        }));
        let scaled = &self.scaled;
        self.survivors.clear();
        if scaled.iter().all(|&s| s > f32::NEG_INFINITY) {
            self.survivors.extend(0..scaled.len() as u32);
        } else {
            self.survivors.extend(
                (0..scaled.len() as u32).filter(|&i| scaled[i as usize] > f32::NEG_INFINITY),
            );
        }
        let top = first_max(scaled, &self.survivors)?;
        let s_max = scaled[top as usize];
        if p.top_n_sigma > 0.0 {
            within_sigmas(scaled, &mut self.survivors, s_max, p.top_n_sigma);
        }
        let by_rank = |a: &u32, b: &u32| {
            let (sa, sb) = (scaled[*a as usize], scaled[*b as usize]);
            sb.partial_cmp(&sa)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        let k = p.top_k as usize;
        if k > 0 && k < self.survivors.len() {
            within_reach_of_the_top(scaled, &mut self.survivors, s_max, k);
            self.survivors.select_nth_unstable_by(k - 1, by_rank);
            self.survivors.truncate(k);
            // Back to id order: the order top-p sums in.
            self.survivors.sort_unstable();
        }
        if p.top_p < 1.0 {
            top_p(
                scaled,
                &mut self.survivors,
                &mut self.weights,
                s_max,
                p.top_p,
            );
        }
        if p.min_p > 0.0 {
            // expf is within an ulp, so below ln(min_p) - 1 it is surely under min_p: skip it there.
            let far = libm::logf(p.min_p) - 1.0;
            self.survivors.retain(|&i| {
                let x = scaled[i as usize] - s_max;
                i == top || (x >= far && libm::expf(x) >= p.min_p)
            });
        }
        let (typical_p, xtc) = (p.typical_p, p.xtc_probability);
        let xtc = xtc > 0.0 && uniform(noise_bits(p.seed, position, u32::MAX)) < f64::from(xtc);
        if typical_p == 1.0 && !xtc {
            return Some(top);
        }
        let probs = &mut self.weights;
        if typical_p < 1.0 {
            typical(scaled, &mut self.survivors, probs, s_max, typical_p);
        }
        if xtc {
            let t = p.xtc_threshold;
            exclude_top_choices(scaled, &mut self.survivors, probs, s_max, t);
        }
        // Either may have dropped the likeliest token.
        first_max(scaled, &self.survivors)
    }
}

/// The survivors' probabilities (f32, `Z` summed in increasing id order, as the survivors come),
/// into `p`.
fn probabilities(scaled: &[f32], survivors: &[u32], s_max: f32, p: &mut Vec<f32>) {
    p.clear();
    p.extend((survivors.iter()).map(|&i| libm::expf(scaled[i as usize] - s_max)));
    let z: f32 = p.iter().sum();
    p.iter_mut().for_each(|q| *q /= z);
}

/// Step 6 of the module docs. `survivors` come in increasing id order. `-ln p_i - H` is
/// `E[x] - x_i` with `x_i = s_i - s_max` and the mean under `p`, so no logarithm is taken; and,
/// as top-p, only the survivors within ever wider distances of the mean are sorted until they
/// hold the mass (a distance threshold's set is a prefix of the ranking).
fn typical(scaled: &[f32], survivors: &mut Vec<u32>, p: &mut Vec<f32>, s_max: f32, tau: f32) {
    probabilities(scaled, survivors, s_max, p);
    let x = |i: u32| scaled[i as usize] - s_max;
    let mean: f32 = (survivors.iter().zip(p.iter()))
        .filter(|(_, &p)| p > 0.0)
        .map(|(&i, &p)| p * x(i))
        .sum();
    let distance = |i: u32| (x(i) - mean).abs();
    for width in [1.0f32, 4.0, 16.0, f32::INFINITY] {
        let mut head: Vec<(f32, u32, f32)> = (survivors.iter().zip(p.iter()))
            .map(|(&i, &p)| (distance(i), i, p))
            .filter(|h| h.0 <= width || width == f32::INFINITY)
            .collect();
        head.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut cum = 0f32;
        let reached = head.iter().position(|h| {
            cum += h.2;
            cum >= tau
        });
        if reached.is_some() || width == f32::INFINITY {
            let keep = reached.map_or(head.len(), |n| n + 1);
            survivors.clear();
            survivors.extend(head[..keep].iter().map(|h| h.1));
            survivors.sort_unstable();
            return;
        }
    }
}

/// Step 7 of the module docs, once its draw says so. `survivors` come in increasing id order.
fn exclude_top_choices(
    scaled: &[f32],
    survivors: &mut Vec<u32>,
    p: &mut Vec<f32>,
    s_max: f32,
    threshold: f32,
) {
    probabilities(scaled, survivors, s_max, p);
    let top: Vec<usize> = (0..p.len()).filter(|&j| p[j] >= threshold).collect();
    if top.len() < 2 {
        return;
    }
    // The least likely top choice stays (ties: the highest id, the last in id order).
    let keep = *(top.iter())
        .min_by(|&&a, &&b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
        .expect("two or more");
    let mut j = 0;
    survivors.retain(|_| {
        let gone = j != keep && p[j] >= threshold;
        j += 1;
        !gone
    });
}

/// Top-n-sigma (step 2 of the module docs): keeps the survivors within `n` standard deviations
/// of the largest.
fn within_sigmas(scaled: &[f32], survivors: &mut Vec<u32>, s_max: f32, n: f32) {
    let count = survivors.len() as f32;
    let mean = survivors.iter().map(|&i| scaled[i as usize]).sum::<f32>() / count;
    let variance = (survivors.iter())
        .map(|&i| (scaled[i as usize] - mean) * (scaled[i as usize] - mean))
        .sum::<f32>()
        / count;
    let cut = s_max - n * libm::sqrtf(variance);
    survivors.retain(|&i| scaled[i as usize] >= cut);
}

/// Drops survivors that cannot be among the `k` largest (as a superset, in id order): a cutoff
/// below the maximum that at least `k` survivors reach is at most the k-th largest value, so every
/// member of the top k is at or above it. Makes top-k's selection run over a few hundred tokens,
/// not the whole vocabulary.
fn within_reach_of_the_top(scaled: &[f32], survivors: &mut Vec<u32>, s_max: f32, k: usize) {
    let mut depth = 8f32;
    while depth < 1e30 {
        let cut = s_max - depth;
        let reach = survivors
            .iter()
            .filter(|&&i| scaled[i as usize] >= cut)
            .count();
        if reach >= k {
            survivors.retain(|&i| scaled[i as usize] >= cut);
            return;
        }
        depth *= 4.0;
    }
}

/// The survivor with the largest value, lowest id on ties.
fn first_max(scaled: &[f32], survivors: &[u32]) -> Option<u32> {
    let mut best: Option<u32> = None;
    for &i in survivors {
        if best.is_none_or(|b| scaled[i as usize] > scaled[b as usize]) {
            best = Some(i);
        }
    }
    best
}

/// Step 4 of the module docs. `survivors` come in increasing id order. Only the most likely ones
/// are sorted when they already hold the needed mass (a threshold set is a prefix of the ranking,
/// so its running sums are those of the full ranking); otherwise all of them.
fn top_p(scaled: &[f32], survivors: &mut Vec<u32>, weights: &mut Vec<f32>, s_max: f32, p: f32) {
    let q = |i: u32| libm::expf(scaled[i as usize] - s_max);
    weights.clear();
    weights.extend(survivors.iter().map(|&i| q(i)));
    let z: f32 = weights.iter().sum();
    let target = p * z;
    let keep_prefix = |ranked: &[u32]| -> Option<usize> {
        let mut cum = 0f32;
        for (n, &i) in ranked.iter().enumerate() {
            cum += q(i);
            if cum >= target {
                return Some(n + 1);
            }
        }
        None
    };
    // Ever larger heads of the ranking (a threshold set is a prefix of it) until one holds the
    // needed mass: sorting the whole vocabulary is a last resort.
    for likely in [1e-4f32, 1e-6, 1e-8] {
        let mut head: Vec<u32> = survivors
            .iter()
            .zip(weights.iter())
            .filter(|(_, &w)| w >= likely)
            .map(|(&i, _)| i)
            .collect();
        sort_by_rank(scaled, &mut head);
        if let Some(n) = keep_prefix(&head) {
            head.truncate(n);
            *survivors = head;
            return;
        }
    }
    sort_by_rank(scaled, survivors);
    // Rounding may leave the running sum a hair under `p * Z` for p near 1: then keep everything.
    let n = keep_prefix(survivors).unwrap_or(survivors.len());
    survivors.truncate(n);
}

/// Sorts ids by decreasing value, ties to the lowest id (`by_rank`'s order), through one integer
/// key per id: the value's bits mapped to an order-preserving unsigned integer (zero's sign
/// dropped, as comparison ignores it), inverted, above the id.
fn sort_by_rank(scaled: &[f32], ids: &mut [u32]) {
    let key = |i: u32| {
        let s = scaled[i as usize];
        let b = if s == 0.0 { 0 } else { s.to_bits() };
        let ordered = if b >> 31 == 1 { !b } else { b | 1 << 31 };
        (u64::from(!ordered) << 32) | u64::from(i)
    };
    let mut keys: Vec<u64> = ids.iter().map(|&i| key(i)).collect();
    keys.sort_unstable();
    for (id, k) in ids.iter_mut().zip(keys) {
        *id = k as u32;
    }
}

/// Step 6 of the module docs, starting from `top` (the survivor with the largest scaled logit) so
/// that most others are pruned by the noise bounds. Survivors go eight at a time: a group none of
/// which could beat the best even with the largest noise is skipped whole, the others get their
/// bits from one batch of the generator.
fn gumbel_argmax(scaled: &[f32], survivors: &[u32], top: u32, seed: u64, position: u64) -> u32 {
    let mut best_id = top;
    let mut best = f64::from(scaled[top as usize]) + gumbel(seed, position, top);
    // The bounds are exact; the margin covers the rounding of the sums (1e-12 relative at most).
    let margin = |s: f64| 1e-6 + s.abs() * 1e-12;
    for group in survivors.chunks(8) {
        // A cheap f32 screen first: below `best - NOISE_MAX - 1` (f32 rounding there is far under
        // the 1 of slack) no token can win.
        let cut = (best - NOISE_MAX - 1.0) as f32;
        if group.iter().all(|&i| scaled[i as usize] < cut) {
            continue;
        }
        let could_win = |i: u32, best: f64| {
            let s = f64::from(scaled[i as usize]);
            i != top && s + NOISE_MAX + margin(s) > best
        };
        if !group.iter().any(|&i| could_win(i, best)) {
            continue;
        }
        let mut ids = [top; 8];
        ids[..group.len()].copy_from_slice(group);
        let bits = noise_bits8(seed, position, &ids);
        for (&i, &bits) in group.iter().zip(&bits) {
            let s = f64::from(scaled[i as usize]);
            if !could_win(i, best) || s + noise_bound(bits) + margin(s) <= best {
                continue;
            }
            let key = s + gumbel_of_bits(bits);
            if key > best || (key == best && i < best_id) {
                best = key;
                best_id = i;
            }
        }
    }
    best_id
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed,
            ..SamplingParams::GREEDY
        }
        .validate()
        .unwrap()
    }

    /// The noise is part of what a seed means: changing any of these values changes every sampled
    /// text, so it must be a deliberate, documented change.
    #[test]
    fn noise_reference_values_are_pinned() {
        for ((seed, pos, tok), bits, g_bits) in PINNED {
            assert_eq!(noise_bits(seed, pos, tok), bits, "{seed} {pos} {tok}");
            assert_eq!(
                gumbel(seed, pos, tok).to_bits(),
                g_bits,
                "{seed} {pos} {tok}"
            );
        }
    }

    /// `((seed, position, token), bits, gumbel's f64 bits)`. The first is Random123's all-zero
    /// known answer (its first two words).
    const PINNED: [((u64, u64, u32), u64, u64); 4] = [
        ((0, 0, 0), 0xe169c58d6627e8d5, 0x40007e484179cd9f),
        ((42, 17, 1234), 0x9190c35e9020e1c9, 0x3fe24b8fbe03050d),
        (
            (u64::MAX, 1 << 40, 49_151),
            0xe89363460872d8f4,
            0x4002c01e51447aae,
        ),
        ((7, 8191, 3), 0xb0efca00764721c8, 0x3fefde87cb4bed30),
    ];

    /// Kolmogorov-Smirnov on 10^6 uniforms (one position, a million token ids, and a million
    /// positions of one token): D must stay under the 0.1% critical value 1.949 / sqrt(n).
    #[test]
    fn noise_is_uniform() {
        let n = 1_000_000usize;
        let streams: [Box<dyn Fn(usize) -> u64>; 2] = [
            Box::new(|i| noise_bits(12345, 77, i as u32)),
            Box::new(|i| noise_bits(999, i as u64, 5)),
        ];
        for stream in streams {
            let mut u: Vec<f64> = (0..n).map(|i| uniform(stream(i))).collect();
            u.sort_unstable_by(f64::total_cmp);
            let d = u
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (lo, hi) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (x - lo).abs().max(hi - x)
                })
                .fold(0.0, f64::max);
            let critical = 1.949 / (n as f64).sqrt();
            assert!(d < critical, "KS D = {d} >= {critical}");
            assert!(u[0] > 0.0 && u[n - 1] < 1.0);
        }
    }

    #[test]
    fn noise_bounds_hold_at_the_extremes() {
        let extremes = [
            0u64,
            1,
            0xfff,
            0x1000,
            u64::MAX,
            u64::MAX - 0xfff,
            u64::MAX << 12,
        ];
        let more = (0..200_000u32).map(|i| noise_bits(3, 9, i));
        let shifted = (0..64)
            .map(|k| u64::MAX << k)
            .chain((0..64).map(|k| !(1u64 << k)));
        for bits in extremes.into_iter().chain(more).chain(shifted) {
            let g = gumbel_of_bits(bits);
            assert!(g.is_finite(), "{bits:#x}");
            assert!(
                g < noise_bound(bits) + 1e-9,
                "{bits:#x}: {g} vs {}",
                noise_bound(bits)
            );
            assert!(g < NOISE_MAX, "{bits:#x}");
        }
    }

    #[test]
    fn bad_values_are_refused_and_zero_top_k_is_off() {
        let ok = SamplingParams {
            temperature: 0.7,
            ..SamplingParams::GREEDY
        };
        for t in [-1.0, f32::NAN, f32::INFINITY, 1e-9] {
            let e = SamplingParams {
                temperature: t,
                ..ok.clone()
            }
            .validate()
            .unwrap_err();
            assert!(matches!(e, SamplingError::Temperature(_)), "{t}");
        }
        for p in [0.0, -0.1, 1.5, f32::NAN] {
            let e = SamplingParams {
                top_p: p,
                ..ok.clone()
            }
            .validate()
            .unwrap_err();
            assert!(matches!(e, SamplingError::TopP(_)), "{p}");
        }
        for m in [-0.1, 1.01, f32::NAN, f32::INFINITY] {
            let e = SamplingParams {
                min_p: m,
                ..ok.clone()
            }
            .validate()
            .unwrap_err();
            assert!(matches!(e, SamplingError::MinP(_)), "{m}");
        }
        assert!(SamplingParams {
            top_p: 1.0,
            min_p: 1.0,
            ..ok.clone()
        }
        .validate()
        .is_ok());
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 1));
        assert_eq!(s.survivors(&logits, 0).len(), 50);
    }

    #[test]
    fn greedy_is_the_argmax_whatever_the_filters() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, f32::NAN];
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            top_p: 0.1,
            min_p: 0.9,
            seed: 99,
            ..SamplingParams::GREEDY
        });
        for pos in 0..10 {
            assert_eq!(s.choose_at(&logits, pos), kernels::argmax(&logits));
        }
    }

    /// With penalties, a choice is the one over the logits penalized by the tokens before the
    /// position, and the position is the prefix's length; without, the prefix's tokens change
    /// nothing.
    #[test]
    fn penalties_choose_over_the_penalized_logits() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 / 8.0).collect();
        // The most likely token recurs in the window.
        let top = kernels::argmax(&logits);
        let prefix: Vec<u32> = (0..200)
            .map(|i| if i % 3 == 0 { top } else { (i * 7 % 64) as u32 })
            .collect();
        let penalties = Penalties {
            repeat: 1.3,
            frequency: 0.4,
            presence: 0.2,
            last_n: 48,
        };
        let mut penalized = logits.clone();
        penalties.apply(&mut penalized, &prefix, &mut Vec::new());
        assert_ne!(kernels::argmax(&penalized), kernels::argmax(&logits));
        for temperature in [0.0, 0.8] {
            let base = SamplingParams {
                temperature,
                seed: 5,
                ..SamplingParams::GREEDY
            };
            let with = SamplingParams {
                penalties,
                ..base.clone()
            };
            for len in [0, 1, 100, 200] {
                let (mut a, mut b) = (Sampler::new(with.clone()), Sampler::new(base.clone()));
                let mut over = logits.clone();
                penalties.apply(&mut over, &prefix[..len], &mut Vec::new());
                assert_eq!(a.choose(&logits, &prefix[..len]), b.choose_at(&over, len));
                assert_eq!(b.choose(&logits, &prefix[..len]), b.choose_at(&logits, len));
            }
        }
    }

    /// With a logit bias, a choice is the one over the biased logits, biased before the
    /// penalties (llama.cpp's order): a bias can make and unmake the argmax, and `-inf` bans.
    #[test]
    fn a_logit_bias_chooses_over_the_biased_logits_before_the_penalties() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 / 8.0).collect();
        let top = kernels::argmax(&logits);
        let bias = LogitBias::new([(top, f32::NEG_INFINITY), (5, 3.0), (9, -1.5)]).unwrap();
        let mut biased = logits.clone();
        bias.apply(&mut biased);
        let new_top = kernels::argmax(&biased);
        assert!(new_top != top && biased[top as usize] == f32::NEG_INFINITY);
        let penalties = Penalties {
            repeat: 2.0,
            ..Penalties::OFF
        };
        let prefix = [5u32, 9, 5];
        let mut then_penalized = biased.clone();
        penalties.apply(&mut then_penalized, &prefix, &mut Vec::new());
        // Token 5's logit, 1.625 + 3 then halved: the order shows.
        assert_eq!(then_penalized[5], (logits[5] + 3.0) / 2.0);
        for temperature in [0.0, 0.8] {
            let base = SamplingParams {
                temperature,
                seed: 11,
                ..SamplingParams::GREEDY
            };
            let with = SamplingParams {
                logit_bias: bias.clone(),
                penalties,
                ..base.clone()
            };
            assert!(!with.is_plain_greedy());
            for pos in [0, 3, 40] {
                let mut prefix = prefix.to_vec();
                prefix.resize(pos.max(3), 1);
                let (mut a, mut b) = (Sampler::new(with.clone()), Sampler::new(base.clone()));
                let mut over = biased.clone();
                penalties.apply(&mut over, &prefix, &mut Vec::new());
                assert_eq!(a.choose(&logits, &prefix), b.choose_at(&over, prefix.len()));
                assert_ne!(a.choose(&logits, &prefix), top);
            }
        }
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn filters_keep_what_the_docs_say() {
        // Probabilities at T = 1: 0.5, 0.25, 0.125, 0.0625, ... (ln 2 apart), ids shuffled.
        let ranks = [3usize, 0, 5, 1, 4, 2];
        let logits: Vec<f32> = ranks
            .iter()
            .map(|&r| -(r as f32) * std::f32::consts::LN_2)
            .collect();
        let survivors = |p: SamplingParams| sorted(Sampler::new(p).survivors(&logits, 0).to_vec());
        assert_eq!(survivors(params(1.0, 2, 1.0, 0.0, 0)), vec![1, 3]);
        assert_eq!(
            survivors(params(1.0, 100, 1.0, 0.0, 0)),
            vec![0, 1, 2, 3, 4, 5]
        );
        // 0.5 + 0.25 reaches 0.7 of the mass; 0.5 alone does not.
        assert_eq!(survivors(params(1.0, 0, 0.7, 0.0, 0)), vec![1, 3]);
        assert_eq!(survivors(params(1.0, 0, 0.3, 0.0, 0)), vec![1]);
        // At least a quarter of the top probability: ranks 0, 1, 2.
        assert_eq!(survivors(params(1.0, 0, 1.0, 0.24, 0)), vec![1, 3, 5]);
        // Temperature 0.5 squares the ratios: a quarter is now rank 1.
        assert_eq!(survivors(params(0.5, 0, 1.0, 0.24, 0)), vec![1, 3]);
        // Ties at the top-k boundary go to the lowest id.
        assert_eq!(survivors(params(1.0, 2, 1.0, 0.0, 0)).len(), 2);
        let flat = [1.0f32; 5];
        assert_eq!(
            sorted(
                Sampler::new(params(1.0, 2, 1.0, 0.0, 0))
                    .survivors(&flat, 0)
                    .to_vec()
            ),
            vec![0, 1]
        );
    }

    /// Probabilities 0.5, 0.25, 0.125, 0.125 (entropy 1.213 nats; `-ln p` 0.69, 1.39, 2.08, 2.08):
    /// the typical set starts with the 0.25 token, then the 0.5 one.
    #[test]
    fn typical_p_keeps_the_tokens_nearest_the_entropy() {
        let ln = |p: f32| p.ln();
        let logits = [ln(0.5), ln(0.25), ln(0.125), ln(0.125)];
        let typical = |tau: f32| SamplingParams {
            typical_p: tau,
            ..params(1.0, 0, 1.0, 0.0, 3)
        };
        let survivors = |p: SamplingParams| sorted(Sampler::new(p).survivors(&logits, 0).to_vec());
        assert_eq!(survivors(typical(0.2)), vec![1]);
        assert_eq!(survivors(typical(0.5)), vec![0, 1]);
        assert_eq!(survivors(typical(0.8)), vec![0, 1, 2]);
        assert_eq!(survivors(typical(1.0)), vec![0, 1, 2, 3]);
        // The likeliest token gone, the choice is still a survivor's.
        let mut s = Sampler::new(typical(0.2));
        assert!((0..50).all(|pos| s.choose(&logits, &vec![0; pos]) == 1));
    }

    /// The dynamic temperature spans its range by the distribution's spread: a flat one samples
    /// at `T + r`, a sharp one near `max(T - r, 0)` (never below the least temperature), a lone
    /// token at `T`.
    #[test]
    fn dynamic_temperature_follows_the_entropy() {
        let p = SamplingParams {
            dynatemp_range: 0.5,
            ..params(1.0, 0, 1.0, 0.0, 1)
        };
        assert_eq!(p.temperature_at(&[2.0; 8]), 1.5);
        let sharp = p.temperature_at(&[30.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((0.5..0.5001).contains(&sharp), "{sharp}");
        let mut lone = [f32::NEG_INFINITY; 8];
        lone[3] = 1.0;
        assert_eq!(p.temperature_at(&lone), 1.0);
        let low = SamplingParams {
            temperature: 0.3,
            dynatemp_range: 0.5,
            ..SamplingParams::GREEDY
        };
        assert_eq!(low.temperature_at(&[30.0, 0.0, 0.0]), MIN_TEMPERATURE);
        // Squared, a half-spread distribution sits lower in the range than linearly.
        let half = [4.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let squared = SamplingParams {
            dynatemp_exponent: 2.0,
            ..p.clone()
        };
        assert!(squared.temperature_at(&half) < p.temperature_at(&half));
        assert_eq!(params(1.0, 0, 1.0, 0.0, 1).temperature_at(&half), 1.0);
    }

    /// Top-n-sigma keeps the tokens within n standard deviations of the largest: logits 10, 8, 0,
    /// 0, 0, 0 have mean 3 and sigma 4.28, so 1 sigma keeps 10 and 8 (cut 5.72), 3 keep all.
    #[test]
    fn top_n_sigma_keeps_the_tokens_near_the_top() {
        let logits = [0.0f32, 10.0, 0.0, 8.0, 0.0, 0.0];
        let sigma = |n: f32| SamplingParams {
            top_n_sigma: n,
            ..params(1.0, 0, 1.0, 0.0, 1)
        };
        let survivors = |p: SamplingParams| sorted(Sampler::new(p).survivors(&logits, 0).to_vec());
        assert_eq!(survivors(sigma(1.0)), vec![1, 3]);
        assert_eq!(survivors(sigma(0.1)), vec![1]);
        assert_eq!(survivors(sigma(3.0)), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(survivors(sigma(0.0)), vec![0, 1, 2, 3, 4, 5]);
        assert!(SamplingParams {
            top_n_sigma: f32::NAN,
            ..SamplingParams::GREEDY
        }
        .validate()
        .is_err());
    }

    /// XTC: when its draw says so, the top choices but the least likely go.
    #[test]
    fn xtc_drops_the_top_choices_but_the_least_likely() {
        let ln = |p: f32| p.ln();
        let logits = [ln(0.4), ln(0.05), ln(0.35), ln(0.2)];
        let xtc = |probability: f32, threshold: f32| SamplingParams {
            xtc_probability: probability,
            xtc_threshold: threshold,
            ..params(1.0, 0, 1.0, 0.0, 11)
        };
        let survivors =
            |p: SamplingParams, pos: u64| sorted(Sampler::new(p).survivors(&logits, pos).to_vec());
        assert_eq!(survivors(xtc(1.0, 0.1), 0), vec![1, 3]);
        assert_eq!(survivors(xtc(1.0, 0.3), 0), vec![1, 2, 3]);
        // One top choice, or none: nothing goes.
        assert_eq!(survivors(xtc(1.0, 0.38), 0), vec![0, 1, 2, 3]);
        assert_eq!(survivors(xtc(0.0, 0.1), 0), vec![0, 1, 2, 3]);
        // At probability 0.5, at about half the positions, each the same every time.
        let cut = |pos| survivors(xtc(0.5, 0.1), pos).len() == 2;
        let n = (0..400).filter(|&pos| cut(pos)).count();
        assert!((150..250).contains(&n), "{n} of 400");
        assert!((0..400).all(|pos| cut(pos) == cut(pos)));
    }

    /// The full computation the pruned one must equal: every survivor's key, ties to the lowest id.
    fn reference_choice(s: &mut Sampler, logits: &[f32], position: usize) -> u32 {
        let p = s.params.clone();
        let survivors = sorted(s.survivors(logits, position as u64).to_vec());
        let mut best: Option<(f64, u32)> = None;
        for i in survivors {
            let key =
                f64::from(logits[i as usize] / p.temperature) + gumbel(p.seed, position as u64, i);
            if best.is_none_or(|(b, _)| key > b) {
                best = Some((key, i));
            }
        }
        best.unwrap().1
    }

    /// The first-position logits of a tiny random-weight model (written as a Hugging Face directory
    /// and loaded as any model is) after the prompt `[1, 2, 3]`.
    fn tiny_model_logits() -> Vec<f32> {
        let dir = tempfile::tempdir().unwrap();
        let tiny = amusd_model::testing::TinyModel {
            seed: 11,
            tie_embeddings: false,
            ..Default::default()
        };
        tiny.write_hf(dir.path()).unwrap();
        let spec = format!("{}:f32", dir.path().display()).parse().unwrap();
        let model = amusd_model::load(&spec).unwrap().llama;
        let mut cache = model.new_cache(8);
        let logits = model
            .forward(&[1, 2, 3], 0, &mut cache, amusd_model::LogitsFor::Last)
            .unwrap();
        logits.row(0).to_vec()
    }

    /// Pearson's chi-square critical value at significance 0.001 (Wilson-Hilferty).
    fn chi2_critical(df: usize) -> f64 {
        let (k, z) = (df as f64, 3.090);
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    /// Over 20,000 seeds, the token sampled at the first position follows softmax(logits / T)
    /// restricted to the survivors of top-k / top-p / min-p (chi-square at a fixed significance,
    /// fixed seeds, so the test is deterministic), and masked tokens never appear.
    #[test]
    fn sampled_tokens_follow_the_masked_softmax() {
        const DRAWS: u64 = 20_000;
        let logits = tiny_model_logits();
        let spread = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
            - logits.iter().fold(f32::INFINITY, |a, &b| a.min(b));
        assert!(
            spread > 1.0,
            "the tiny model's logits are too flat to test: {spread}"
        );
        let configs = [
            params(1.0, 0, 1.0, 0.0, 0),
            params(0.5, 20, 1.0, 0.0, 1 << 32),
            params(1.5, 0, 0.8, 0.0, 2 << 32),
            params(0.7, 0, 1.0, 0.2, 3 << 32),
            params(1.0, 60, 0.9, 0.05, 4 << 32),
        ];
        for base in configs {
            let mut s = Sampler::new(base.clone());
            let kept = sorted(s.survivors(&logits, 0).to_vec());
            assert!(kept.len() > 3, "{base:?}: only {} survivors", kept.len());
            // softmax in f64 over the survivors, of the same f32 scaled logits the sampler uses.
            let scaled: Vec<f64> = kept
                .iter()
                .map(|&i| f64::from(logits[i as usize] / base.temperature))
                .collect();
            let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scaled.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut counts = vec![0u64; logits.len()];
            for k in 0..DRAWS {
                s.params.seed = base.seed + k;
                counts[s.choose_at(&logits, 3) as usize] += 1;
            }
            for (i, &c) in counts.iter().enumerate() {
                assert!(
                    c == 0 || kept.contains(&(i as u32)),
                    "{base:?}: masked token {i} sampled {c} times"
                );
            }
            // Bins with an expected count under 5 are pooled into one.
            let (mut chi2, mut bins, mut pooled_e, mut pooled_o) = (0.0, 0usize, 0.0, 0.0);
            for (w, &i) in weights.iter().zip(&kept) {
                let e = w / total * DRAWS as f64;
                let o = counts[i as usize] as f64;
                if e < 5.0 {
                    (pooled_e, pooled_o) = (pooled_e + e, pooled_o + o);
                } else {
                    chi2 += (o - e) * (o - e) / e;
                    bins += 1;
                }
            }
            if pooled_e > 0.0 {
                chi2 += (pooled_o - pooled_e) * (pooled_o - pooled_e) / pooled_e;
                bins += 1;
            }
            let critical = chi2_critical(bins - 1);
            assert!(
                chi2 < critical,
                "{base:?}: chi-square {chi2:.1} >= {critical:.1} with {} dof",
                bins - 1
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn pruning_changes_no_choice(
            seed: u64,
            position in 0usize..100_000,
            logits in proptest::collection::vec(-30.0f32..30.0, 1..400),
            temperature in prop_oneof![Just(0.001f32), 0.05f32..3.0, Just(50.0f32)],
            top_k in prop_oneof![Just(0u32), 1u32..50],
            top_p in prop_oneof![Just(1.0f32), 0.05f32..1.0],
            min_p in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        ) {
            let mut s = Sampler::new(params(temperature, top_k, top_p, min_p, seed));
            let want = reference_choice(&mut s, &logits, position);
            prop_assert_eq!(s.choose_at(&logits, position), want);
        }

        #[test]
        fn ranking_by_keys_is_ranking_by_comparison(
            picks in proptest::collection::vec(0usize..8, 0..300),
        ) {
            let pool = [0.0f32, -0.0, 1.5, -1.5, f32::INFINITY, 1e-30, -7.25, 1.5];
            let scaled: Vec<f32> = picks.iter().map(|&i| pool[i]).collect();
            let mut ids: Vec<u32> = (0..scaled.len() as u32).rev().collect();
            let mut want = ids.clone();
            want.sort_unstable_by(|a, b| {
                let (sa, sb) = (scaled[*a as usize], scaled[*b as usize]);
                sb.partial_cmp(&sa).unwrap().then(a.cmp(b))
            });
            sort_by_rank(&scaled, &mut ids);
            prop_assert_eq!(ids, want);
        }
    }
}
