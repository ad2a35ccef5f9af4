//! A request's sampling parameters, checked: OpenAI's and llama.cpp's names, ranges and the
//! combinations we refuse.

use serde_json::Value;

use super::{Endpoint, RawRequest, MAX_TOP_LOGPROBS};
use crate::error::ApiError;
use crate::generator::{DrySampling, Sampling};

/// A request's sampling, every parameter checked; the per-endpoint ones (log-probabilities, the
/// output's grammar) are `validate`'s.
pub(super) fn sampling(r: &RawRequest) -> Result<Sampling, ApiError> {
    let unit_open = |x: f32| x > 0.0 && x <= 1.0;
    let unit = |x: f32| (0.0..=1.0).contains(&x);
    let temperature = param(
        "temperature",
        r.temperature,
        0.0,
        "be 0 (greedy) or more",
        |x| x >= 0.0 && x.is_finite(),
    )?;
    let top_p = param("top_p", r.top_p, 1.0, "be in (0, 1] (1: off)", unit_open)?;
    let min_p = param("min_p", r.min_p, 0.0, "be in [0, 1] (0: off)", unit)?;
    let typical_p = param("typical_p", r.typical_p, 1.0, "be in (0, 1]", unit_open)?;
    let top_n_sigma = param(
        "top_n_sigma",
        r.top_n_sigma,
        0.0,
        "be a number (0 or less: off)",
        f32::is_finite,
    )?;
    let dynatemp_range = param(
        "dynatemp_range",
        r.dynatemp_range,
        0.0,
        "be 0 (off) or more",
        |x| x.is_finite() && x >= 0.0,
    )?;
    let dynatemp_exponent = param(
        "dynatemp_exponent",
        r.dynatemp_exponent,
        1.0,
        "be more than 0",
        |x| x.is_finite() && x > 0.0,
    )?;
    let xtc_probability = param(
        "xtc_probability",
        r.xtc_probability,
        0.0,
        "be in [0, 1]",
        unit,
    )?;
    let xtc_threshold = param("xtc_threshold", r.xtc_threshold, 0.1, "be in [0, 1]", unit)?;
    // Like llama.cpp: zero or negative top_k means no top-k.
    let top_k = r.top_k.unwrap_or(0).clamp(0, i64::from(u32::MAX)) as u32;
    let (repeat_penalty, frequency_penalty, presence_penalty, repeat_last_n) = penalties(r)?;
    Ok(Sampling {
        temperature,
        dynatemp_range,
        dynatemp_exponent,
        top_k,
        top_p,
        min_p,
        top_n_sigma,
        typical_p,
        xtc_probability,
        xtc_threshold,
        seed: r.seed,
        repeat_penalty,
        frequency_penalty,
        presence_penalty,
        repeat_last_n,
        dry: dry(r)?,
        logit_bias: logit_bias(r.logit_bias.as_ref())?,
        // Per endpoint, and checked apart: `validate` sets them.
        logprobs: None,
        prompt_logprobs: false,
        grammar: None,
        prompt_lookup: r.prompt_lookup.unwrap_or(true),
        cache_prompt: r.cache_prompt.unwrap_or(true),
    })
}

/// A parameter's value (`default` when absent), refused by name unless `ok`: the error reads
/// "NAME VALUE must MUST".
fn param(
    name: &str,
    v: Option<f32>,
    default: f32,
    must: &str,
    ok: impl Fn(f32) -> bool,
) -> Result<f32, ApiError> {
    let x = v.unwrap_or(default);
    if ok(x) {
        Ok(x)
    } else {
        Err(ApiError::bad_param(name, format!("{name} {x} must {must}")))
    }
}

/// OpenAI's log-probability options, checked: chat's `logprobs` (true or false) and
/// `top_logprobs` (alternatives per token, 0 to [`MAX_TOP_LOGPROBS`]; only with `logprobs`),
/// completions' `logprobs` (alternatives per token). `Some(k)` when asked for.
pub(super) fn logprobs(r: &RawRequest, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
    let given = |v: &Option<Value>| v.clone().filter(|v| !v.is_null());
    let count = |name: &str, v: Value| {
        (v.as_u64())
            .filter(|&k| k as usize <= MAX_TOP_LOGPROBS)
            .map(|k| k as usize)
            .ok_or_else(|| {
                ApiError::bad_param(
                    name,
                    format!("{name} must be a whole number from 0 to {MAX_TOP_LOGPROBS}, got {v}"),
                )
            })
    };
    if endpoint == Endpoint::Completions {
        return match given(&r.logprobs) {
            None | Some(Value::Bool(false)) => Ok(None),
            Some(v) => count("logprobs", v).map(Some),
        };
    }
    let on = match given(&r.logprobs) {
        None => false,
        Some(Value::Bool(on)) => on,
        Some(v) => {
            return Err(ApiError::bad_param(
                "logprobs",
                format!("logprobs must be true or false, got {v}"),
            ))
        }
    };
    match (
        on,
        given(&r.top_logprobs)
            .map(|v| count("top_logprobs", v))
            .transpose()?,
    ) {
        (true, k) => Ok(Some(k.unwrap_or(0))),
        (false, None | Some(0)) => Ok(None),
        (false, Some(_)) => Err(ApiError::bad_param(
            "top_logprobs",
            "top_logprobs needs \"logprobs\": true",
        )),
    }
}

