//! Log-probabilities of the tokens a request generates, as OpenAI's `logprobs` / `top_logprobs`
//! report them: the verify model's log-softmax of its raw logits (before the bias, the penalties
//! and the temperature: vLLM's and llama.cpp's default), for the chosen token and the `k` most
//! likely ones. A function of the logits alone, and the verify model's logits have the same bits
//! in every strategy, so `ar`, `sd` and `amusd` report the same numbers.

/// Most alternatives a request may ask for per token (OpenAI's limit).
pub const MAX_TOP: usize = amusd_shm::MAX_TOP_LOGPROBS;

/// A token and its log-probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// One generated token's log-probability and the `k` most likely tokens at its position, most
/// likely first (ties: the lower id).
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// The log-probabilities of `chosen` and of the `top` most likely tokens under `logits`: each
/// `x - m - ln(sum of exp(x_j - m))` with `m` the largest logit, the sum in f64 (a NaN logit
/// counts as `-inf`). One pass over the vocabulary for the sum and one for the top.
pub fn logprobs_of(logits: &[f32], chosen: u32, top: usize) -> Logprobs {
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let m = logits
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(clean(x)));
    let sum: f64 = logits
        .iter()
        .map(|&x| f64::from((clean(x) - m).exp()))
        .sum();
    let log_z = f64::from(m) + sum.ln();
    let lp = |token: u32| TokenLogprob {
        token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&x| (f64::from(clean(x)) - log_z) as f32),
    };
    Logprobs {
        chosen: lp(chosen),
        top: top_tokens(logits, top.min(MAX_TOP))
            .into_iter()
            .map(lp)
            .collect(),
    }
}

/// The ids of the `k` largest logits, largest first, ties to the lower id (NaN last).
fn top_tokens(logits: &[f32], k: usize) -> Vec<u32> {
    let key = |t: u32| {
        let x = logits[t as usize];
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x
        }
    };
    // Kept sorted, best first; a token enters if it beats the last.
    let mut best: Vec<u32> = Vec::with_capacity(k + 1);
    for t in 0..logits.len() as u32 {
        if best.len() == k && best.last().is_none_or(|&b| key(t) <= key(b)) {
            continue;
        }
        let at = best.partition_point(|&b| key(b) >= key(t));
        best.insert(at, t);
        best.truncate(k);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition in f64, token by token, and the top in order with ties.
    #[test]
    fn log_softmax_and_the_top_tokens() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, f32::NAN, 0.5, f32::NEG_INFINITY];
        let z: f64 = logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| f64::from(x).exp())
            .sum();
        let got = logprobs_of(&logits, 5, 3);
        assert_eq!(got.chosen.token, 5);
        assert!((f64::from(got.chosen.logprob) - (0.5 - z.ln())).abs() < 1e-6);
        let ids: Vec<u32> = got.top.iter().map(|t| t.token).collect();
        assert_eq!(ids, [1, 3, 0]);
        assert_eq!(got.top[0].logprob, got.top[1].logprob);
        let total: f64 = (0..7)
            .map(|t| f64::from(logprobs_of(&logits, t, 0).chosen.logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert_eq!(logprobs_of(&logits, 4, 0).chosen.logprob, f32::NEG_INFINITY);
        assert!(logprobs_of(&logits, 0, 0).top.is_empty());
        assert_eq!(logprobs_of(&logits, 0, 99).top.len(), logits.len());
    }
}
