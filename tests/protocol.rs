//! The AMUSD protocol through the real binaries, with fake models: whatever the draft's error rate,
//! speed and the lookahead/batch limits, `amusd` commits exactly the tokens that greedy
//! autoregressive decoding with the verify model gives.

use std::time::Duration;

use amusd_e2e::{amusd_run, assert_cleaned_up};
use amusd_spec::fake::{FakeDecoder, FakeModel};
use amusd_spec::generate::autoregressive;
use amusd_spec::{StopCriteria, Verifier};

const MAX_NEW: usize = 200;

/// One amusd run with fake models.
struct Case {
    seed: u64,
    vocab: u32,
    /// 0: no end-of-sequence token, the run goes to `MAX_NEW`.
    eos_every: u64,
    err: f64,
    draft_us: u64,
    verify_us: u64,
    max_lookahead: usize,
    max_verify_batch: usize,
    prompt: Vec<u32>,
    /// The fake models' `pos=0`: text that repeats itself, prompt lookup's best case.
    repeating: bool,
}

impl Case {
    fn verify_spec(&self) -> String {
        format!(
            "fake:vocab={},seed={},eos_every={},us={},pos={}{}",
            self.vocab,
            self.seed,
            self.eos_every,
            self.verify_us,
            u8::from(!self.repeating),
            // Repeating text with a few breaks, where long lookup runs go wrong part-way.
            if self.repeating { ",err=0.03" } else { "" }
        )
    }

    fn draft_spec(&self) -> String {
        format!(
            "fake:vocab={},seed={},eos_every={},err={},us={},pos={}",
            self.vocab,
            self.seed,
            self.eos_every,
            self.err,
            self.draft_us,
            u8::from(!self.repeating)
        )
    }

    /// What greedy decoding with the verify model gives: the tokens and the finish reason.
    fn expected(&self) -> (Vec<u32>, &'static str) {
        let truth = FakeModel::parse(&self.verify_spec()).unwrap();
        let stop = StopCriteria {
            stop_ids: if truth.eos_every > 0 {
                vec![truth.eos]
            } else {
                Vec::new()
            },
            max_new_tokens: MAX_NEW,
        };
        let mut v = Verifier::new(FakeDecoder::new(truth.clone()));
        let g = autoregressive(
            &mut v,
            &self.prompt,
            &stop,
            &Default::default(),
            &mut |_, _| std::ops::ControlFlow::Continue(()),
        )
        .unwrap();

        // The same by hand from the model's definition, so a bug shared by `autoregressive` and the
        // workers cannot hide.
        let mut ctx = self.prompt.clone();
        let mut by_hand = Vec::new();
        let mut finish = "length";
        while by_hand.len() < MAX_NEW {
            let t = truth.next(&ctx);
            if truth.eos_every > 0 && t == truth.eos {
                finish = "stop";
                break;
            }
            ctx.push(t);
            by_hand.push(t);
        }
        assert_eq!(
            g.tokens, by_hand,
            "autoregressive disagrees with FakeModel::next"
        );
        (by_hand, finish)
    }

    /// Runs the case and checks the tokens; returns the run's metrics.
    fn check(&self, name: &str) -> serde_json::Value {
        self.check_with(name, None, &[])
    }

    /// [`check`](Self::check) with another draft spec (`lookup:...`) or more options.
    fn check_with(&self, name: &str, draft: Option<&str>, extra: &[&str]) -> serde_json::Value {
        let (expected, finish) = self.expected();
        let prompt_ids: Vec<String> = self.prompt.iter().map(|t| t.to_string()).collect();
        let verify = self.verify_spec();
        let draft = draft.map_or_else(|| self.draft_spec(), str::to_string);
        let lookahead = self.max_lookahead.to_string();
        let batch = self.max_verify_batch.to_string();
        let max_new = MAX_NEW.to_string();
        let prompt_ids = prompt_ids.join(",");
        let mut args = vec![
            "generate",
            "--strategy",
            "amusd",
            "--verify-model",
            &verify,
            "--draft-model",
            &draft,
            "--prompt-ids",
            &prompt_ids,
            "--max-new-tokens",
            &max_new,
            "--max-lookahead",
            &lookahead,
            "--max-verify-batch",
            &batch,
            "--json",
        ];
        args.extend_from_slice(extra);
        let run = amusd_run(&args, Duration::from_secs(120));
        let out = run.json();
        let got = amusd_e2e::tokens_of(&out);
        if got != expected {
            let first = amusd_e2e::first_difference(&got, &expected);
            panic!(
                "{name}: amusd committed {} tokens, greedy gives {}; first difference at {first}\n\
                 verify {verify}, draft {draft}, max-lookahead {lookahead}, max-verify-batch {batch}\n\
                 got      {got:?}\nexpected {expected:?}\n{}",
                got.len(),
                expected.len(),
                run.describe()
            );
        }
        assert_eq!(
            out["finish_reason"],
            finish,
            "{name}: finish reason: {}",
            run.describe()
        );
        assert_cleaned_up(&run);
        out["metrics"].clone()
    }

    /// Checks the case and that the draft worker drafted; returns (drafted, proposed to
    /// verification).
    fn check_drafted(&self, name: &str) -> (u64, u64) {
        let m = self.check(name);
        let n = |k: &str| {
            m[k].as_u64()
                .unwrap_or_else(|| panic!("{name}: no {k} in {m}"))
        };
        let (drafted, proposed) = (n("draft_forwards"), n("proposed"));
        assert!(
            drafted > 0,
            "{name}: the draft worker drafted nothing ({m})"
        );
        (drafted, proposed)
    }
}

