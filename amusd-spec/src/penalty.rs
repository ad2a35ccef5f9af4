//! Repetition penalties, as llama.cpp applies them: over the last `last_n` tokens before the
//! position (the prompt's included), each token that occurs there `c` times has its logit divided
//! by `repeat` if positive, multiplied by it if not, then lowered by `c * frequency + presence`,
//! all in f32, before temperature and the filters ([`crate::sampling`]). A pure function of the
//! logits and the tokens before the position, as the rest of the sampling is: the verify model
//! penalizes each row of a verify step by the tokens before that row (the committed ones and the
//! candidates ahead of it), so `ar`, `sd` and `amusd` still commit the same tokens, and the draft
//! penalizes its own rows alike, so it proposes what the verify model will choose.

use crate::sampling::SamplingError;

/// The most a frequency or presence penalty may be, either way (OpenAI's range).
pub const MAX_ADDITIVE: f32 = 2.0;

/// How a request penalizes the tokens it has just seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Penalties {
    /// Divides a positive logit, multiplies a negative one; 1 = off (llama.cpp's
    /// `repeat_penalty`, vLLM's `repetition_penalty`).
    pub repeat: f32,
    /// Subtracted once per occurrence in the window; 0 = off (OpenAI's `frequency_penalty`).
    pub frequency: f32,
    /// Subtracted once if the token occurs in the window; 0 = off (OpenAI's `presence_penalty`).
    pub presence: f32,
    /// The window: the last `last_n` tokens before the position; 0 = off, `u32::MAX` = all of
    /// them (llama.cpp's `repeat_last_n`, whose 64 is the default).
    pub last_n: u32,
}

impl Default for Penalties {
    fn default() -> Self {
        Self::OFF
    }
}

impl Penalties {
    /// No penalty, over llama.cpp's default window.
    pub const OFF: Self = Self {
        repeat: 1.0,
        frequency: 0.0,
        presence: 0.0,
        last_n: 64,
    };

    /// `self` if every value is in its domain.
    pub fn validate(self) -> Result<Self, SamplingError> {
        if !(self.repeat.is_finite() && self.repeat > 0.0) {
            return Err(SamplingError::RepeatPenalty(self.repeat));
        }
        for (value, error) in [
            (
                self.frequency,
                SamplingError::FrequencyPenalty as fn(f32) -> _,
            ),
            (self.presence, SamplingError::PresencePenalty),
        ] {
            if !(-MAX_ADDITIVE..=MAX_ADDITIVE).contains(&value) {
                return Err(error(value));
            }
        }
        Ok(self)
    }

    /// Whether applying them changes nothing.
    pub fn is_off(&self) -> bool {
        self.last_n == 0 || (self.repeat == 1.0 && self.frequency == 0.0 && self.presence == 0.0)
    }

    /// Penalizes `logits` (those that predict the token after `prefix`) by the tokens in the
    /// window; `scratch` is reused between calls. Token ids past the vocabulary are ignored.
    pub fn apply(&self, logits: &mut [f32], prefix: &[u32], scratch: &mut Vec<u32>) {
        let window = &prefix[prefix.len().saturating_sub(self.last_n as usize)..];
        scratch.clear();
        scratch.extend_from_slice(window);
        scratch.sort_unstable();
        for run in scratch.chunk_by(|a, b| a == b) {
            let Some(logit) = logits.get_mut(run[0] as usize) else {
                continue;
            };
            if *logit <= 0.0 {
                *logit *= self.repeat;
            } else {
                *logit /= self.repeat;
            }
            *logit -= run.len() as f32 * self.frequency + self.presence;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalized(p: Penalties, logits: &[f32], prefix: &[u32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        p.apply(&mut out, prefix, &mut Vec::new());
        out
    }

    #[test]
    fn each_penalty_does_what_llama_cpp_does() {
        let logits = [2.0f32, -2.0, 1.0, 0.0, 3.0];
        let prefix = [0u32, 1, 0, 3, 99];
        let repeat = Penalties {
            repeat: 2.0,
            ..Penalties::OFF
        };
        assert_eq!(
            penalized(repeat, &logits, &prefix),
            [1.0, -4.0, 1.0, 0.0, 3.0]
        );
        let additive = Penalties {
            frequency: 0.5,
            presence: 0.25,
            ..Penalties::OFF
        };
        // Token 0 twice: 2 - (2 * 0.5 + 0.25); tokens 1 and 3 once; 99 is past the vocabulary.
        assert_eq!(
            penalized(additive, &logits, &prefix),
            [0.75, -2.75, 1.0, -0.75, 3.0]
        );
        let both = Penalties {
            repeat: 2.0,
            ..additive
        };
        assert_eq!(penalized(both, &logits, &prefix)[..2], [-0.25, -4.75]);
    }

    #[test]
    fn only_the_window_counts() {
        let logits = [1.0f32; 4];
        let p = Penalties {
            frequency: 1.0,
            last_n: 2,
            ..Penalties::OFF
        };
        assert_eq!(penalized(p, &logits, &[1, 1, 2, 3]), [1.0, 1.0, 0.0, 0.0]);
        let all = Penalties {
            last_n: u32::MAX,
            ..p
        };
        assert_eq!(
            penalized(all, &logits, &[1, 1, 2, 3]),
            [1.0, -1.0, 0.0, 0.0]
        );
        let none = Penalties { last_n: 0, ..p };
        assert!(none.is_off());
        assert_eq!(penalized(none, &logits, &[1, 1, 2, 3]), logits);
        assert!(Penalties::OFF.is_off() && !p.is_off());
    }

    #[test]
    fn out_of_range_values_are_refused() {
        for r in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let e = Penalties {
                repeat: r,
                ..Penalties::OFF
            };
            assert!(
                matches!(e.validate(), Err(SamplingError::RepeatPenalty(_))),
                "{r}"
            );
        }
        for v in [2.5, -2.01, f32::NAN] {
            let f = Penalties {
                frequency: v,
                ..Penalties::OFF
            };
            assert!(matches!(
                f.validate(),
                Err(SamplingError::FrequencyPenalty(_))
            ));
            let p = Penalties {
                presence: v,
                ..Penalties::OFF
            };
            assert!(matches!(
                p.validate(),
                Err(SamplingError::PresencePenalty(_))
            ));
        }
        let ok = Penalties {
            repeat: 1.3,
            frequency: -2.0,
            presence: 2.0,
            last_n: u32::MAX,
        };
        assert_eq!(ok.validate(), Ok(ok));
    }
}
