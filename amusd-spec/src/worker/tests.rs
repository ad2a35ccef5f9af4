use super::*;
use crate::decoder::{Decoder, Drafter, Verifier};
use crate::fake::{FakeDecoder, FakeModel};
use crate::generate::autoregressive;
use crate::generate::{Generation, OnTokens};
use crate::logprobs::Logprobs;
use crate::policy::Finish;
use amusd_shm::{FinishReason as ShmFinish, RequestSpec};
use rand::{Rng, SeedableRng};
use std::ops::ControlFlow;
use std::sync::Arc;

/// Greedy half of the time, otherwise sampling with random filters and seed; the draft's
/// prompt lookup off for a quarter of the requests; the previous request's cache kept for
/// half of them.
fn random_sampling(rng: &mut rand::rngs::StdRng) -> crate::RequestSampling {
    let (no_draft_lookup, cache_prompt) = (rng.gen_bool(0.25), rng.gen_bool(0.5));
    let logprobs = rng
        .gen_bool(0.3)
        .then(|| rng.gen_range(0..=crate::logprobs::MAX_TOP));
    let prompt_logprobs = logprobs.is_some() && rng.gen_bool(0.5);
    let penalties = match rng.gen_bool(0.3) {
        true => crate::Penalties {
            repeat: rng.gen_range(0.8..1.5),
            frequency: rng.gen_range(-0.5..0.5),
            presence: rng.gen_range(-0.5..0.5),
            last_n: [8, 64, u32::MAX][rng.gen_range(0..3)],
        },
        false => crate::Penalties::OFF,
    };
    let logit_bias = match rng.gen_bool(0.3) {
        true => crate::LogitBias::new(
            (0..rng.gen_range(1..6))
                .map(|i| (i * 11 + rng.gen_range(0..11), rng.gen_range(-12.0..12.0))),
        )
        .unwrap(),
        false => crate::LogitBias::NONE,
    };
    let dry = match rng.gen_bool(0.3) {
        true => crate::Dry {
            multiplier: rng.gen_range(0.1..3.0),
            allowed_length: rng.gen_range(0..4),
            last_n: [u32::MAX, 20][rng.gen_range(0..2)],
            breakers: crate::Dry::breaker_bits((0..3).map(|_| rng.gen_range(0..64))),
            ..crate::Dry::OFF
        },
        false => crate::Dry::OFF,
    };
    // The fake grammar (crate::constraint::fake), ending with the fake models' eos, 0.
    let grammar = rng
        .gen_bool(0.3)
        .then(|| crate::constraint::fake::grammar(rng.gen_range(1..4), rng.gen_range(0..60), 0));
    if rng.gen_bool(0.5) {
        return crate::RequestSampling {
            params: crate::SamplingParams {
                penalties,
                logit_bias,
                dry,
                ..crate::SamplingParams::GREEDY
            },
            no_draft_lookup,
            cache_prompt,
            logprobs,
            prompt_logprobs,
            grammar,
            ..Default::default()
        };
    }
    crate::RequestSampling {
        params: crate::SamplingParams {
            temperature: [0.3, 0.7, 1.0, 1.5][rng.gen_range(0..4)],
            dynatemp_range: [0.0, 0.0, 0.5][rng.gen_range(0..3)],
            dynatemp_exponent: rng.gen_range(0.5..2.0),
            top_k: if rng.gen_bool(0.5) {
                0
            } else {
                rng.gen_range(1..30)
            },
            top_p: if rng.gen_bool(0.5) {
                1.0
            } else {
                rng.gen_range(0.3..1.0)
            },
            min_p: if rng.gen_bool(0.5) {
                0.0
            } else {
                rng.gen_range(0.0..0.3)
            },
            top_n_sigma: [0.0, 0.0, 1.0, 2.5][rng.gen_range(0..4)],
            typical_p: if rng.gen_bool(0.7) {
                1.0
            } else {
                rng.gen_range(0.2..1.0)
            },
            xtc_probability: if rng.gen_bool(0.7) {
                0.0
            } else {
                rng.gen_range(0.0..=1.0)
            },
            xtc_threshold: rng.gen_range(0.0..0.6),
            seed: rng.gen(),
            penalties,
            logit_bias,
            dry,
        },
        greedy_draft: rng.gen_bool(0.2),
        no_draft_lookup,
        cache_prompt,
        logprobs,
        prompt_logprobs,
        grammar,
    }
}

