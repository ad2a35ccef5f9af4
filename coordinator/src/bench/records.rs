//! One record per generation: what `amusd bench --output` writes and `amusd report` reads.

use std::path::Path;

use amusd_spec::constraint::{Grammar, GrammarKind};
use amusd_spec::{Dry, Finish, Generation, LogitBias, Penalties, RequestSampling, SamplingParams};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::datasets::Sample;
use crate::args::{sampling_label, Strategy};

/// One generation, as written to `--output` and read by `amusd report`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) sample_index: usize,
    #[serde(default)]
    pub(super) sample_id: String,
    #[serde(default = "first_turn")]
    pub(super) turn: usize,
    pub(super) strategy: String,
    /// How sd and amusd drafted: `model`, `lookup MIN-MAX`, `model+lookup MIN-MAX` or
    /// `model+lookup MIN-MAX+history` (empty for ar, and in records written before prompt
    /// lookup, which drafted with the model).
    #[serde(default)]
    pub(super) drafter: String,
    pub(super) dataset: String,
    #[serde(default)]
    pub(super) prompt_tokens: usize,
    #[serde(default)]
    pub(super) finish_reason: String,
    /// Records written before sampling existed are greedy.
    #[serde(default)]
    pub(super) sampling: SamplingRecord,
    pub(super) metrics: RecordMetrics,
    /// The commit the binary was built from (`-modified`: with uncommitted code changes); empty
    /// in records written before it was recorded.
    #[serde(default)]
    pub(super) commit: String,
}

/// The sampling parameters of a record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct SamplingRecord {
    pub(super) temperature: f32,
    pub(super) top_k: u32,
    pub(super) top_p: f32,
    pub(super) min_p: f32,
    /// Records written before top-n-sigma existed had it off.
    #[serde(default)]
    pub(super) top_n_sigma: f32,
    /// Records written before the dynamic temperature existed had it off.
    #[serde(default)]
    pub(super) dynatemp_range: f32,
    #[serde(default = "linear")]
    pub(super) dynatemp_exponent: f32,
    /// Records written before typical-p and XTC existed had them off.
    #[serde(default = "typical_off")]
    pub(super) typical_p: f32,
    #[serde(default)]
    pub(super) xtc_probability: f32,
    #[serde(default = "default_xtc_threshold")]
    pub(super) xtc_threshold: f32,
    pub(super) seed: u64,
    #[serde(default)]
    pub(super) greedy_draft: bool,
    /// Records written before penalties existed had none.
    #[serde(default = "no_repeat_penalty")]
    pub(super) repeat_penalty: f32,
    #[serde(default)]
    pub(super) frequency_penalty: f32,
    #[serde(default)]
    pub(super) presence_penalty: f32,
    /// [`Penalties::last_n`]: `u32::MAX` is the whole sequence.
    #[serde(default = "default_penalty_window")]
    pub(super) penalty_last_n: u32,
    /// Token ids and their logit biases, `None` for `-inf` (JSON has no infinity); records written
    /// before the bias existed had none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) logit_bias: Vec<(u32, Option<f32>)>,
    /// DRY, when on: its multiplier, base, allowed length, window, and breaker set (records
    /// written before DRY existed had it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dry: Option<(f32, f32, u32, u32, Vec<u64>)>,
    /// The grammar every answer followed: its kind (llguidance's tag) and text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) grammar: Option<(String, String)>,
}

fn linear() -> f32 {
    SamplingParams::GREEDY.dynatemp_exponent
}

fn typical_off() -> f32 {
    SamplingParams::GREEDY.typical_p
}

fn default_xtc_threshold() -> f32 {
    SamplingParams::GREEDY.xtc_threshold
}

fn no_repeat_penalty() -> f32 {
    Penalties::OFF.repeat
}

fn default_penalty_window() -> u32 {
    Penalties::OFF.last_n
}

impl Default for SamplingRecord {
    fn default() -> Self {
        Self::of(&RequestSampling::default())
    }
}

