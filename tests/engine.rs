//! The library: an [`amusd::Engine`] of each strategy writes the command line's tokens, streams
//! the text it returns, cancels on request, stops its workers when dropped, and says what went
//! wrong as a typed error.

use std::ops::ControlFlow;
use std::time::Duration;

use amusd::{Engine, EngineError, Finish, GenerateParams, Message, Strategy};
use amusd_e2e::{amusd_run, model_args, s, shm_entries_of, tiny_gguf, tiny_hf, workers_of};
use amusd_e2e::{GgmlDType, TinyModel};

fn untied(seed: u64) -> TinyModel {
    TinyModel {
        seed,
        tie_embeddings: false,
        ..TinyModel::default()
    }
}

fn params(max_new_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_new_tokens,
        ..GenerateParams::default()
    }
}

/// `amusd generate --strategy ar --raw --json`'s tokens for `prompt`.
fn cli_tokens(verify: &str, prompt: &str, max_new: usize) -> Vec<u32> {
    let max_new = max_new.to_string();
    let mut args = vec!["generate"];
    args.extend(model_args("ar", verify, verify));
    args.extend(["--prompt", prompt, "--raw", "--json"]);
    args.extend(["--max-new-tokens", &max_new]);
    let run = amusd_run(&args, Duration::from_secs(120));
    assert!(run.status.success(), "ar failed: {}", run.describe());
    run.tokens()
}

/// The only test here that starts workers: the region and worker checks read this process's.
#[test]
fn every_strategy_writes_the_command_lines_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let verify = tiny_hf(dir.path(), "verify", &untied(7));
    let draft = tiny_gguf(dir.path(), "draft.gguf", &untied(7), GgmlDType::Q8_0);
    let want = cli_tokens(s(&verify), "Once upon a time", 40);
    assert_eq!(want.len(), 40, "the tiny model stopped early: {want:?}");
    for strategy in [Strategy::Ar, Strategy::Sd, Strategy::Amusd] {
        let mut engine = Engine::builder()
            .strategy(strategy)
            .verify_model(s(&verify))
            .draft_model(s(&draft))
            // As in tests/tiny_models.rs: a tiny verify model would otherwise step before the
            // draft publishes anything, and nothing would be drafted.
            .option("--verify-wait-us", "1000000")
            .build()
            .unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
        assert_eq!(engine.strategy(), strategy);
        let mut streamed = String::new();
        let out = engine
            .complete_stream("Once upon a time", &params(40), |piece| {
                streamed.push_str(piece);
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(out.generation.tokens, want, "{strategy:?}");
        assert_eq!(out.generation.finish, Finish::Length, "{strategy:?}");
        assert_eq!(
            streamed, out.text,
            "{strategy:?}: streamed and returned text differ"
        );
        if strategy != Strategy::Ar {
            let m = &out.generation.metrics;
            assert!(
                m.accepted > 0,
                "{strategy:?} accepted no draft token: {m:?}"
            );
        }
        // A second request on the same engine: the models stay loaded.
        let again = engine.complete("Once upon a time", &params(8)).unwrap();
        assert_eq!(again.generation.tokens, want[..8], "{strategy:?}");
        drop(engine);
        let me = std::process::id();
        assert_eq!(
            shm_entries_of(me),
            Vec::<String>::new(),
            "region left behind"
        );
        assert_eq!(
            workers_of(me),
            Vec::<String>::new(),
            "workers outlived the engine"
        );
    }
}

#[test]
fn a_stream_that_breaks_cancels_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let verify = tiny_hf(dir.path(), "verify", &untied(7));
    // sd (in this process, no workers: see above) commits several tokens a step, the draft being
    // the verify model; the result ran past the Break with the rest of its batch.
    for strategy in [Strategy::Ar, Strategy::Sd] {
        let mut engine = Engine::builder()
            .strategy(strategy)
            .verify_model(s(&verify))
            .draft_model(s(&verify))
            .build()
            .unwrap();
        for after in [1, 3] {
            let (mut pieces, mut streamed) = (0, String::new());
            let out = engine
                .chat_stream(&[Message::user("hello")], &params(40), |piece: &str| {
                    streamed.push_str(piece);
                    pieces += 1;
                    match pieces == after {
                        true => ControlFlow::Break(()),
                        false => ControlFlow::Continue(()),
                    }
                })
                .unwrap();
            assert_eq!(out.generation.finish, Finish::Cancelled, "{strategy:?}");
            assert_eq!(pieces, after, "{strategy:?}: no piece after the Break");
            assert_eq!(out.text, streamed, "{strategy:?}, {after}: {out:?}");
        }
        let mut batches = 0;
        let g = engine
            .generate(&[1, 2, 3], &params(40), |_| {
                batches += 1;
                ControlFlow::Break(())
            })
            .unwrap();
        assert_eq!(batches, 1, "{strategy:?}");
        assert!(
            !g.tokens.is_empty() && g.tokens.len() < 40,
            "{strategy:?}: {g:?}"
        );
    }
}

