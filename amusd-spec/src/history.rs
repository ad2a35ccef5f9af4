//! N-gram history: what followed each short context (the last two or three tokens) in the
//! committed text of every request the drafter has served, kept across requests in a table of
//! fixed size. Where prompt lookup finds nothing in the request itself, the history's guesses for
//! the next tokens ride along in the draft model's forward ([`crate::Drafter::extend`]): a forward
//! of two positions costs the draft ~1.15x one, and a right guess yields two tokens from it.
//!
//! This is llama.cpp's dynamic n-gram cache (`lookup-dynamic`) in a bounded form. Only committed
//! tokens are learnt, so a rollback never has to undo anything; the table forgets by overwriting,
//! never grows, and costs one cache line per context length on a guess.

use crate::lookup::ngram_hash;

/// One context's entry: the follower with a majority vote over what followed it (Boyer-Moore's
/// streaming majority: a different follower takes a vote away, and replaces the entry when none
/// is left), so one odd continuation does not evict a habit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    /// The context hash's high half with the low bit set: 0 marks an empty slot.
    check: u32,
    token: u32,
    votes: u32,
}

/// A direct-mapped table from context (its hash) to its usual follower.
#[derive(Clone, Debug)]
pub struct NgramHistory {
    slots: Vec<Slot>,
}

impl NgramHistory {
    /// Context lengths, longest first: a guess comes from the longest context the table knows.
    /// One token alone is too weak a context: its guesses were right about a third of the time,
    /// against about half for two or three tokens (HumanEval, measured in the README).
    pub const CONTEXTS: [usize; 2] = [3, 2];
    /// The longest run proposed at once: each guess leans on the one before it, and a wrong run
    /// costs the draft model's forward its width.
    pub const MAX_RUN: usize = 3;
    /// 2^19 slots of 12 bytes, 6 MiB: a context per slot for some 260 000 tokens of text (two
    /// contexts each) before collisions start to overwrite older ones.
    pub const DEFAULT_SLOTS_LOG2: u32 = 19;
    /// Votes saturate here, so a habit that changes is unlearnt in a few occurrences.
    const MAX_VOTES: u32 = 4;

    pub fn new(slots_log2: u32) -> Self {
        Self {
            slots: vec![Slot::default(); 1 << slots_log2],
        }
    }

    fn locate(&self, context: &[u32]) -> (usize, u32) {
        let h = ngram_hash(context);
        let index = (h as usize) & (self.slots.len() - 1);
        (index, ((h >> 32) as u32) | 1)
    }

    /// Learns `tokens[from..]`, each after the contexts that end just before it.
    pub fn learn(&mut self, tokens: &[u32], from: usize) {
        for p in from.max(1)..tokens.len() {
            for n in Self::CONTEXTS {
                if let Some(context) = p.checked_sub(n).map(|s| &tokens[s..p]) {
                    self.observe(context, tokens[p]);
                }
            }
        }
    }

    fn observe(&mut self, context: &[u32], next: u32) {
        let (index, check) = self.locate(context);
        let slot = &mut self.slots[index];
        if slot.check == check && slot.token == next {
            slot.votes = (slot.votes + 1).min(Self::MAX_VOTES);
        } else if slot.check == check && slot.votes > 1 {
            slot.votes -= 1;
        } else {
            *slot = Slot {
                check,
                token: next,
                votes: 1,
            };
        }
    }

    /// The usual follower of the longest context ending `tokens` that the table knows.
    pub fn guess(&self, tokens: &[u32]) -> Option<u32> {
        Self::CONTEXTS.iter().find_map(|&n| {
            let context = &tokens[tokens.len().checked_sub(n)?..];
            let (index, check) = self.locate(context);
            let slot = self.slots[index];
            (slot.check == check).then_some(slot.token)
        })
    }

    /// Up to `max` tokens after `tokens`, each the guess after the ones before it, cut after the
    /// first stop token.
    pub fn propose(&self, tokens: &[u32], max: usize, stop_ids: &[u32]) -> Vec<u32> {
        let longest = Self::CONTEXTS[0];
        let mut text = tokens[tokens.len().saturating_sub(longest)..].to_vec();
        let mut run = Vec::with_capacity(max);
        while run.len() < max && !run.last().is_some_and(|t| stop_ids.contains(t)) {
            let Some(t) = self.guess(&text) else { break };
            run.push(t);
            text.push(t);
        }
        run
    }
}

impl Default for NgramHistory {
    fn default() -> Self {
        Self::new(Self::DEFAULT_SLOTS_LOG2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_what_followed_the_longest_known_context() {
        let mut h = NgramHistory::new(10);
        h.learn(&[1, 2, 3, 4, 9, 2, 3, 5], 0);
        // [1, 2, 3] was followed by 4; [2, 3] last by 5 (after 9), a majority of one each way.
        assert_eq!(h.guess(&[1, 2, 3]), Some(4));
        assert_eq!(h.guess(&[7, 2, 3]), Some(5));
        // One token is not context enough.
        assert_eq!(h.guess(&[7, 8, 3]), None);
        assert_eq!(h.guess(&[3]), None);
        assert_eq!(h.guess(&[]), None);
    }

    #[test]
    fn a_habit_outvotes_one_odd_follower() {
        let mut h = NgramHistory::new(10);
        h.learn(&[1, 2, 5, 1, 2, 5, 1, 2, 5, 1, 2, 6], 0);
        assert_eq!(h.guess(&[1, 2]), Some(5));
        // Enough of the new follower replaces it.
        h.learn(&[1, 2, 6, 1, 2, 6, 1, 2, 6, 1, 2, 6], 0);
        assert_eq!(h.guess(&[1, 2]), Some(6));
    }

    #[test]
    fn runs_chain_guesses_and_stop_at_a_stop_token() {
        let mut h = NgramHistory::new(10);
        h.learn(&[1, 2, 3, 4, 5, 6, 7], 0);
        assert_eq!(h.propose(&[9, 1, 2], 3, &[]), vec![3, 4, 5]);
        assert_eq!(h.propose(&[9, 1, 2], 8, &[]), vec![3, 4, 5, 6, 7]);
        assert_eq!(h.propose(&[9, 1, 2], 8, &[4]), vec![3, 4]);
        assert_eq!(h.propose(&[9, 1, 2], 0, &[]), Vec::<u32>::new());
        assert_eq!(h.propose(&[8, 9], 3, &[]), Vec::<u32>::new());
    }

    #[test]
    fn learning_from_an_offset_adds_only_the_new_tokens() {
        let mut whole = NgramHistory::new(8);
        let mut parts = NgramHistory::new(8);
        let text = [5, 6, 7, 5, 6, 8, 5, 6, 7];
        whole.learn(&text, 0);
        parts.learn(&text[..4], 0);
        parts.learn(&text, 4);
        assert_eq!(whole.slots, parts.slots);
    }
}
