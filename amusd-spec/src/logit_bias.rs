//! A request's logit bias, as OpenAI's `logit_bias` and llama.cpp's `--logit-bias`: a value added
//! to given tokens' logits before anything else ([`crate::sampling`]'s first step, then the
//! penalties), in f32; `-inf` bans a token. A function of the logits alone, so the verify model
//! biases every row of a verify step as `ar` biases its one, the draft biases its own rows alike,
//! and `ar`, `sd` and `amusd` still commit the same tokens.

use crate::sampling::SamplingError;

/// The most tokens one request may bias: what the region has room for.
pub const MAX_ENTRIES: usize = amusd_shm::MAX_LOGIT_BIAS;

/// The most a bias may be, either way (OpenAI's range), besides `-inf`.
pub const MAX_BIAS: f32 = 100.0;

/// Biases of some tokens, sorted by token id, each id once.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogitBias(Vec<(u32, f32)>);

impl LogitBias {
    /// No bias.
    pub const NONE: Self = Self(Vec::new());

    /// The bias of each `(token, bias)`: refused if a token comes twice, a bias is outside
    /// [-[`MAX_BIAS`], [`MAX_BIAS`]] and not `-inf`, or there are more than [`MAX_ENTRIES`].
    pub fn new(entries: impl IntoIterator<Item = (u32, f32)>) -> Result<Self, SamplingError> {
        let mut v: Vec<(u32, f32)> = entries.into_iter().collect();
        if v.len() > MAX_ENTRIES {
            return Err(SamplingError::LogitBiasCount(v.len()));
        }
        if let Some(&(token, bias)) = v
            .iter()
            .find(|(_, b)| !((-MAX_BIAS..=MAX_BIAS).contains(b) || *b == f32::NEG_INFINITY))
        {
            return Err(SamplingError::LogitBias(token, bias));
        }
        v.sort_unstable_by_key(|&(token, _)| token);
        if let Some(w) = v.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(SamplingError::LogitBiasTwice(w[0].0));
        }
        Ok(Self(v))
    }

    pub fn entries(&self) -> &[(u32, f32)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `self` if every token is below `vocab`, the model's vocabulary size.
    pub fn check_vocab(&self, vocab: usize) -> Result<&Self, SamplingError> {
        match self.0.last() {
            Some(&(token, _)) if token as usize >= vocab => {
                Err(SamplingError::LogitBiasToken(token, vocab))
            }
            _ => Ok(self),
        }
    }

    /// Adds each bias to its token's logit; ids past the vocabulary are ignored (the coordinator
    /// refuses them first, [`Self::check_vocab`]).
    pub fn apply(&self, logits: &mut [f32]) {
        for &(token, bias) in &self.0 {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_add_to_their_tokens_and_minus_infinity_bans() {
        let b = LogitBias::new([(3, -2.5), (0, 1.0), (1, f32::NEG_INFINITY), (99, 5.0)]).unwrap();
        assert_eq!(
            b.entries().iter().map(|e| e.0).collect::<Vec<_>>(),
            [0, 1, 3, 99]
        );
        let mut logits = [1.0f32, 2.0, 3.0, 4.0];
        b.apply(&mut logits);
        assert_eq!(logits, [2.0, f32::NEG_INFINITY, 3.0, 1.5]);
        assert!(LogitBias::NONE.is_empty() && !b.is_empty());
    }

    #[test]
    fn bad_biases_are_refused() {
        for bias in [100.5, -101.0, f32::NAN, f32::INFINITY] {
            assert!(
                matches!(
                    LogitBias::new([(7, bias)]),
                    Err(SamplingError::LogitBias(7, _))
                ),
                "{bias}"
            );
        }
        assert_eq!(
            LogitBias::new([(4, 1.0), (2, 0.0), (4, -1.0)]),
            Err(SamplingError::LogitBiasTwice(4))
        );
        let many = (0..=MAX_ENTRIES as u32).map(|t| (t, 1.0));
        assert_eq!(
            LogitBias::new(many),
            Err(SamplingError::LogitBiasCount(MAX_ENTRIES + 1))
        );
        let most = LogitBias::new((0..MAX_ENTRIES as u32).map(|t| (t, -100.0))).unwrap();
        assert!(most.check_vocab(MAX_ENTRIES).is_ok());
        assert_eq!(
            most.check_vocab(MAX_ENTRIES - 1),
            Err(SamplingError::LogitBiasToken(
                MAX_ENTRIES as u32 - 1,
                MAX_ENTRIES - 1
            ))
        );
    }
}