#[test]
fn bad_options_and_requests_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let verify = tiny_hf(dir.path(), "verify", &untied(7));
    let build = |b: amusd::EngineBuilder| b.strategy(Strategy::Ar).build().err();
    let unknown = build(Engine::builder().option("--no-such-option", "1"));
    assert!(
        matches!(&unknown, Some(EngineError::Options(m)) if m.contains("--no-such-option")),
        "{unknown:?}"
    );
    let device = build(Engine::builder().option("--verify-device", "tpu:3"));
    assert!(
        matches!(device, Some(EngineError::Options(_))),
        "{device:?}"
    );
    // The draft's device is checked where a draft worker is bound to it: under amusd.
    let far_core = |b: amusd::EngineBuilder| {
        b.verify_model(s(&verify))
            .option("--draft-device", "cpu:4096")
    };
    assert!(build(far_core(Engine::builder())).is_none());
    let amusd = far_core(Engine::builder())
        .strategy(Strategy::Amusd)
        .build()
        .err();
    assert!(matches!(amusd, Some(EngineError::Options(_))), "{amusd:?}");
    let missing = dir.path().join("no-such-model.gguf");
    let absent = build(Engine::builder().verify_model(s(&missing)));
    assert!(matches!(absent, Some(EngineError::Load(_))), "{absent:?}");

    let mut engine = Engine::builder()
        .strategy(Strategy::Ar)
        .verify_model(s(&verify))
        .build()
        .unwrap();
    for max_new in [0, 10_000_000] {
        let e = engine.complete("hello", &params(max_new)).unwrap_err();
        assert!(matches!(e, EngineError::Request(_)), "{max_new}: {e:?}");
    }
    // A program's values come unchecked by the command line's parser: an id past the
    // vocabulary, a NaN temperature and a top-p of 0 failed in the workers (`Generate`, after
    // three restarts under amusd) before they were checked here.
    let vocab = TinyModel::default().vocab_size() as u32;
    let e = engine.generate(&[1, vocab], &params(4), |_| ControlFlow::Continue(()));
    assert!(
        matches!(&e, Err(EngineError::Request(m)) if m.to_string().contains("outside")),
        "{e:?}"
    );
    for (temperature, top_p) in [(f32::NAN, 1.0), (-1.0, 1.0), (0.8, 0.0)] {
        let mut p = params(4);
        (p.sampling.params.temperature, p.sampling.params.top_p) = (temperature, top_p);
        let e = engine.complete("hello", &p).unwrap_err();
        assert!(
            matches!(&e, EngineError::Request(m) if m.to_string().contains("bad sampling option")),
            "{temperature} {top_p}: {e:?}"
        );
    }
    // The engine still serves after refusing requests.
    let out = engine.complete("hello", &params(4)).unwrap();
    assert_eq!(out.generation.tokens.len(), 4);
}
