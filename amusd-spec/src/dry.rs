//! DRY ("don't repeat yourself", p-e-w's sampler, as llama.cpp's `--dry-*` applies it): a token
//! that would extend a repetition of what the sequence already holds loses
//! `multiplier * base^(n - allowed_length)` from its logit, `n` the length of the repeated run it
//! would continue, when `n >= allowed_length`. A run is the longest suffix of the window (the last
//! `last_n` tokens before the position, the prompt's included) that also occurs earlier in it;
//! the token after that earlier occurrence is the one that would repeat it. Runs stop at
//! sequence breakers (tokens whose text holds a breaker string such as a newline or a quote), so
//! structure that must repeat, a list's markup or code's punctuation, is left alone.
//!
//! A pure function of the logits and the tokens before the position, applied after the
//! repetition penalties ([`crate::sampling`]): every strategy penalizes each row alike, and the
//! strategies agree under it as under the rest.

use crate::sampling::SamplingError;

/// How a request penalizes repetitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Dry {
    /// The penalty's scale; 0 = off (llama.cpp's `dry_multiplier`).
    pub multiplier: f32,
    /// Each token more in the run multiplies the penalty by it; at least 1 (`dry_base`, 1.75).
    pub base: f32,
    /// Runs shorter than this go unpenalized (`dry_allowed_length`, 2).
    pub allowed_length: u32,
    /// The window: the last `last_n` tokens before the position; 0 = off, `u32::MAX` = all of
    /// them (`dry_penalty_last_n`, whose -1, the whole context, is the default).
    pub last_n: u32,
    /// The sequence breakers: bit `t % 64` of word `t / 64` is set for each breaker token `t`
    /// (the tokens whose text holds a breaker string; the tokenizer's owner finds them).
    pub breakers: Vec<u64>,
}

impl Default for Dry {
    fn default() -> Self {
        Self::OFF
    }
}

/// llama.cpp's default sequence breakers: a newline, a colon, a double quote, an asterisk.
pub const DEFAULT_BREAKERS: [&str; 4] = ["\n", ":", "\"", "*"];

/// Runs longer than this count as this long: the penalty stays finite (1.75^100 ~ 2e24).
const MAX_EXCESS: u32 = 100;

impl Dry {
    /// Off, with llama.cpp's defaults for the rest.
    pub const OFF: Self = Self {
        multiplier: 0.0,
        base: 1.75,
        allowed_length: 2,
        last_n: u32::MAX,
        breakers: Vec::new(),
    };

    /// `self` if every value is in its domain.
    pub fn validate(self) -> Result<Self, SamplingError> {
        if !(self.multiplier.is_finite() && self.multiplier >= 0.0) {
            return Err(SamplingError::DryMultiplier(self.multiplier));
        }
        if !(self.base.is_finite() && (1.0..=4.0).contains(&self.base)) {
            return Err(SamplingError::DryBase(self.base));
        }
        Ok(self)
    }

    pub fn is_off(&self) -> bool {
        self.multiplier == 0.0 || self.last_n == 0
    }

    fn is_breaker(&self, token: u32) -> bool {
        let (word, bit) = (token as usize / 64, token % 64);
        self.breakers.get(word).is_some_and(|w| w >> bit & 1 == 1)
    }

    /// The breaker set of `tokens` (ids).
    pub fn breaker_bits(tokens: impl IntoIterator<Item = u32>) -> Vec<u64> {
        let mut bits = Vec::new();
        for t in tokens {
            let word = t as usize / 64;
            if bits.len() <= word {
                bits.resize(word + 1, 0);
            }
            bits[word] |= 1 << (t % 64);
        }
        bits
    }

    /// Penalizes `logits` (those that predict the token after `prefix`); `z` is scratch reused
    /// between calls. Token ids past the vocabulary are ignored.
    pub fn apply(&self, logits: &mut [f32], prefix: &[u32], z: &mut Vec<usize>) {
        let window = &prefix[prefix.len().saturating_sub(self.last_n as usize)..];
        let n = window.len();
        // Tokens since the last breaker: no run reaches further back.
        let reach = (window.iter().rev())
            .position(|&t| self.is_breaker(t))
            .unwrap_or(n);
        if n < 2 || reach < self.allowed_length.max(1) as usize {
            return;
        }
        reversed_z(window, z);
        // Each earlier end `i` of the run (j = n - 1 - i back from the end): the run is the
        // common suffix of window[..=i] and the window, and window[i + 1] would repeat it.
        let mut longest: Vec<(u32, usize)> = Vec::new();
        for (j, &common) in z.iter().enumerate().skip(1) {
            let run = common.min(reach);
            if run >= self.allowed_length as usize && run > 0 {
                longest.push((window[n - j], run));
            }
        }
        longest.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        longest.dedup_by_key(|e| e.0);
        for (token, run) in longest {
            let Some(logit) = logits.get_mut(token as usize) else {
                continue;
            };
            let excess = (run as u32 - self.allowed_length).min(MAX_EXCESS);
            *logit -= self.multiplier * libm::powf(self.base, excess as f32);
        }
    }
}