fn fake_constraints() -> Option<Arc<dyn crate::constraint::Constraints>> {
    Some(Arc::new(crate::constraint::fake::FakeConstraints))
}

/// The next request's prompt: random, or half of the time the previous prompt and answer
/// (cut at a random point, as a turn of conversation may re-tokenize differently) and a few
/// new tokens, so that the workers' prompt caches have a prefix to keep.
fn next_prompt(
    rng: &mut rand::rngs::StdRng,
    previous: &[u32],
    max_prompt: usize,
    vocab: u32,
) -> Vec<u32> {
    let mut prompt = if rng.gen_bool(0.5) && !previous.is_empty() {
        previous[..rng.gen_range(1..=previous.len())].to_vec()
    } else {
        Vec::new()
    };
    let plen = rng.gen_range(1..max_prompt);
    prompt.extend((0..plen).map(|_| rng.gen_range(0..vocab)));
    prompt
}

/// Both workers as threads over one in-process region, fake models, many requests with heavy
/// rollback and random limits: every committed sequence must equal autoregressive decoding.
fn run_protocol(requests: usize, seed: u64, us: u64) -> crate::Metrics {
    run_protocol_with(requests, seed, us, 40)
}

fn run_protocol_with(requests: usize, seed: u64, us: u64, max_prompt: usize) -> crate::Metrics {
    run_protocol_lookup(requests, seed, us, max_prompt, None)
}

/// How a protocol test drafts with prompt lookup: alone or ahead of the model, and whether
/// the text repeats itself (the fake models' `pos=0`).
#[derive(Clone, Copy)]
struct LookupSetup {
    alone: bool,
    repeating: bool,
    max_run: usize,
}

