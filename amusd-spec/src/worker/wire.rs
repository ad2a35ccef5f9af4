//! The region's form of what a request carries besides its tokens: its sampling, and the
//! log-probability rows the verify worker stores for the coordinator.

use amusd_shm::SamplingFields;

use crate::constraint::{Grammar, GrammarKind};
use crate::logprobs::{Logprobs, TokenLogprob};
use crate::sampling::{RequestSampling, SamplingParams};
use crate::SpecError;

/// The region's form of a request's sampling.
pub fn sampling_fields(s: &RequestSampling) -> SamplingFields {
    let p = &s.params;
    SamplingFields {
        seed: p.seed,
        temperature_bits: p.temperature.to_bits(),
        dynatemp_range_bits: p.dynatemp_range.to_bits(),
        dynatemp_exponent_bits: p.dynatemp_exponent.to_bits(),
        top_k: p.top_k,
        top_p_bits: p.top_p.to_bits(),
        min_p_bits: p.min_p.to_bits(),
        top_n_sigma_bits: p.top_n_sigma.to_bits(),
        typical_p_bits: p.typical_p.to_bits(),
        xtc_probability_bits: p.xtc_probability.to_bits(),
        xtc_threshold_bits: p.xtc_threshold.to_bits(),
        dry_multiplier_bits: p.dry.multiplier.to_bits(),
        dry_base_bits: p.dry.base.to_bits(),
        dry_allowed_length: p.dry.allowed_length,
        dry_last_n: p.dry.last_n,
        dry_breakers: p.dry.breakers.clone(),
        repeat_penalty_bits: p.penalties.repeat.to_bits(),
        frequency_penalty_bits: p.penalties.frequency.to_bits(),
        presence_penalty_bits: p.penalties.presence.to_bits(),
        penalty_last_n: p.penalties.last_n,
        greedy_draft: s.greedy_draft,
        no_draft_lookup: s.no_draft_lookup,
        cache_prompt: s.cache_prompt,
        logit_bias: (p.logit_bias.entries().iter())
            .map(|&(token, bias)| (token, bias.to_bits()))
            .collect(),
        logprobs: s
            .logprobs
            .map_or(0, |k| 1 + k.min(crate::logprobs::MAX_TOP) as u32),
        prompt_logprobs: s.prompt_logprobs,
        grammar_kind: s.grammar.as_ref().map_or(0, |g| g.kind.code()),
        grammar: s
            .grammar
            .as_ref()
            .map_or_else(String::new, |g| g.text.clone()),
    }
}

/// A request's sampling from the region's fields, validated (the coordinator validated them, so an
/// error here means a corrupt region).
pub fn sampling_of(f: &SamplingFields) -> Result<RequestSampling, SpecError> {
    let params = SamplingParams {
        temperature: f32::from_bits(f.temperature_bits),
        dynatemp_range: f32::from_bits(f.dynatemp_range_bits),
        dynatemp_exponent: f32::from_bits(f.dynatemp_exponent_bits),
        top_k: f.top_k,
        top_p: f32::from_bits(f.top_p_bits),
        min_p: f32::from_bits(f.min_p_bits),
        top_n_sigma: f32::from_bits(f.top_n_sigma_bits),
        typical_p: f32::from_bits(f.typical_p_bits),
        xtc_probability: f32::from_bits(f.xtc_probability_bits),
        xtc_threshold: f32::from_bits(f.xtc_threshold_bits),
        seed: f.seed,
        penalties: crate::Penalties {
            repeat: f32::from_bits(f.repeat_penalty_bits),
            frequency: f32::from_bits(f.frequency_penalty_bits),
            presence: f32::from_bits(f.presence_penalty_bits),
            last_n: f.penalty_last_n,
        },
        logit_bias: crate::LogitBias::new(
            (f.logit_bias.iter()).map(|&(token, bias)| (token, f32::from_bits(bias))),
        )?,
        dry: crate::Dry {
            multiplier: f32::from_bits(f.dry_multiplier_bits),
            base: f32::from_bits(f.dry_base_bits),
            allowed_length: f.dry_allowed_length,
            last_n: f.dry_last_n,
            breakers: f.dry_breakers.clone(),
        },
    }
    .validate()?;
    Ok(RequestSampling {
        params,
        greedy_draft: f.greedy_draft,
        no_draft_lookup: f.no_draft_lookup,
        cache_prompt: f.cache_prompt,
        logprobs: (f.logprobs > 0).then(|| (f.logprobs - 1) as usize),
        prompt_logprobs: f.prompt_logprobs,
        grammar: match f.grammar_kind {
            0 => None,
            code => Some(Grammar::new(
                GrammarKind::from_code(code).ok_or_else(|| {
                    SpecError::Protocol(format!("unknown grammar kind {code} in the region"))
                })?,
                f.grammar.clone(),
            )),
        },
    })
}

/// Marks a slot of a log-probability row past its alternatives (a vocabulary smaller than the
/// `k` asked for): not a token id.
const NO_TOKEN: u32 = u32::MAX;

/// Log-probabilities as the region's rows carry them ([`amusd_shm::LogprobBuffer`]), `width`
/// entries each (padded with [`NO_TOKEN`]).
pub(super) fn logprob_rows(logprobs: &[Logprobs], width: usize) -> Vec<Vec<(u32, u32)>> {
    let entry = |t: &TokenLogprob| (t.token, t.logprob.to_bits());
    (logprobs.iter())
        .map(|l| {
            let mut row: Vec<_> = std::iter::once(&l.chosen)
                .chain(&l.top)
                .map(entry)
                .collect();
            row.resize(width.max(row.len()), (NO_TOKEN, 0));
            row
        })
        .collect()
}

/// [`logprob_rows`]' inverse.
pub(super) fn logprobs_of_rows(rows: Vec<Vec<(u32, u32)>>) -> Vec<Logprobs> {
    let entry = |&(token, bits): &(u32, u32)| TokenLogprob {
        token,
        logprob: f32::from_bits(bits),
    };
    (rows.iter())
        .filter_map(|row| {
            let (chosen, top) = row.split_first()?;
            Some(Logprobs {
                chosen: entry(chosen),
                top: (top.iter())
                    .take_while(|e| e.0 != NO_TOKEN)
                    .map(entry)
                    .collect(),
            })
        })
        .collect()
}
