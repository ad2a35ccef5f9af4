//! What gets committed: greedy acceptance of draft tokens and the stop rules.

/// Greedy acceptance: the longest prefix of `draft` that matches the verify model's own tokens, then
/// the verify model's token at the first mismatch (or after the whole draft). `verified` has
/// `draft.len() + 1` tokens, as returned by [`crate::Verifier::verify`]. Returns the tokens to commit
/// and how many of them were draft tokens.
pub fn accept(draft: &[u32], verified: &[u32]) -> (Vec<u32>, usize) {
    let n = draft
        .iter()
        .zip(verified)
        .take_while(|(d, v)| d == v)
        .count();
    let mut out = draft[..n].to_vec();
    if let Some(&t) = verified.get(n) {
        out.push(t);
    }
    (out, n)
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// A stop token was produced (it is not part of the output).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The caller's token callback asked to stop.
    Cancelled,
}

/// Stop tokens and the token budget of one request.
#[derive(Clone, Debug)]
pub struct StopCriteria {
    pub stop_ids: Vec<u32>,
    pub max_new_tokens: usize,
}

impl StopCriteria {
    /// Whether `token` ends a generation.
    pub fn is_stop(&self, token: u32) -> bool {
        self.stop_ids.contains(&token)
    }

    /// Whether `generated` (the tokens after the prompt, a stop token included) ends the request:
    /// it fills the budget or ends with a stop token.
    pub fn ends(&self, generated: &[u32]) -> bool {
        generated.len() >= self.max_new_tokens || generated.last().is_some_and(|&t| self.is_stop(t))
    }

    /// Of `tokens`, proposed after `generated` tokens were already emitted, how many to keep and
    /// whether the generation ends with them.
    pub fn clip(&self, generated: usize, tokens: &[u32]) -> (usize, Option<Finish>) {
        let budget = self.max_new_tokens.saturating_sub(generated);
        for (i, t) in tokens.iter().enumerate() {
            if i == budget {
                return (i, Some(Finish::Length));
            }
            if self.is_stop(*t) {
                return (i, Some(Finish::Stop));
            }
        }
        if tokens.len() >= budget {
            return (budget, Some(Finish::Length));
        }
        (tokens.len(), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_longest_matching_prefix_plus_one() {
        assert_eq!(accept(&[1, 2, 3], &[1, 2, 9, 4]), (vec![1, 2, 9], 2));
        assert_eq!(accept(&[1, 2, 3], &[1, 2, 3, 4]), (vec![1, 2, 3, 4], 3));
        assert_eq!(accept(&[5], &[1, 2]), (vec![1], 0));
        assert_eq!(accept(&[], &[7]), (vec![7], 0));
    }

    #[test]
    fn a_request_ends_with_a_stop_token_or_the_budget() {
        let s = StopCriteria {
            stop_ids: vec![0],
            max_new_tokens: 3,
        };
        assert!(!s.ends(&[]));
        assert!(!s.ends(&[5, 6]));
        assert!(s.ends(&[5, 0]));
        assert!(s.ends(&[5, 6, 7]));
        assert!(s.ends(&[0]));
    }

    #[test]
    fn clip_stops_at_stop_token_or_budget() {
        let s = StopCriteria {
            stop_ids: vec![0],
            max_new_tokens: 5,
        };
        assert_eq!(s.clip(0, &[3, 4]), (2, None));
        assert_eq!(s.clip(0, &[3, 0, 4]), (1, Some(Finish::Stop)));
        assert_eq!(s.clip(3, &[3, 4, 5]), (2, Some(Finish::Length)));
        assert_eq!(s.clip(4, &[0]), (0, Some(Finish::Stop)));
        assert_eq!(s.clip(3, &[3, 4]), (2, Some(Finish::Length)));
        assert_eq!(
            StopCriteria {
                stop_ids: vec![],
                max_new_tokens: 0
            }
            .clip(0, &[1]),
            (0, Some(Finish::Length))
        );
    }
}