impl SamplingRecord {
    pub(super) fn of(s: &RequestSampling) -> Self {
        let p = &s.params;
        Self {
            temperature: p.temperature,
            dynatemp_range: p.dynatemp_range,
            dynatemp_exponent: p.dynatemp_exponent,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            top_n_sigma: p.top_n_sigma,
            typical_p: p.typical_p,
            xtc_probability: p.xtc_probability,
            xtc_threshold: p.xtc_threshold,
            seed: p.seed,
            greedy_draft: s.greedy_draft,
            repeat_penalty: p.penalties.repeat,
            frequency_penalty: p.penalties.frequency,
            presence_penalty: p.penalties.presence,
            penalty_last_n: p.penalties.last_n,
            logit_bias: (p.logit_bias.entries().iter())
                .map(|&(t, b)| (t, b.is_finite().then_some(b)))
                .collect(),
            grammar: (s.grammar.as_ref()).map(|g| (g.kind.tag().to_string(), g.text.clone())),
            dry: (!p.dry.is_off()).then(|| {
                let d = &p.dry;
                (
                    d.multiplier,
                    d.base,
                    d.allowed_length,
                    d.last_n,
                    d.breakers.clone(),
                )
            }),
        }
    }

    pub(super) fn sampling(&self) -> RequestSampling {
        RequestSampling {
            params: SamplingParams {
                temperature: self.temperature,
                dynatemp_range: self.dynatemp_range,
                dynatemp_exponent: self.dynatemp_exponent,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                top_n_sigma: self.top_n_sigma,
                typical_p: self.typical_p,
                xtc_probability: self.xtc_probability,
                xtc_threshold: self.xtc_threshold,
                seed: self.seed,
                penalties: Penalties {
                    repeat: self.repeat_penalty,
                    frequency: self.frequency_penalty,
                    presence: self.presence_penalty,
                    last_n: self.penalty_last_n,
                },
                // Checked when the run was made; a hand-edited record's bad bias is left out of
                // its report label.
                logit_bias: LogitBias::new(
                    (self.logit_bias.iter()).map(|&(t, b)| (t, b.unwrap_or(f32::NEG_INFINITY))),
                )
                .unwrap_or_default(),
                dry: match &self.dry {
                    Some((multiplier, base, allowed_length, last_n, breakers)) => Dry {
                        multiplier: *multiplier,
                        base: *base,
                        allowed_length: *allowed_length,
                        last_n: *last_n,
                        breakers: breakers.clone(),
                    },
                    None => Dry::OFF,
                },
            },
            greedy_draft: self.greedy_draft,
            // A record says how it drafted in `drafter`.
            no_draft_lookup: false,
            cache_prompt: false,
            logprobs: None,
            prompt_logprobs: false,
            grammar: self.grammar.as_ref().and_then(|(tag, text)| {
                let kind = GrammarKind::ALL.into_iter().find(|k| k.tag() == tag)?;
                Some(Grammar::new(kind, text.clone()))
            }),
        }
    }
}

impl Record {
    /// The record of one generation: `sample`'s turn `turn` under `strategy`.
    pub fn of(
        sample: &Sample,
        turn: usize,
        strategy: Strategy,
        dataset: &str,
        prompt_tokens: usize,
        sampling: &RequestSampling,
        g: &Generation,
    ) -> Self {
        Self {
            sample_index: sample.index,
            sample_id: sample.id.clone(),
            turn,
            strategy: strategy.name().into(),
            drafter: String::new(),
            dataset: dataset.into(),
            prompt_tokens,
            finish_reason: match g.finish {
                Finish::Stop => "stop".into(),
                Finish::Length => "length".into(),
                Finish::Cancelled => "cancelled".into(),
            },
            sampling: SamplingRecord::of(sampling),
            metrics: RecordMetrics::of(g),
            commit: env!("AMUSD_COMMIT").into(),
        }
    }

    /// The record of a strategy that drafts with `drafter` (ar's records keep none).
    pub(super) fn drafted_by(mut self, drafter: &str) -> Self {
        if self.strategy != Strategy::Ar.name() {
            self.drafter = drafter.into();
        }
        self
    }

    /// The report's row: the strategy, and how it drafted unless with the model alone.
    pub(super) fn row(&self) -> String {
        row_label(&self.strategy, &self.drafter)
    }

    /// What the report groups by: the dataset, and the sampling unless plain greedy (with no
    /// grammar).
    pub(super) fn group(&self) -> String {
        let sampling = self.sampling.sampling();
        let plain = sampling.params.is_plain_greedy() && sampling.grammar.is_none();
        if plain && !sampling.greedy_draft {
            self.dataset.clone()
        } else {
            format!("{} ({})", self.dataset, sampling_label(&sampling))
        }
    }
}

