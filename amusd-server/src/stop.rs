//! `stop` strings on decoded text, streamed: the output ends before the first stop string to be
//! completed. A tail that could still start one is held back, so what is emitted piece by piece is
//! exactly what the whole text gives, however it was cut into pieces.

/// Stop-string matching over a stream of text pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not emitted: it could be the start of a stop string.
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
            stopped: false,
        }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds a piece of text; returns the text now safe to emit. Once a stop string completes,
    /// [`stopped`](Self::stopped) is true and everything after it is dropped.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.push_str(piece);
        if let Some(start) = self.first_completed() {
            self.stopped = true;
            let out = self.pending[..start].to_string();
            self.pending.clear();
            return out;
        }
        let keep = self.held_back_start();
        let out = self.pending[..keep].to_string();
        self.pending.drain(..keep);
        out
    }

    /// The end of the text: whatever was held back is emitted.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Where the stop string that ends first in `pending` starts (the longest on a tie).
    fn first_completed(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i + s.len(), i)))
            .min_by_key(|&(end, start)| (end, start))
            .map(|(_, start)| start)
    }

    /// The start of the longest suffix of `pending` that is a proper prefix of a stop string (a
    /// character boundary, since stop strings are whole strings); `pending.len()` if none.
    fn held_back_start(&self) -> usize {
        self.pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: the whole text cut before the stop string that ends first.
    fn cut(text: &str, stops: &[&str]) -> (String, bool) {
        let mut best: Option<(usize, usize)> = None;
        for s in stops.iter().filter(|s| !s.is_empty()) {
            if let Some(i) = text.find(s) {
                let key = (i + s.len(), i);
                best = Some(best.map_or(key, |b| b.min(key)));
            }
        }
        match best {
            Some((_, start)) => (text[..start].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    fn streamed(pieces: &[&str], stops: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out.push_str(&m.push(p));
        }
        if !m.stopped() {
            out.push_str(&m.finish());
        }
        (out, m.stopped())
    }

    #[test]
    fn cuts_before_a_stop_string_split_over_pieces() {
        assert_eq!(
            streamed(&["Hello ", "wo", "rld", "!"], &["world"]),
            ("Hello ".into(), true)
        );
        assert_eq!(
            streamed(&["no stop ", "here"], &["xyz"]),
            ("no stop here".into(), false)
        );
        // A held-back prefix that turns out not to be a stop string is emitted.
        assert_eq!(
            streamed(&["a wor", "m"], &["world"]),
            ("a worm".into(), false)
        );
    }

    #[test]
    fn holds_back_a_possible_start_and_never_splits_a_character() {
        let stops = vec!["é!".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("caf"), "caf");
        assert_eq!(m.push("é"), "", "é could start the stop string");
        assert_eq!(m.push(" ok"), "é ok");
        assert_eq!(m.push("é"), "");
        assert_eq!(m.push("!"), "");
        assert!(m.stopped());
    }

    #[test]
    fn the_stop_string_completed_first_wins() {
        // "b" is complete at "ab", before "abc" could be: the output ends before "b".
        assert_eq!(
            streamed(&["a", "b", "c"], &["abc", "b"]),
            ("a".into(), true)
        );
        assert_eq!(cut("abc", &["abc", "b"]), ("a".into(), true));
    }

    /// Any cut of a text into pieces gives the reference result.
    #[test]
    fn streaming_equals_the_whole_text_for_every_split() {
        let texts = [
            "the end. THE END",
            "aaab",
            "héllo wörld",
            "xxSTOPxx",
            "ST",
            "",
        ];
        let stop_sets: [&[&str]; 4] = [&["STOP"], &["aab", "b"], &["ö", "END"], &["", "x"]];
        for text in texts {
            let chars: Vec<(usize, char)> = text.char_indices().collect();
            for stops in stop_sets {
                // Every split into two or three pieces at character boundaries.
                for a in 0..=chars.len() {
                    for b in a..=chars.len() {
                        let at = |k: usize| chars.get(k).map_or(text.len(), |c| c.0);
                        let pieces = [&text[..at(a)], &text[at(a)..at(b)], &text[at(b)..]];
                        assert_eq!(
                            streamed(&pieces, stops),
                            cut(text, stops),
                            "{text:?} split {pieces:?}, stops {stops:?}"
                        );
                    }
                }
            }
        }
    }
}
