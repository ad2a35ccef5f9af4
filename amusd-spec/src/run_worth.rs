//! How many guessed tokens (a prompt-lookup or n-gram-history run) one draft forward should check
//! beside the model's own next token: as many as raise the tokens a forward yields per unit of
//! its time, from the draft model's measured price of a row and how often it agreed with that
//! kind of guess lately.
//!
//! A run of `l` guesses widens the forward by `l` rows and yields the guesses the model agrees
//! with up to the first it refuses, plus the model's own token. Whether that beats one token a
//! forward depends on the core. On the AVX-512 VNNI Xeon the draft's integer kernels stay
//! memory-bound over a few rows (three rows cost ~1.35x one), so even a coin-flip guess pays; on
//! an AVX2 core (Zen 3) they are compute-bound from the second row (`CTX=200 ROWS=r fwd_probe`:
//! 1, 2, 3, 4, 8 rows 6.2, 9.2, 13.8, 16.8, 32.1 ms), so a row costs 0.57 of a forward and a
//! guess right half the time loses time. There, with runs checked at the gate's floor, amusd
//! ran HumanEval at 7.0 / 6.2 ms a token against 6.1 / 5.8 with the lookup off (10 samples,
//! 128 tokens, two rounds). So the price is measured, not assumed.

/// The draft model's forward time as `first + extra * (rows - 1)`, or a fixed relative price.
#[derive(Clone, Debug)]
pub enum ForwardCost {
    /// Fitted online to the forwards' wall times: `first` from one-row forwards, `extra` from
    /// wider ones, each a moving average. Unknown parts price a row at nothing, so runs are
    /// checked (and the price learnt) until a wider forward has been timed.
    Measured {
        first: Option<f64>,
        extra: Option<f64>,
    },
    /// A row beyond the first always costs this fraction of a one-row forward (tests, and
    /// decoders whose cost is known).
    Fixed(f64),
}

impl ForwardCost {
    /// A new measurement's weight in the moving averages: the price follows a machine that
    /// slows under the other worker's load within some tens of forwards, and one slow forward
    /// (a page fault, a preemption) moves it little.
    const WEIGHT: f64 = 0.125;

    pub fn measured() -> Self {
        Self::Measured {
            first: None,
            extra: None,
        }
    }

    /// A forward of `rows` rows took `secs`.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        let Self::Measured { first, extra } = self else {
            return;
        };
        let average = |old: &mut Option<f64>, new: f64| {
            *old = Some(old.map_or(new, |o| o + Self::WEIGHT * (new - o)));
        };
        match (rows, *first) {
            (0, _) => {}
            (1, _) => average(first, secs),
            // The first row's share is known only once a one-row forward was timed.
            (_, Some(f)) => average(extra, (secs - f).max(0.0) / (rows - 1) as f64),
            (_, None) => {}
        }
    }

    /// The price of one more row, as a fraction of a forward of `base` rows.
    pub fn extra_row(&self, base: usize) -> f64 {
        let base = base.max(1);
        match *self {
            Self::Fixed(e) => e / (1.0 + e * (base - 1) as f64),
            Self::Measured {
                first: Some(f),
                extra: Some(e),
            } if f > 0.0 => e / (f + e * (base - 1) as f64),
            Self::Measured { .. } => 0.0,
        }
    }
}

/// How often the draft model agreed with one kind of guess lately: counts of guesses it agreed
/// with and refused, both decaying, from the even prior of one each.
#[derive(Clone, Debug)]
pub struct Agreement {
    agreed: f64,
    refused: f64,
}

impl Default for Agreement {
    fn default() -> Self {
        Self {
            agreed: 1.0,
            refused: 1.0,
        }
    }
}

impl Agreement {
    /// Each observation keeps this much of the counts before it: some twenty guesses decide, so
    /// text that starts copying its context is noticed within a few runs.
    const KEEP: f64 = 0.95;

    pub fn observe(&mut self, agreed: bool) {
        self.agreed *= Self::KEEP;
        self.refused *= Self::KEEP;
        match agreed {
            true => self.agreed += 1.0,
            false => self.refused += 1.0,
        }
    }