pub(super) fn first_turn() -> usize {
    1
}

/// The paper's fields first, then ours. Times in seconds except `decode_ms_per_token`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct RecordMetrics {
    pub(super) total_time: f64,
    pub(super) tokens_generated: usize,
    pub(super) time_per_token: Option<f64>,
    pub(super) draft_times: Vec<f64>,
    pub(super) verify_times: Vec<f64>,
    pub(super) accepted_tokens: Vec<usize>,
    pub(super) ttft: f64,
    pub(super) decode_ms_per_token: Option<f64>,
    /// Tokens after the first commit, the denominator of `decode_ms_per_token`. Absent from records
    /// written before it existed, whose denominator was `tokens_generated - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) decode_tokens: Option<usize>,
    pub(super) acceptance_rate: f64,
    pub(super) proposed: usize,
    pub(super) accepted: usize,
    pub(super) verify_steps: usize,
    pub(super) rollbacks: usize,
    /// Of `proposed` and `accepted`, the tokens drafted by prompt lookup.
    #[serde(default)]
    pub(super) proposed_lookup: usize,
    #[serde(default)]
    pub(super) accepted_lookup: usize,
    /// Prompt tokens the verify model found cached from the previous turn (0 in records written
    /// before the prompt cache, and on every first turn).
    #[serde(default)]
    pub(super) cached_prompt_tokens: usize,
    pub(super) tokens_hash: String,
    pub(super) tokens: Vec<u32>,
}

impl RecordMetrics {
    pub(super) fn of(g: &Generation) -> Self {
        let m = &g.metrics;
        Self {
            total_time: m.total_time,
            tokens_generated: m.new_tokens,
            time_per_token: (m.new_tokens > 0).then(|| m.total_time / m.new_tokens as f64),
            draft_times: m.draft_times.clone(),
            verify_times: m.verify_times.clone(),
            accepted_tokens: m.accepted_per_step.clone(),
            ttft: m.ttft,
            // With one token there is no decode phase; Metrics would fall back to the total time,
            // which is mostly prefill and would skew a mean of decode rates.
            decode_ms_per_token: (m.decode_tokens > 0).then(|| m.ms_per_token()),
            decode_tokens: Some(m.decode_tokens),
            acceptance_rate: m.acceptance_rate(),
            proposed: m.proposed,
            accepted: m.accepted,
            verify_steps: m.verify_steps,
            rollbacks: m.rollbacks,
            proposed_lookup: m.proposed_lookup,
            accepted_lookup: m.accepted_lookup,
            cached_prompt_tokens: m.cached_prompt_tokens,
            tokens_hash: tokens_hash(&g.tokens),
            tokens: g.tokens.clone(),
        }
    }
}

/// FNV-1a (64-bit) of the token ids as little-endian u32s, in hex: a short fingerprint to compare
/// outputs by eye or across files.
pub(super) fn tokens_hash(tokens: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens {
        for b in t.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Writes the records one a line, so result files diff well and stay readable.
pub(super) fn write_records(path: &Path, records: &[Record]) -> Result<()> {
    let mut out = String::from("[\n");
    for (i, r) in records.iter().enumerate() {
        out.push_str(&serde_json::to_string(r)?);
        out.push_str(if i + 1 < records.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    write_output(path, &out)
}

/// Writes one of the bench's output files (`--output`, `--plot`, `--trace`), creating its
/// directory if need be.
pub(super) fn write_output(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

pub(super) fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an `amusd bench --output` file ({e})",
            path.display()
        )
    })
}

/// The report's row of `strategy` drafting with `drafter` ([`Record::row`]).
pub(super) fn row_label(strategy: &str, drafter: &str) -> String {
    match drafter {
        "" | "model" => strategy.to_string(),
        d => format!("{strategy} [{d}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_of_known_input() {
        // FNV-1a 64 of the empty input is the offset basis.
        assert_eq!(tokens_hash(&[]), "cbf29ce484222325");
        assert_ne!(tokens_hash(&[1, 2]), tokens_hash(&[2, 1]));
    }
}