fn run_protocol_lookup(
    requests: usize,
    seed: u64,
    us: u64,
    max_prompt: usize,
    lookup: Option<LookupSetup>,
) -> crate::Metrics {
    let region: Arc<Region> = Arc::from(Region::new_boxed());
    let repeating = lookup.is_some_and(|l| l.repeating);
    let truth = FakeModel {
        seed,
        // Repeating text runs longer, so that it has time to repeat.
        eos_every: if repeating { 400 } else { 50 },
        us_per_token: us,
        positional: !repeating,
        // Small enough that text repeats soon, with errors breaking long runs.
        vocab: if repeating { 8 } else { 512 },
        err: if repeating { 0.03 } else { 0.0 },
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let err: f64 = rng.gen_range(0.0..0.9);
    let draft_model = FakeModel {
        err,
        us_per_token: us / 2,
        ..truth.clone()
    };
    let (max_lookahead, max_batch) = (rng.gen_range(1..12), rng.gen_range(1..12));
    let wait = Duration::from_micros(if rng.gen_bool(0.5) { 0 } else { 300 });
    let threads = {
        let (r1, r2) = (region.clone(), region.clone());
        let vt = truth.clone();
        [
            std::thread::spawn(move || {
                let decoder: Box<dyn Decoder> = match lookup {
                    Some(l) if l.alone => Box::new(crate::lookup::NoModel),
                    _ => Box::new(FakeDecoder::new(draft_model)),
                };
                let mut d = Drafter::new(decoder).with_constraints(fake_constraints());
                if let Some(l) = lookup {
                    // On repeating text a 3-token suffix decides what follows (the fake
                    // model's context): matches are right but where errors break them.
                    let min = if l.repeating { 3 } else { 2 };
                    let range = crate::lookup::NgramRange { min, max: 4 };
                    d = d.with_lookup(range, l.alone, l.max_run);
                    // Runs are checked whatever the fake forwards' sleeps measure.
                    d = d.with_forward_cost(crate::run_worth::ForwardCost::Fixed(0.25));
                    // The history learns across the requests, as in a worker.
                    d = d.with_history(crate::history::NgramHistory::new(12));
                }
                let opts = DraftOptions {
                    max_lookahead,
                    lookup: None,
                    lookup_max_run: 16,
                    history: false,
                    split_with: None,
                };
                run_draft(&r1, &mut d, &opts, None, &|| true).unwrap();
            }),
            std::thread::spawn(move || {
                let mut v =
                    Verifier::new(FakeDecoder::new(vt)).with_constraints(fake_constraints());
                let opts = VerifyOptions {
                    max_verify_batch: max_batch,
                    wait_for_draft: wait,
                    split: None,
                };
                run_verify(&r2, &mut v, &opts, &|| true).unwrap();
            }),
        ]
    };
    let mut reference = Verifier::new(FakeDecoder::new(FakeModel {
        us_per_token: 0,
        ..truth.clone()
    }))
    .with_constraints(fake_constraints());
    let mut total = crate::Metrics::default();
    let mut previous = Vec::new();
    for i in 0..requests {
        let prompt = next_prompt(&mut rng, &previous, max_prompt, truth.vocab);
        let stop = StopCriteria {
            stop_ids: vec![truth.eos],
            max_new_tokens: rng.gen_range(0..120),
        };
        let sampling = random_sampling(&mut rng);
        let want = autoregressive(&mut reference, &prompt, &stop, &sampling, &mut |_, _| {
            ControlFlow::Continue(())
        })
        .unwrap();
        let mut streamed = Vec::new();
        let got = run_request(
            &region,
            i as u64 + 1,
            &prompt,
            &stop,
            &sampling,
            &mut |t, _| {
                streamed.extend_from_slice(t);
                ControlFlow::Continue(())
            },
            &mut |_| Ok(ControlFlow::Continue(())),
        )
        .unwrap();
        assert_eq!(
            got.tokens, want.tokens,
            "request {i} (err {err}, lookahead {max_lookahead}, batch {max_batch})"
        );
        assert_eq!(streamed, want.tokens);
        assert_eq!(got.finish, want.finish);
        // Through the region, bit for bit ar's (one per token, when asked for).
        assert_eq!(got.logprobs, want.logprobs, "request {i}");
        assert_eq!(got.prompt_logprobs, want.prompt_logprobs, "request {i}");
        // A request that generates nothing runs no model.
        let scored =
            sampling.prompt_logprobs && sampling.logprobs.is_some() && stop.max_new_tokens > 0;
        assert_eq!(
            got.prompt_logprobs.len(),
            (prompt.len() - 1) * usize::from(scored)
        );
        let asked = sampling.logprobs.is_some();
        assert_eq!(got.logprobs.len(), got.tokens.len() * usize::from(asked));
        let m = &got.metrics;
        assert!(m.accepted_lookup <= m.proposed_lookup && m.accepted_lookup <= m.accepted);
        assert!(m.cached_prompt_tokens < prompt.len(), "request {i}: {m:?}");
        assert!(
            sampling.cache_prompt || m.cached_prompt_tokens == 0,
            "request {i}"
        );
        previous = [prompt, got.tokens.clone()].concat();
        if sampling.no_draft_lookup && lookup.is_some_and(|l| !l.alone) {
            assert_eq!(m.proposed_lookup, 0, "request {i} turned the lookup off");
        }
        total.proposed += m.proposed;
        total.accepted += m.accepted;
        total.proposed_lookup += m.proposed_lookup;
        total.accepted_lookup += m.accepted_lookup;
        total.new_tokens += m.new_tokens;
        total.verify_steps += m.verify_steps;
        total.cached_prompt_tokens += m.cached_prompt_tokens;
    }
    region.request_shutdown();
    for t in threads {
        t.join().unwrap();
    }
    total
}

/// Both workers, as threads, on a fake model slow enough (5 ms a token, a 64-position
/// prefill chunk ~85 ms) that the coordinator looks at a request long before its first
/// commit, and the first commit comes long before the budget is filled, however loaded the
/// machine.
struct SlowPair {
    region: Arc<Region>,
    truth: FakeModel,
    threads: [std::thread::JoinHandle<()>; 2],
}

impl SlowPair {
    fn start() -> Self {
        let region: Arc<Region> = Arc::from(Region::new_boxed());
        let truth = FakeModel {
            us_per_token: 5000,
            ..Default::default()
        };
        let (r1, r2, t1, t2) = (region.clone(), region.clone(), truth.clone(), truth.clone());
        let threads = [
            std::thread::spawn(move || {
                let mut d = Drafter::new(FakeDecoder::new(t1));
                let opts = DraftOptions {
                    max_lookahead: 4,
                    lookup: None,
                    lookup_max_run: 16,
                    history: false,
                    split_with: None,
                };
                run_draft(&r1, &mut d, &opts, None, &|| true).unwrap();
            }),
            std::thread::spawn(move || {
                let mut v = Verifier::new(FakeDecoder::new(t2));
                let opts = VerifyOptions {
                    max_verify_batch: 4,
                    wait_for_draft: Duration::ZERO,
                    split: None,
                };
                run_verify(&r2, &mut v, &opts, &|| true).unwrap();
            }),
        ];
        Self {
            region,
            truth,
            threads,
        }
    }

    /// Request `id`, greedy, with no stop token and a budget of `max_new_tokens`.
    fn run(
        &self,
        id: u64,
        prompt: &[u32],
        max_new_tokens: usize,
        on_tokens: &mut OnTokens<'_>,
        supervise: &mut dyn FnMut(&Region) -> Result<ControlFlow<()>, SpecError>,
    ) -> Generation {
        let stop = StopCriteria {
            stop_ids: Vec::new(),
            max_new_tokens,
        };
        let sampling = crate::RequestSampling::default();
        run_request(
            &self.region,
            id,
            prompt,
            &stop,
            &sampling,
            on_tokens,
            supervise,
        )
        .unwrap()
    }

    fn stop(self) {
        self.region.request_shutdown();
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

#[test]
fn a_cancelled_request_ends_and_the_next_one_is_served() {
    let pair = SlowPair::start();
    let mut go_on = |_: &Region| Ok(ControlFlow::Continue(()));
    let prompt = [5, 6, 7];
    let cancelled = pair.run(
        1,
        &prompt,
        200,
        &mut |_, _| ControlFlow::Break(()),
        &mut go_on,
    );
    assert_eq!(cancelled.finish, Finish::Cancelled);
    assert!(!cancelled.tokens.is_empty() && cancelled.tokens.len() < 200);
    assert_eq!(
        pair.region.read_request().unwrap().finish_reason,
        ShmFinish::Cancelled
    );
    let full = pair.run(
        2,
        &prompt,
        10,
        &mut |_, _| ControlFlow::Continue(()),
        &mut go_on,
    );
    assert_eq!(full.finish, Finish::Length);
    let n = full.tokens.len().min(cancelled.tokens.len());
    assert_eq!(full.tokens[..n], cancelled.tokens[..n]);
    pair.stop();
}

/// A request cancelled by `supervise` while its long prompt is prefilled (nothing committed
/// yet, so the token callback never runs) ends as cancelled with no token, the workers drop
/// it between prefill chunks, and the next request is served exactly.
#[test]
fn a_request_cancelled_during_its_prefill_ends_there() {
    let pair = SlowPair::start();
    let mut go_on = |_: &[u32], _: &[Logprobs]| ControlFlow::Continue(());
    // Sixteen chunks: the first supervision, 20 ms in, comes long before the first commit.
    let long: Vec<u32> = (0..16 * PREFILL_CHUNK as u32).map(|i| i % 50 + 3).collect();
    let mut cancel = |_: &Region| Ok(ControlFlow::Break(()));
    let cancelled = pair.run(1, &long, 8, &mut go_on, &mut cancel);
    assert_eq!(
        (cancelled.finish, cancelled.tokens.len()),
        (Finish::Cancelled, 0)
    );
    let prompt = [5, 6, 7];
    let stop = StopCriteria {
        stop_ids: Vec::new(),
        max_new_tokens: 8,
    };
    let mut reference = Verifier::new(FakeDecoder::new(pair.truth.clone()));
    let sampling = crate::RequestSampling::default();
    let want = autoregressive(&mut reference, &prompt, &stop, &sampling, &mut go_on).unwrap();
    let got = pair.run(2, &prompt, 8, &mut go_on, &mut |_| {
        Ok(ControlFlow::Continue(()))
    });
    assert_eq!(got.tokens, want.tokens);
    pair.stop();
}

/// Half of the prompts continue the previous request's (the protocol test's `next_prompt`),
/// and half of the requests keep the cached prefix: the verify worker then prefills only the
/// rest, and every request still commits exactly the autoregressive tokens.
#[test]
fn workers_commit_exactly_the_autoregressive_tokens() {
    let mut cached = 0;
    for seed in 0..8 {
        cached += run_protocol(150, seed, 0).cached_prompt_tokens;
    }
    assert!(cached > 1000, "only {cached} prompt tokens found cached");
}

#[test]
fn workers_with_prompt_lookup_commit_exactly_the_autoregressive_tokens() {
    for (k, seed) in (300..306).enumerate() {
        let setup = LookupSetup {
            alone: k % 2 == 0,
            repeating: k % 3 != 2,
            max_run: 4 + 6 * k,
        };
        let m = run_protocol_lookup(60, seed, 0, 40, Some(setup));
        if setup.alone {
            assert_eq!(m.proposed_lookup, m.proposed, "no model, no model tokens");
        }
    }
}

/// Text that repeats itself, broken by the verify model's errors: the lookup drafts long runs,
/// many right, some wrong part-way (long wrong runs), and the workers still commit exactly
/// the autoregressive tokens. Ahead of a model, the model checks each run first, so wrong ones
/// reach the verify worker only where the draft model errs with the lookup.
#[test]
fn workers_survive_long_wrong_lookup_runs() {
    for alone in [true, false] {
        let setup = LookupSetup {
            alone,
            repeating: true,
            max_run: 32,
        };
        let m = run_protocol_lookup(40, 400, 20, 40, Some(setup));
        let wasted = m.proposed_lookup - m.accepted_lookup;
        // Both kinds of run happened (how many of each depends on how far ahead the draft
        // thread got, which a loaded machine changes); exactness is checked inside.
        assert!(m.accepted_lookup > 0, "no accepted lookup tokens: {m:?}");
        assert!(!alone || wasted > 0, "no rejected lookup tokens: {m:?}");
    }
}

#[test]
fn long_prompts_prefilled_in_chunks_commit_exactly() {
    for seed in 200..203 {
        run_protocol_with(20, seed, 0, 4 * PREFILL_CHUNK);
    }
}

#[test]
fn a_coordinator_stalled_mid_update_is_waited_out() {
    let region = Region::new_boxed();
    region
        .submit_request(&RequestSpec {
            request_id: 3,
            prompt: &[1, 2, 3],
            max_new_tokens: 4,
            stop_tokens: &[],
            sampling: Default::default(),
        })
        .unwrap();
    let req = region.read_request().unwrap();
    // The coordinator descheduled inside a seqlock write: the word stays odd past the budget.
    let word = &region.control.request_word;
    word.fetch_add(1, std::sync::atomic::Ordering::Release);
    assert!(matches!(take_up(&region, &req), Ok(None)));
    word.fetch_add(1, std::sync::atomic::Ordering::Release);
    let held = take_up(&region, &req)
        .unwrap()
        .expect("taken up once stable");
    assert_eq!(held.committed, vec![1, 2, 3]);
}

#[test]
fn workers_commit_exactly_with_simulated_compute() {
    for seed in 100..103 {
        run_protocol(30, seed, 40);
    }
}
