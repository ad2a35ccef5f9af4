//! Token frequency rankings: which rows of its output head a draft model keeps.
//!
//! A draft whose head scores only the most frequent tokens reads fewer bytes per token (the head
//! is ~30% of the default draft's bytes) and loses only the drafts whose token it cannot propose
//! (FR-Spec, 2025). Which tokens are frequent comes from a ranking counted over a corpus and
//! shipped for the vocabularies we know ([`TokenRanking::for_vocab`]), matched to a model by a
//! fingerprint of its token strings. Any other vocabulary falls back to id order, which for BPE is
//! merge order: a much weaker proxy (on a 4 M-token part of the ranking corpus, SmolLM2's first
//! 16384 ids cover 91% of the tokens, its 16384 most frequent 99.9%). A ranking fits the text it
//! was counted on: SmolLM2's (code and technical prose) covers code well and conversation poorly
//! (README, "The default model pair, honestly").

use crate::ModelError;

/// The SmolLM2 ranking (`scripts/rank-tokens.sh` writes it; its header says from what).
const SMOLLM2: &str = include_str!("../data/smollm2-token-ranking.txt");

/// Token ids, most frequent first; ids never counted are ranked after them, in id order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRanking {
    ids: Vec<u32>,
    by_frequency: bool,
}

impl TokenRanking {
    /// Ids in numeric order: the fallback for a vocabulary without a ranking.
    pub fn id_order() -> Self {
        Self {
            ids: Vec::new(),
            by_frequency: false,
        }
    }

    /// The built-in ranking whose vocabulary is `tokens` (the strings of ids 0, 1, ...), or id
    /// order when none is.
    pub fn for_vocab<S: AsRef<str>>(tokens: &[S]) -> Self {
        let print = fingerprint(tokens);
        [SMOLLM2]
            .into_iter()
            .filter_map(|text| Self::parse(text).ok())
            .find(|(vocab, p, _)| *vocab == tokens.len() && *p == print)
            .map_or_else(Self::id_order, |(_, _, r)| r)
    }

    /// A ranking file: `#` comment lines, `vocab N`, `fingerprint 0xHEX`, then one id a line,
    /// most frequent first. Returns the vocabulary size and fingerprint it is for, and the ranking.
    pub fn parse(text: &str) -> Result<(usize, u64, Self), ModelError> {
        let bad = |what: &str| ModelError::Spec(format!("bad token ranking: {what}"));
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .map(str::trim)
                .ok_or_else(|| bad(&format!("expected '{name} ...'")))
        };
        let vocab: usize = field("vocab")?.parse().map_err(|_| bad("vocab"))?;
        let print = field("fingerprint")?;
        let print = u64::from_str_radix(print.trim_start_matches("0x"), 16)
            .map_err(|_| bad("fingerprint"))?;
        let mut seen = vec![false; vocab];
        let mut ids = Vec::new();
        for line in lines {
            let id: u32 = line.trim().parse().map_err(|_| bad(line))?;
            let slot = seen
                .get_mut(id as usize)
                .ok_or_else(|| bad("id beyond vocab"))?;
            if std::mem::replace(slot, true) {
                return Err(bad(&format!("id {id} twice")));
            }
            ids.push(id);
        }
        let ranking = Self {
            ids,
            by_frequency: true,
        };
        Ok((vocab, print, ranking))
    }

    /// Whether this ranking was counted (rather than id order).
    pub fn by_frequency(&self) -> bool {
        self.by_frequency
    }

    /// The `keep` highest-ranked ids of a `vocab`-token vocabulary, in increasing order.
    pub fn top(&self, keep: usize, vocab: usize) -> Vec<u32> {
        let keep = keep.min(vocab);
        let mut chosen = vec![false; vocab];
        let ranked = self.ids.iter().copied().filter(|&i| (i as usize) < vocab);
        let rest = 0..vocab as u32;
        let mut left = keep;
        for id in ranked.chain(rest) {
            if left == 0 {
                break;
            }
            if !std::mem::replace(&mut chosen[id as usize], true) {
                left -= 1;
            }
        }
        (0..vocab as u32).filter(|&i| chosen[i as usize]).collect()
    }
}

/// FNV-1a (64-bit) over the token strings in id order, each followed by 0xFF (never in UTF-8).
pub fn fingerprint<S: AsRef<str>>(tokens: &[S]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for t in tokens {
        for &b in t.as_ref().as_bytes().iter().chain(&[0xFF]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_top_ids_follow_the_ranking_then_id_order() {
        let (_, _, r) = TokenRanking::parse("# x\nvocab 10\nfingerprint 0x1\n7\n3\n9\n").unwrap();
        assert!(r.by_frequency());
        assert_eq!(r.top(2, 10), vec![3, 7]);
        assert_eq!(r.top(3, 10), vec![3, 7, 9]);
        assert_eq!(
            r.top(5, 10),
            vec![0, 1, 3, 7, 9],
            "then the unranked ids by id"
        );
        assert_eq!(r.top(99, 10), (0..10).collect::<Vec<_>>());
        assert_eq!(
            r.top(3, 8),
            vec![0, 3, 7],
            "ids beyond a smaller vocabulary are skipped"
        );
        assert_eq!(TokenRanking::id_order().top(3, 10), vec![0, 1, 2]);
    }

    #[test]
    fn bad_rankings_are_errors() {
        for text in [
            "vocab 10\n",
            "vocab x\nfingerprint 0x1\n",
            "vocab 10\nfingerprint zz\n",
            "vocab 10\nfingerprint 0x1\n3\n3\n",
            "vocab 10\nfingerprint 0x1\n10\n",
            "vocab 10\nfingerprint 0x1\nseven\n",
        ] {
            assert!(TokenRanking::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn a_vocabulary_gets_its_ranking_only_when_every_token_matches() {
        let (vocab, print, builtin) = TokenRanking::parse(SMOLLM2).unwrap();
        assert_eq!(vocab, 49152);
        assert!(builtin.ids.len() > 16384, "{}", builtin.ids.len());
        let other: Vec<String> = (0..vocab).map(|i| format!("t{i}")).collect();
        assert_ne!(fingerprint(&other), print);
        assert_eq!(TokenRanking::for_vocab(&other), TokenRanking::id_order());
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
    }
}