/// The Z-function of `window` read backwards: `z[j]` is how many tokens `window` ending `j`
/// tokens before its end shares, backwards, with `window` itself (`z[0]` the whole length).
fn reversed_z(window: &[u32], z: &mut Vec<usize>) {
    let n = window.len();
    let at = |k: usize| window[n - 1 - k];
    z.clear();
    z.resize(n, 0);
    z[0] = n;
    let (mut l, mut r) = (0, 0);
    for j in 1..n {
        let mut k = if j < r { z[j - l].min(r - j) } else { 0 };
        while j + k < n && at(k) == at(j + k) {
            k += 1;
        }
        z[j] = k;
        if j + k > r {
            (l, r) = (j, j + k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dry(multiplier: f32, allowed_length: u32, breakers: &[u32]) -> Dry {
        Dry {
            multiplier,
            allowed_length,
            breakers: Dry::breaker_bits(breakers.iter().copied()),
            ..Dry::OFF
        }
    }

    fn penalized(d: &Dry, prefix: &[u32]) -> Vec<f32> {
        let mut logits = vec![0.0f32; 10];
        d.apply(&mut logits, prefix, &mut Vec::new());
        logits
    }

    /// The run each token would extend, the slow way: for every earlier end, the common suffix
    /// (cut at the last breaker), the longest per following token.
    fn runs_by_hand(d: &Dry, w: &[u32]) -> Vec<usize> {
        let n = w.len();
        let reach = (w.iter().rev()).position(|&t| d.is_breaker(t)).unwrap_or(n);
        let mut best = vec![0usize; 10];
        for i in 0..n.saturating_sub(1) {
            let common = (0..=i).take_while(|&k| w[i - k] == w[n - 1 - k]).count();
            let run = common.min(reach);
            best[w[i + 1] as usize] = best[w[i + 1] as usize].max(run);
        }
        best
    }

    #[test]
    fn a_repeated_run_penalizes_the_token_that_would_repeat_it() {
        let d = dry(0.8, 2, &[9]);
        // "1 2 3 4 ... 1 2 3": 4 would repeat a run of 3 (1.75^1 * 0.8).
        let l = penalized(&d, &[1, 2, 3, 4, 5, 1, 2, 3]);
        assert_eq!(l[4], -0.8 * 1.75);
        assert!(
            l.iter().enumerate().all(|(t, &x)| t == 4 || x == 0.0),
            "{l:?}"
        );
        // A run of 1 is allowed.
        assert!(penalized(&d, &[1, 2, 5, 1]).iter().all(|&x| x == 0.0));
        // A run of 2 is penalized by the multiplier alone.
        assert_eq!(penalized(&d, &[1, 2, 5, 1, 2])[5], -0.8);
        // A breaker in the run cuts it: "1 9 2 ... 1 9 2" repeats only "2".
        assert!(penalized(&d, &[1, 9, 2, 4, 1, 9, 2])
            .iter()
            .all(|&x| x == 0.0));
        // Off.
        assert!(penalized(&dry(0.0, 2, &[]), &[1, 2, 3, 1, 2, 3])
            .iter()
            .all(|&x| x == 0.0));
    }

    proptest! {
        /// The Z-function's runs are the slow way's, and so is the penalty.
        #[test]
        fn runs_are_the_longest_common_suffixes(
            w in proptest::collection::vec(0u32..4, 0..60),
            allowed in 1u32..4,
            breaker in proptest::option::of(0u32..4),
        ) {
            let d = dry(0.5, allowed, breaker.as_slice());
            let runs = runs_by_hand(&d, &w);
            let l = penalized(&d, &w);
            for t in 0..10 {
                let want = if runs[t] >= allowed as usize && runs[t] > 0 {
                    -0.5 * libm::powf(1.75, (runs[t] as u32 - allowed) as f32)
                } else {
                    0.0
                };
                prop_assert_eq!(l[t], want, "token {}, window {:?}", t, w);
            }
        }
    }
}