fn prompt(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    (0..len as u64)
        .map(|i| ((seed.wrapping_mul(31).wrapping_add(i * 7919) ^ 0x55) % vocab as u64) as u32)
        .collect()
}

#[test]
fn amusd_equals_greedy_across_seeds_error_rates_and_limits() {
    // (seed, eos_every, draft error rate, max lookahead, max verify batch, prompt length)
    let grid: [(u64, u64, f64, usize, usize, usize); 10] = [
        (1, 0, 0.0, 8, 16, 3),
        (2, 0, 0.1, 1, 1, 1),
        (3, 0, 0.2, 2, 16, 5),
        (4, 0, 0.3, 16, 4, 12),
        (5, 0, 0.4, 4, 2, 2),
        (6, 300, 0.5, 32, 32, 7),
        (7, 0, 0.6, 3, 8, 30),
        (8, 0, 0.7, 8, 3, 4),
        (9, 0, 0.8, 12, 1, 9),
        (10, 60, 0.3, 6, 6, 3),
    ];
    let mut proposed = 0;
    for (i, &(seed, eos_every, err, la, batch, plen)) in grid.iter().enumerate() {
        let vocab = [512, 97, 32000][i % 3];
        let case = Case {
            seed,
            vocab,
            eos_every,
            err,
            draft_us: [0, 50, 200][i % 3],
            verify_us: [100, 0, 300][i % 3],
            max_lookahead: la,
            max_verify_batch: batch,
            prompt: prompt(seed, plen, vocab),
            repeating: false,
        };
        let name = format!("run {i} (seed {seed}, err {err}, lookahead {la}, batch {batch})");
        // With an instant verify model the request may end before the draft worker is scheduled;
        // a verify model that takes time leaves it room to draft.
        if case.verify_us > 0 {
            proposed += case.check_drafted(&name).1;
        } else {
            case.check(&name);
        }
    }
    // Whether a draft token is still valid when the verify worker looks depends on timing; over
    // the grid, some must have been.
    assert!(
        proposed > 0,
        "no draft token was ever proposed to verification"
    );
}

#[test]
fn slow_draft() {
    Case {
        seed: 21,
        vocab: 512,
        eos_every: 0,
        err: 0.2,
        draft_us: 2000,
        verify_us: 200,
        max_lookahead: 8,
        max_verify_batch: 16,
        prompt: vec![1, 2, 3],
        repeating: false,
    }
    .check_drafted("slow draft");
}

#[test]
fn slow_verify() {
    let (_, proposed) = Case {
        seed: 22,
        vocab: 512,
        eos_every: 0,
        err: 0.2,
        draft_us: 0,
        verify_us: 2000,
        max_lookahead: 8,
        max_verify_batch: 16,
        prompt: vec![1, 2, 3],
        repeating: false,
    }
    .check_drafted("slow verify");
    assert!(
        proposed > 0,
        "slow verify: no draft token was proposed to verification"
    );
}

/// Prompt lookup through the binaries: drafting alone (`--draft-model lookup:3-4`, the draft
/// worker loads no model) and ahead of the model (`--draft-lookup`), on text that repeats itself
/// with the verify model's errors breaking long runs, and on text that does not. Every run commits
/// exactly the greedy tokens; on repeating text the lookup's tokens are proposed and accepted.
#[test]
fn prompt_lookup_alone_and_ahead_of_the_model() {
    for (i, repeating) in [true, false].into_iter().enumerate() {
        let case = Case {
            seed: 31 + i as u64,
            vocab: if repeating { 8 } else { 512 },
            eos_every: 0,
            err: 0.05,
            draft_us: 100,
            // A verify step slow next to a lookup (which takes microseconds), so that the draft
            // is there when the verify worker looks, however loaded the machine.
            verify_us: 2000,
            max_lookahead: 8,
            max_verify_batch: 16,
            prompt: prompt(31, 12, if repeating { 8 } else { 512 }),
            repeating,
        };
        for (how, draft, extra) in [
            // Suffixes of 3 or 4 tokens: the fake model's next token depends on the last 3.
            ("alone", Some("lookup:3-4"), &[][..]),
            (
                "ahead of the model",
                None,
                &["--draft-lookup=3-4", "--lookup-max-run", "24"][..],
            ),
        ] {
            let name = format!("lookup {how}, repeating {repeating}");
            let m = case.check_with(&name, draft, extra);
            let n = |k: &str| {
                m[k].as_u64()
                    .unwrap_or_else(|| panic!("{name}: no {k} in {m}"))
            };
            assert!(n("accepted_lookup") <= n("proposed_lookup"), "{name}: {m}");
            if draft.is_some() {
                assert_eq!(
                    n("proposed_model"),
                    0,
                    "{name}: no model, no model tokens: {m}"
                );
            }
            if repeating {
                // Not all of it: the verify model's errors are copied by later lookups too, and
                // ahead of the model the lookup drafts only after a streak of right guesses.
                let share = if draft.is_some() { 3 } else { 5 };
                assert!(
                    n("accepted_lookup") * share > MAX_NEW as u64,
                    "{name}: 1/{share} of the tokens should come from the lookup: {m}"
                );
                eprintln!("{name}: {m}");
            }
        }
    }
}