/// OpenAI's `logit_bias`, checked: token ids (decimal strings) to numbers in [-100, 100]; the ids
/// ascending. Whether they are in the vocabulary is the handler's check (it has the codec).
fn logit_bias(v: Option<&Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let bad = |m: String| ApiError::bad_param("logit_bias", m);
    let map =
        match v {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(bad(
                "logit_bias must be an object of token ids to biases, such as {\"15043\": -100}"
                    .into(),
            )),
        };
    let mut out = Vec::with_capacity(map.len());
    for (key, value) in map {
        let token = (key.parse::<u32>())
            .map_err(|_| bad(format!("logit_bias: {key:?} is not a token id")))?;
        let bias = (value.as_f64())
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                bad(format!(
                    "logit_bias: the bias of token {key} must be a number in [-100, 100], got {value}"
                ))
            })?;
        out.push((token, bias as f32));
    }
    out.sort_unstable_by_key(|&(token, _)| token);
    Ok(out)
}

/// The repeat, frequency and presence penalties and their window, checked.
fn dry(r: &RawRequest) -> Result<DrySampling, ApiError> {
    let d = DrySampling::default();
    let multiplier = r.dry_multiplier.unwrap_or(d.multiplier);
    if !(multiplier >= 0.0 && multiplier.is_finite()) {
        return Err(ApiError::bad_param(
            "dry_multiplier",
            format!("dry_multiplier {multiplier} must be 0 (off) or more"),
        ));
    }
    let base = r.dry_base.unwrap_or(d.base);
    if !(1.0..=4.0).contains(&base) {
        return Err(ApiError::bad_param(
            "dry_base",
            format!("dry_base {base} must be in [1, 4]"),
        ));
    }
    let last_n = match r.dry_penalty_last_n.unwrap_or(-1) {
        -1 => u32::MAX,
        n @ 0.. => u32::try_from(n).unwrap_or(u32::MAX),
        n => {
            return Err(ApiError::bad_param(
                "dry_penalty_last_n",
                format!("dry_penalty_last_n {n} must be -1 (the whole sequence) or more"),
            ))
        }
    };
    Ok(DrySampling {
        multiplier,
        base,
        allowed_length: u32::try_from(r.dry_allowed_length.unwrap_or(2)).unwrap_or(u32::MAX),
        last_n,
        sequence_breakers: r.dry_sequence_breakers.clone(),
        breakers: Vec::new(),
    })
}

fn penalties(r: &RawRequest) -> Result<(f32, f32, f32, u32), ApiError> {
    let (name, repeat) = match (r.repeat_penalty, r.repetition_penalty) {
        (Some(p), _) => ("repeat_penalty", p),
        (None, Some(p)) => ("repetition_penalty", p),
        (None, None) => ("repeat_penalty", 1.0),
    };
    if !(repeat > 0.0 && repeat.is_finite()) {
        return Err(ApiError::bad_param(
            name,
            format!("{name} {repeat} must be more than 0 (1: off)"),
        ));
    }
    let additive = |name: &str, value: Option<f32>| {
        let v = value.unwrap_or(0.0);
        match (-2.0..=2.0).contains(&v) {
            true => Ok(v),
            false => Err(ApiError::bad_param(
                name,
                format!("{name} {v} must be in [-2, 2] (0: off)"),
            )),
        }
    };
    let frequency = additive("frequency_penalty", r.frequency_penalty)?;
    let presence = additive("presence_penalty", r.presence_penalty)?;
    let last_n = match r.repeat_last_n.unwrap_or(64) {
        -1 => u32::MAX,
        n @ 0.. => u32::try_from(n).unwrap_or(u32::MAX),
        n => {
            return Err(ApiError::bad_param(
                "repeat_last_n",
                format!("repeat_last_n {n} must be -1 (the whole sequence) or more"),
            ))
        }
    };
    Ok((repeat, frequency, presence, last_n))
}