    /// A run of `len` guesses was checked and the model agreed with its first `agreed`; the
    /// guesses after the first refusal were not tried.
    pub fn observe_run(&mut self, agreed: usize, len: usize) {
        for _ in 0..agreed.min(len) {
            self.observe(true);
        }
        if agreed < len {
            self.observe(false);
        }
    }

    /// The chance the model agrees with a guess, given that it agreed with those before it.
    pub fn rate(&self) -> f64 {
        self.agreed / (self.agreed + self.refused)
    }
}

/// The run length `l <= cap` with the most expected tokens per unit of forward time,
/// `(1 + p + ... + p^l) / (1 + extra * l)`: `p` the chance the model agrees with a guess after
/// agreeing with the ones before it, `extra` the price of a row as a fraction of the forward
/// without the run ([`ForwardCost::extra_row`]). Ties go to the shorter run.
pub fn worth_checking(cap: usize, p: f64, extra: f64) -> usize {
    let (mut best, mut best_rate) = (0, 1.0);
    let (mut tokens, mut chance) = (1.0, 1.0);
    for l in 1..=cap {
        chance *= p;
        tokens += chance;
        let rate = tokens / (1.0 + extra * l as f64);
        if rate > best_rate * (1.0 + 1e-9) {
            (best, best_rate) = (l, rate);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_coin_flip_guess_pays_only_where_rows_are_cheap() {
        // The AVX-512 Xeon's draft (three rows ~1.35x one) and the AVX2 core's (0.57 a row).
        assert_eq!(worth_checking(2, 0.5, 0.17), 2);
        assert_eq!(worth_checking(2, 0.5, 0.57), 0);
        // Text that copies its context: long runs pay on both.
        assert!((5..=7).contains(&worth_checking(8, 0.97, 0.57)));
        assert_eq!(worth_checking(8, 0.97, 0.17), 8);
        assert_eq!(worth_checking(8, 0.9, 0.57), 3);
        // A free row is worth any guess; nothing is worth a row that costs a forward.
        assert_eq!(worth_checking(5, 0.1, 0.0), 5);
        assert_eq!(worth_checking(5, 0.99, 1.0), 0);
        assert_eq!(worth_checking(0, 0.99, 0.0), 0);
    }

    #[test]
    fn the_price_of_a_row_is_learnt_from_timed_forwards() {
        let mut c = ForwardCost::measured();
        assert_eq!(c.extra_row(1), 0.0, "unknown: rows are tried");
        c.observe(4, 0.016);
        assert_eq!(
            c.extra_row(1),
            0.0,
            "no one-row forward to part it from yet"
        );
        for _ in 0..100 {
            c.observe(1, 0.006);
            c.observe(3, 0.013);
            c.observe(5, 0.020);
        }
        let e = c.extra_row(1);
        assert!((e - 0.0035 / 0.006).abs() < 0.01, "{e}");
        // Against a forward that already catches up two rows, a row is a smaller share.
        assert!((c.extra_row(3) - 0.0035 / 0.013).abs() < 0.01);
        let mut fixed = ForwardCost::Fixed(0.25);
        fixed.observe(1, 1.0);
        fixed.observe(9, 1.0);
        assert_eq!(fixed.extra_row(1), 0.25);
        assert_eq!(fixed.extra_row(5), 0.125);
    }

    #[test]
    fn agreement_follows_the_recent_guesses() {
        let mut a = Agreement::default();
        assert_eq!(a.rate(), 0.5);
        for _ in 0..40 {
            a.observe_run(3, 3);
        }
        assert!(a.rate() > 0.95, "{}", a.rate());
        for _ in 0..40 {
            a.observe_run(0, 4);
        }
        assert!(a.rate() < 0.2, "{}", a.rate());
        let mut b = Agreement::default();
        b.observe_run(2, 5);
        assert!(
            (b.rate() - 2.9 / 4.8).abs() < 0.05,
            "two agreed, one refused: {}",
            b.rate()
        );
    }
}
