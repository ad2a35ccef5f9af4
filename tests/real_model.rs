//! The real model, SmolLM2-135M-Instruct, through the CLI: it answers a simple question, and ar, sd
//! and amusd produce token-identical output on HumanEval and MT-Bench prompts, leaving nothing in
//! `/dev/shm`. Needs `scripts/fetch-assets.sh` (run by `scripts/test.sh`).

use std::io::Write;
use std::time::{Duration, Instant};

use amusd_e2e::{
    amusd_run, assert_cleaned_up, humaneval_prompts, mt_bench_prompts, require_default_model,
    shm_entries, Run,
};

const TIMEOUT: Duration = Duration::from_secs(300);

fn generate(strategy: &str, prompt: &str, max_new: usize) -> Run {
    generate_with(strategy, prompt, max_new, &[])
}

fn generate_with(strategy: &str, prompt: &str, max_new: usize, extra: &[&str]) -> Run {
    require_default_model();
    let max_new = max_new.to_string();
    let mut args = vec![
        "generate",
        "--strategy",
        strategy,
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_new,
        "--json",
    ];
    args.extend_from_slice(extra);
    let run = amusd_run(&args, TIMEOUT);
    assert!(
        run.status.success(),
        "{strategy} failed on {prompt:?}: {}",
        run.describe()
    );
    run
}

#[test]
fn answers_the_capital_of_france() {
    let run = generate("ar", "What is the capital of France?", 40);
    let out = run.json();
    let text = out["text"].as_str().expect("text in the JSON output");
    assert!(
        text.contains("Paris"),
        "the answer does not mention Paris: {text:?}\n{}",
        run.describe()
    );
    assert_eq!(out["strategy"], "ar");
}

/// A prompt piped to standard input is the prompt (the shell's trailing newline dropped), and
/// `generate` without `--strategy` runs amusd.
#[test]
fn a_piped_prompt_and_the_default_strategy() {
    require_default_model();
    let prompt = "What is the capital of France?";
    let mut child = amusd_e2e::amusd()
        .args(["generate", "--max-new-tokens", "16", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("amusd starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(format!("{prompt}\n").as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "piped prompt failed: {stderr}");
    let piped: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(piped["strategy"], "amusd", "{stderr}");
    assert_eq!(piped["tokens"], generate("ar", prompt, 16).json()["tokens"]);
}

/// A short answer through the real worker pair takes drafts into its verify steps and accepts
/// them, and its text equals `ar`'s. Whether the draft gets ahead on its own is a matter of speed
/// (its prefill is faster than the verify model's on an idle machine; `bench` measures it), so the
/// verify worker is told to wait for a draft token before stepping alone: on a loaded machine
/// (tests run side by side) the draft could otherwise lag the whole answer.
#[test]
fn a_short_amusd_answer_accepts_drafts() {
    let prompt = "Name three primary colors.";
    let amusd = generate_with("amusd", prompt, 48, &["--verify-wait-us", "2000000"]);
    let out = amusd.json();
    let m = &out["metrics"];
    let (drafted, accepted) = (m["proposed"].as_u64(), m["accepted"].as_u64());
    assert!(
        drafted > Some(0) && accepted > Some(0),
        "drafted {drafted:?}, accepted {accepted:?}\n{}",
        amusd.describe()
    );
    assert_eq!(out["tokens"], generate("ar", prompt, 48).json()["tokens"]);
}

#[test]
fn ar_sd_and_amusd_are_token_identical_on_humaneval_and_mt_bench() {
    const PER_DATASET: usize = 10;
    const MAX_NEW: usize = 64;
    require_default_model();
    let mut prompts: Vec<(String, String)> = humaneval_prompts(PER_DATASET)
        .into_iter()
        .enumerate()
        .map(|(i, p)| (format!("HumanEval/{i}"), p))
        .collect();
    prompts.extend(
        mt_bench_prompts(PER_DATASET)
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("MT-Bench #{i}"), p)),
    );
    assert_eq!(
        prompts.len(),
        2 * PER_DATASET,
        "the datasets have fewer prompts than expected"
    );

    let shm_before = shm_entries();
    let started = Instant::now();
    let (mut proposed, mut accepted) = ([0.0f64; 2], [0.0f64; 2]);
    // amusd runs whose prompt the draft worker helped prefill, of those long enough for it.
    let (mut split, mut long) = (0, 0);
    let mut total_new = 0;
    let mut pids = Vec::new();
    for (name, prompt) in &prompts {
        let runs: Vec<(&str, Run)> = ["ar", "sd", "amusd"]
            .into_iter()
            .map(|s| (s, generate(s, prompt, MAX_NEW)))
            .collect();
        pids.extend(runs.iter().map(|(_, r)| r.pid));
        let (_, ar) = &runs[0];
        let ar_json = ar.json();
        let expected = ar.tokens();
        assert!(!expected.is_empty(), "{name}: ar generated nothing");
        assert!(expected.len() <= MAX_NEW);
        total_new += expected.len();
        for (i, (strategy, run)) in runs.iter().enumerate().skip(1) {
            let json = run.json();
            let got = run.tokens();
            if got != expected {
                let first = amusd_e2e::first_difference(&got, &expected);
                panic!(
                    "{name}: {strategy} differs from ar at generated token {first} \
                     ({} vs {} tokens)\nprompt: {prompt:?}\nar: {expected:?}\n{strategy}: {got:?}\n\
                     ar text: {:?}\n{strategy} text: {:?}",
                    got.len(),
                    expected.len(),
                    ar_json["text"],
                    json["text"]
                );
            }
            assert_eq!(json["prompt_tokens"], ar_json["prompt_tokens"], "{name}");
            assert_eq!(json["finish_reason"], ar_json["finish_reason"], "{name}");
            proposed[i - 1] += json["metrics"]["proposed"].as_f64().unwrap_or(0.0);
            accepted[i - 1] += json["metrics"]["accepted"].as_f64().unwrap_or(0.0);
            if *strategy == "amusd" {
                assert_cleaned_up(run);
                let n = json["prompt_tokens"].as_u64().unwrap_or(0);
                long += usize::from(n >= 100);
                split += usize::from(n >= 100 && json["metrics"]["split_prompt_tokens"] != 0);
            }
        }
    }
    let elapsed = started.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "[real model] {} prompts x ar/sd/amusd, {total_new} tokens each, in {:.0} s; \
         acceptance sd {:.0}%, amusd {:.0}%",
        prompts.len(),
        elapsed.as_secs_f64(),
        100.0 * accepted[0] / proposed[0].max(1.0),
        100.0 * accepted[1] / proposed[1].max(1.0),
    );
    // The default pair shares its checkpoint, so the draft worker computes part of each long
    // prompt's prefill (a loaded CI machine may make it miss a few: the verify worker then
    // prefills alone).
    assert!(
        long > 0 && 2 * split >= long,
        "split prefills on {split} of {long} long prompts"
    );
    // The default draft (the stored q4_1 blocks, integer kernels) of the same model agrees with the f32 verify model most of the time; if nothing
    // were drafted or accepted, sd and amusd would trivially equal ar.
    for (i, strategy) in ["sd", "amusd"].iter().enumerate() {
        assert!(
            accepted[i] > 0.5 * proposed[i] && proposed[i] > 0.0,
            "{strategy}: {} of {} drafted tokens accepted",
            accepted[i],
            proposed[i]
        );
    }

    // New entries named after one of our coordinators (`amusd-<pid>-<hex>`); others may belong to
    // amusd runs outside this test.
    let shm_after = shm_entries();
    let leaked: Vec<_> = shm_after
        .difference(&shm_before)
        .filter(|n| pids.iter().any(|p| n.starts_with(&format!("amusd-{p}-"))))
        .collect();
    assert!(
        leaked.is_empty(),
        "these runs left amusd entries in /dev/shm: {leaked:?}"
    );
}

/// Prompt lookup, alone and ahead of the draft model, changes no token: on a request to re-type
/// code (where the lookup's drafts are accepted) and on a HumanEval prompt, ar = sd = amusd.
#[test]
fn prompt_lookup_alone_and_combined_is_token_identical() {
    const MAX_NEW: usize = 48;
    require_default_model();
    let code = "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n";
    let prompts = [
        format!(
            "Add a docstring to this function and show the whole function:\n```python\n{code}```"
        ),
        humaneval_prompts(1).remove(0),
    ];
    for (k, prompt) in prompts.iter().enumerate() {
        let expected = generate("ar", prompt, MAX_NEW).tokens();
        for strategy in ["sd", "amusd"] {
            for how in [
                &["--draft-model", "lookup:2-4"][..],
                // The split prefill off: the draft then starts drafting while the verify model
                // prefills, as this test's lookup counts assume; with it, the draft's first
                // drafts come with the verify model's first token, and under a loaded CI
                // machine the lookup's first run was once never offered (CI of 29b703d).
                &["--draft-lookup", "--no-split-prefill"][..],
            ] {
                let run = generate_with(strategy, prompt, MAX_NEW, how);
                let got = run.tokens();
                assert_eq!(
                    got,
                    expected,
                    "prompt {k}, {strategy} {how:?}: {}",
                    run.describe()
                );
                let m = &run.json()["metrics"];
                let n = |key: &str| m[key].as_u64().unwrap_or_else(|| panic!("no {key} in {m}"));
                assert!(n("accepted_lookup") <= n("proposed_lookup"), "{m}");
                if how[0] == "--draft-model" {
                    assert_eq!(n("proposed_model"), 0, "{strategy} {how:?}: {m}");
                    if k == 0 {
                        assert!(
                            n("accepted_lookup") >= 8,
                            "{strategy} {how:?}: the code is re-typed, the lookup should draft it: {m}"
                        );
                    }
                } else if k == 0 {
                    // Beside the draft model the lookup's runs are priced by timed forwards
                    // (`amusd_spec::run_worth`), so how many it checks depends on the core and its
                    // load; its first run is checked before any price is known.
                    assert!(
                        n("accepted_lookup") >= 1,
                        "{strategy} {how:?}: the code is re-typed, the lookup should draft some: {m}"
                    );
                }
            }
        }
    }
}

/// The default model's vocabulary has a built-in frequency ranking, so a draft's `head=N` keeps its
/// most frequent tokens (not its first ids), and such a draft changes no token of sd or amusd.
#[test]
fn a_draft_head_of_the_most_frequent_tokens_changes_no_token() {
    const MAX_NEW: usize = 48;
    let draft = format!("{}:stored:head=8192", require_default_model().display());
    let (model, name) = amusd_model::loader::load_weights(&draft.parse().unwrap()).unwrap();
    assert_eq!(model.lm_head.out_features(), 8192, "{name}");
    assert!(name.ends_with("head 8192 (most frequent)"), "{name}");
    drop(model);
    let prompt = humaneval_prompts(1).remove(0);
    let expected = generate("ar", &prompt, MAX_NEW).tokens();
    for strategy in ["sd", "amusd"] {
        let run = generate_with(strategy, &prompt, MAX_NEW, &["--draft-model", &draft]);
        assert_eq!(run.tokens(), expected, "{strategy}: {}", run.describe());
    }
}

/// A code prompt and a conversation, tokenized: what the agreement tests teacher-force.
fn agreement_texts(tokenizer: &amusd_model::tokenizer::Tokenizer) -> Vec<Vec<u32>> {
    let mut texts = humaneval_prompts(1);
    texts.extend(mt_bench_prompts(1));
    let encode = |t: &String| tokenizer.encode(t, false).unwrap();
    texts.iter().map(encode).collect()
}

/// `model`'s top token after each prefix of `tokens`, in one forward.
fn teacher_forced_argmax(model: &amusd_model::Llama, tokens: &[u32]) -> Vec<u32> {
    let mut cache = model.new_cache(tokens.len());
    let all = amusd_model::LogitsFor::All;
    model.forward(tokens, 0, &mut cache, all).unwrap().argmax()
}

/// The default draft screens its head (a q4_0 copy picks 32 candidates, the stored head scores
/// them): on a code prompt and a conversation, teacher-forced, its top token is the full head's
/// at (nearly) every position. Measured: 6144 of 6144 positions of prose and Python.
#[test]
fn the_screened_draft_head_proposes_what_the_full_head_does() {
    let path = require_default_model();
    let spec = |head: &str| format!("{}:stored:head={head}", path.display());
    let full = amusd_model::load(&spec("full").parse().unwrap()).unwrap();
    let (screened, name) = amusd_model::loader::load_weights(&spec("screen").parse().unwrap())
        .expect("screened draft");
    assert!(name.ends_with("head screened by q4_0 (top 32)"), "{name}");
    assert!(screened.matmul_cost().0 < full.llama.matmul_cost().0 * 9 / 10);
    let (mut same, mut total) = (0, 0);
    for tokens in agreement_texts(&full.tokenizer) {
        let argmax = |m| teacher_forced_argmax(m, &tokens);
        let (a, b) = (argmax(&full.llama), argmax(&screened));
        same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    assert!(total > 100, "only {total} positions");
    assert!(
        same * 100 >= total * 99,
        "{same} of {total} positions agree"
    );
}

/// How many positions of [`agreement_texts`] each draft's top token is the f32 verify model's,
/// teacher-forced, and of how many; the drafts are `PATH:SPEC` for each spec.
fn agreement_with_verify(specs: &[&str]) -> (Vec<usize>, usize, Vec<(amusd_model::Llama, String)>) {
    let path = require_default_model();
    let load = |spec: &&str| {
        let spec = format!("{}:{spec}", path.display()).parse().unwrap();
        amusd_model::loader::load_weights(&spec).unwrap()
    };
    let drafts: Vec<_> = specs.iter().map(load).collect();
    let verify = amusd_model::load(&format!("{}:f32", path.display()).parse().unwrap()).unwrap();
    let (mut agree, mut total) = (vec![0usize; specs.len()], 0);
    for tokens in agreement_texts(&verify.tokenizer) {
        let argmax = |m| teacher_forced_argmax(m, &tokens);
        let want = argmax(&verify.llama);
        for (n, (draft, _)) in agree.iter_mut().zip(&drafts) {
            *n += argmax(draft)
                .iter()
                .zip(&want)
                .filter(|(a, b)| a == b)
                .count();
        }
        total += want.len();
    }
    assert!(total > 100, "only {total} positions");
    (agree, total, drafts)
}

/// The coded draft (`stored-s8`, its q4_1 block scales coded to 8 bits): a tenth fewer bytes, and,
/// teacher-forced on a code prompt and a conversation, its top token is the f32 verify model's as
/// often as the stored draft's is (within a point).
#[test]
fn the_coded_draft_agrees_with_the_verify_model_as_the_stored_one_does() {
    let (agree, total, drafts) = agreement_with_verify(&["stored", "stored-s8"]);
    let ((stored, _), (coded, name)) = (&drafts[0], &drafts[1]);
    assert!(
        name.contains("q8_0"),
        "the embedding stays as stored: {name}"
    );
    assert!(coded.matmul_cost().0 * 100 < stored.matmul_cost().0 * 95);
    assert!(agree[0] * 100 >= total * 90, "stored: {agree:?} of {total}");
    assert!(
        agree[1] * 100 + total >= agree[0] * 100,
        "{agree:?} of {total}"
    );
}

/// 16-bit activations (`acts=16`, the default draft's: each activation row and its 8-bit
/// residual through the integer kernels) make the draft's top token the f32 verify model's at
/// (nearly) every position, where 8-bit ones miss a few in a hundred. Measured over 4,096
/// positions of English and Python: 99.9% against 96.1%.
#[test]
fn sixteen_bit_activations_make_the_draft_agree_with_the_verify_model() {
    let (agree, total, drafts) = agreement_with_verify(&["stored:acts=8", "stored:acts=16"]);
    assert!(
        drafts[1].1.contains("16-bit activations"),
        "{}",
        drafts[1].1
    );
    assert!(agree[1] * 100 >= total * 99, "16-bit: {agree:?} of {total}");
    assert!(agree[1] > agree[0], "{agree:?} of {total}");
}

/// `ar`, `sd` and `amusd` on prompt `k` with `flags`, each run's tokens checked equal to `ar`'s
/// (the first run).
fn identical_across_strategies(
    k: usize,
    prompt: &str,
    max_new: usize,
    flags: &[&str],
) -> Vec<(&'static str, Run)> {
    let runs: Vec<(&str, Run)> = ["ar", "sd", "amusd"]
        .into_iter()
        .map(|s| (s, generate_with(s, prompt, max_new, flags)))
        .collect();
    let expected = runs[0].1.tokens();
    for (strategy, run) in &runs[1..] {
        let got = run.tokens();
        assert_eq!(
            got,
            expected,
            "prompt {k} {flags:?}: {strategy} differs from ar at generated token {}\n{}",
            amusd_e2e::first_difference(&got, &expected),
            run.describe()
        );
    }
    runs
}

/// Sampling keeps the strategies identical: for each temperature the issue names, with and without
/// top-k / top-p / min-p / top-n-sigma / typical-p / XTC / dynamic temperature, several seeds, ar, sd and amusd produce the same tokens; the same seed
/// gives the same text again and another seed a different one.
#[test]
fn sampling_is_token_identical_across_strategies() {
    const MAX_NEW: usize = 32;
    require_default_model();
    let mut prompts = humaneval_prompts(2);
    prompts.extend(mt_bench_prompts(2));
    assert_eq!(
        prompts.len(),
        4,
        "the datasets have fewer prompts than expected"
    );
    let configs: [&[&str]; 4] = [
        &["--temperature", "0.3", "--seed", "1"],
        &[
            "--temperature",
            "0.7",
            "--seed",
            "2",
            "--top-k",
            "40",
            "--min-p",
            "0.05",
            "--typical",
            "0.9",
        ],
        &[
            "--temperature",
            "1.0",
            "--seed",
            "3",
            "--top-p",
            "0.9",
            "--xtc-probability",
            "0.5",
            "--top-n-sigma",
            "2",
        ],
        &[
            "--temperature",
            "1.5",
            "--seed",
            "4",
            "--dynatemp-range",
            "0.5",
        ],
    ];
    let (mut proposed, mut accepted, mut differs_from_greedy) = (0.0, 0.0, 0);
    for (k, prompt) in prompts.iter().enumerate() {
        for flags in configs {
            let runs = identical_across_strategies(k, prompt, MAX_NEW, flags);
            let expected = runs[0].1.tokens();
            assert!(
                !expected.is_empty(),
                "prompt {k} {flags:?}: ar generated nothing"
            );
            for (strategy, run) in &runs[1..] {
                let m = &run.json()["metrics"];
                proposed += m["proposed"].as_f64().unwrap_or(0.0);
                accepted += m["accepted"].as_f64().unwrap_or(0.0);
                if *strategy == "amusd" {
                    assert_cleaned_up(run);
                }
            }
            let seed = flags[3].parse::<u64>().unwrap();
            assert_eq!(runs[0].1.json()["sampling"]["seed"], seed);
            if k == 0 {
                differs_from_greedy +=
                    usize::from(expected != generate("ar", prompt, MAX_NEW).tokens());
            }
        }
    }
    assert!(
        accepted > 0.3 * proposed && proposed > 0.0,
        "{accepted} of {proposed} drafted tokens accepted while sampling"
    );
    assert!(
        differs_from_greedy >= 2,
        "sampling gave the greedy text {} times of 4",
        4 - differs_from_greedy
    );

    // The same seed twice: the same text; another seed: another text.
    let prompt = &prompts[2];
    let at = |seed: &str| {
        generate_with(
            "ar",
            prompt,
            MAX_NEW,
            &["--temperature", "1.0", "--seed", seed],
        )
        .tokens()
    };
    let first = at("11");
    assert_eq!(at("11"), first, "the same seed gave another text");
    assert_ne!(at("12"), first, "another seed gave the same text");
}

/// Repetition penalties and DRY keep the strategies identical, greedy and sampled: each row of a
/// verify step is penalized by the tokens before it, the draft's alike. They change the text
/// (else this test could not tell them ignored).
#[test]
fn penalties_are_token_identical_across_strategies() {
    const MAX_NEW: usize = 48;
    require_default_model();
    let mut prompts = humaneval_prompts(1);
    prompts.extend(mt_bench_prompts(1));
    let configs: [&[&str]; 3] = [
        &["--repeat-penalty", "1.3", "--repeat-last-n", "-1"],
        &["--dry-multiplier", "0.8", "--dry-allowed-length", "1"],
        &[
            "--temperature",
            "0.7",
            "--seed",
            "5",
            "--frequency-penalty",
            "0.8",
            "--presence-penalty",
            "0.5",
        ],
    ];
    let mut changed = 0;
    for (k, prompt) in prompts.iter().enumerate() {
        for flags in configs {
            let expected = identical_across_strategies(k, prompt, MAX_NEW, flags)[0]
                .1
                .tokens();
            let unpenalized: Vec<&str> = flags
                .chunks(2)
                .filter(|f| {
                    !f[0].contains("penalty")
                        && f[0] != "--repeat-last-n"
                        && !f[0].starts_with("--dry")
                })
                .flatten()
                .copied()
                .collect();
            changed += usize::from(
                expected != generate_with("ar", prompt, MAX_NEW, &unpenalized).tokens(),
            );
        }
    }
    assert!(changed >= 3, "the penalties changed {changed} of 6 texts");
}

/// A logit bias keeps the strategies identical, greedy and sampled: every row of a verify step is
/// biased as `ar` biases its one, the draft's alike. Banning the unbiased answer's first token
/// (`-inf`) keeps it out of the whole answer, so the bias cannot have gone unapplied.
#[test]
fn a_logit_bias_is_token_identical_across_strategies() {
    const MAX_NEW: usize = 32;
    require_default_model();
    let prompt = &humaneval_prompts(1)[0];
    let plain = generate_with("ar", prompt, MAX_NEW, &[]).tokens();
    let (ban, boost) = (format!("{}-inf", plain[0]), format!("{}+2.5", plain[2]));
    let configs: [&[&str]; 2] = [
        &["--logit-bias", &ban, "--logit-bias", &boost],
        &["--temperature", "0.7", "--seed", "3", "--logit-bias", &ban],
    ];
    for flags in configs {
        let biased = identical_across_strategies(0, prompt, MAX_NEW, flags)[0]
            .1
            .tokens();
        assert!(
            !biased.contains(&plain[0]),
            "{flags:?}: the banned token {} is in {biased:?}",
            plain[0]
        );
    }
}

/// Structured output: under a JSON schema every strategy commits the same tokens, greedy and
/// sampled, and the text is JSON that fits the schema, ended by the model once it is complete; a
/// regular expression pins the text to its alternatives.
#[test]
fn a_grammar_is_followed_identically_across_strategies() {
    const MAX_NEW: usize = 64;
    require_default_model();
    let prompt = "Describe France as JSON.";
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
        "capital": {"type": "string", "maxLength": 16}, "rank": {"type": "integer",
        "minimum": 1, "maximum": 999}}, "required": ["name", "capital", "rank"],
        "additionalProperties": false}"#;
    for flags in [
        &["--json-schema", schema][..],
        &[
            "--json-schema",
            schema,
            "--temperature",
            "0.9",
            "--seed",
            "5",
        ],
    ] {
        let runs = identical_across_strategies(0, prompt, MAX_NEW, flags);
        let out = runs[0].1.json();
        assert_eq!(out["finish_reason"], "stop", "{flags:?}: {out}");
        let text = out["text"].as_str().unwrap();
        let value: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("{flags:?}: not JSON ({e}): {text}"));
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["name", "capital", "rank"],
            "the schema's order: {text}"
        );
        assert!(
            value["name"].as_str().unwrap().chars().count() <= 16,
            "{text}"
        );
        assert!(
            (1..=999).contains(&value["rank"].as_i64().unwrap()),
            "{text}"
        );
    }
    let runs = identical_across_strategies(0, prompt, 16, &["--regex", "(Yes|No), (red|blue)\\."]);
    let text = runs[0].1.json()["text"].as_str().unwrap().to_string();
    assert!(
        ["Yes, red.", "Yes, blue.", "No, red.", "No, blue."].contains(&text.as_str()),
        "{text:?}"
    );
    // llama.cpp's GBNF, character by character: three lines of lowercase words.
    let gbnf = "root ::= item{3}\nitem ::= \"- \" [a-z]+ (\" \" [a-z]+){0,3} \"\\n\"\n";
    let runs = identical_across_strategies(0, "Name three fruits.", 40, &["--grammar", gbnf]);
    let out = runs[0].1.json();
    let text = out["text"].as_str().unwrap();
    assert_eq!(out["finish_reason"], "stop", "{text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text:?}");
    for l in lines {
        let words = l.strip_prefix("- ").unwrap_or_else(|| panic!("{text:?}"));
        assert!(
            words
                .split(' ')
                .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())),
            "{text:?}"
        );
    }
}

/// Log-probabilities are the verify model's, so every strategy reports the same numbers (to the
/// bit: the JSON of an f32 is exact); each is its token's, at most 0, with the most likely tokens
/// best first, and under greedy decoding the token is the most likely one.
#[test]
fn logprobs_are_identical_across_strategies() {
    const MAX_NEW: usize = 24;
    require_default_model();
    let prompt = &mt_bench_prompts(1)[0];
    for flags in [
        &["--logprobs", "3"][..],
        &["--logprobs", "2", "--temperature", "0.8", "--seed", "9"],
    ] {
        let runs = identical_across_strategies(0, prompt, MAX_NEW, flags);
        let ar = runs[0].1.json()["logprobs"].clone();
        for (strategy, run) in &runs[1..] {
            assert_eq!(run.json()["logprobs"], ar, "{strategy} {flags:?}");
        }
        let rows = ar.as_array().expect("no logprobs in the JSON output");
        assert_eq!(rows.len(), runs[0].1.tokens().len());
        for (row, token) in rows.iter().zip(runs[0].1.tokens()) {
            assert_eq!(row["token"], token, "{row}");
            let top: Vec<f64> = (row["top"].as_array().unwrap().iter())
                .map(|t| t["logprob"].as_f64().unwrap())
                .collect();
            assert!(
                top.windows(2).all(|w| w[0] >= w[1]) && top[0] <= 0.0,
                "{row}"
            );
            let lp = row["logprob"].as_f64().unwrap();
            assert!(lp <= top[0], "{row}");
            if flags.len() == 2 {
                assert_eq!(row["top"][0]["token"], token, "greedy: {row}");
            }
        }
    }
}

/// The prompt's log-probabilities (`--prompt-logprobs`, OpenAI's `echo`) are the verify model's
/// too: every strategy reports the same numbers, one per prompt token after the first, each
/// that token's; the generated tokens are unchanged.
#[test]
fn prompt_logprobs_are_identical_across_strategies() {
    const MAX_NEW: usize = 8;
    require_default_model();
    let prompt = &humaneval_prompts(1)[0];
    let plain = generate_with("ar", prompt, MAX_NEW, &[]).tokens();
    let runs = identical_across_strategies(
        0,
        prompt,
        MAX_NEW,
        &["--logprobs", "2", "--prompt-logprobs"],
    );
    let ar = runs[0].1.json();
    assert_eq!(
        runs[0].1.tokens(),
        plain,
        "scoring the prompt changed the answer"
    );
    for (strategy, run) in &runs[1..] {
        assert_eq!(
            run.json()["prompt_logprobs"],
            ar["prompt_logprobs"],
            "{strategy}"
        );
    }
    let rows = ar["prompt_logprobs"]
        .as_array()
        .expect("no prompt_logprobs");
    let prompt_tokens = ar["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(rows.len(), prompt_tokens - 1);
    for row in rows {
        let lp = row["logprob"].as_f64().unwrap();
        let top = row["top"][0]["logprob"].as_f64().unwrap();
        assert!(lp <= top && top <= 0.0, "{row}");
    }
}

/// With a temperature and no seed, a random seed is chosen and reported, so the run can be repeated.
#[test]
fn a_random_seed_is_reported_and_repeats_the_run() {
    let prompt = "Name three colours.";
    let run = generate_with("ar", prompt, 16, &["--temperature", "1.0"]);
    let seed = run.json()["sampling"]["seed"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seed in the JSON output: {}", run.describe()));
    let again = generate_with(
        "ar",
        prompt,
        16,
        &["--temperature", "1.0", "--seed", &seed.to_string()],
    );
    assert_eq!(again.tokens(), run.tokens());
    let text = amusd_run(
        &[
            "generate",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
            "--temperature",
            "1.0",
        ],
        TIMEOUT,
    );
    assert!(text.status.success(), "{}", text.describe());
    assert!(
        text.stderr.contains(", seed "),
        "the summary does not print the seed: {}",
        text.describe()
    );
}

/// Fault tolerance on the real model, in the suite (scripts/fault-test.sh runs many more): seeded
/// SIGKILLs and SIGSTOPs of either worker mid-request change no token.
#[test]
fn chaos_on_the_real_model_changes_no_token() {
    const PROMPT: &str = "Write a Python function that returns the n-th Fibonacci number.";
    let want = generate("ar", PROMPT, 96).tokens();
    require_default_model();
    let run = amusd_run(
        &[
            "generate",
            "--strategy",
            "amusd",
            "--prompt",
            PROMPT,
            "--max-new-tokens",
            "96",
            "--json",
            "--chaos",
            "7",
            "--chaos-signal",
            "mixed",
            "--chaos-faults",
            "3",
            "--chaos-rate",
            "0.3",
            "--hang-timeout-ms",
            "2000",
        ],
        TIMEOUT,
    );
    let got = run.tokens();
    assert_eq!(
        got,
        want,
        "first difference at {}\n{}",
        amusd_e2e::first_difference(&got, &want),
        run.describe()
    );
    let injected: u32 = run
        .stderr
        .split("faults injected ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fault summary\n{}", run.describe()));
    assert!(injected >= 2, "only {injected} faults: {}", run.describe());
    assert_cleaned_up(&run);
}

/// Workers killed and stopped at random while they split long prompts' prefills (the draft
/// worker computing the verify model's first positions, the verify worker waiting for them)
/// change no token.
#[test]
fn chaos_during_split_prefills_changes_no_token() {
    const MAX_NEW: usize = 24;
    require_default_model();
    let prompt = &humaneval_prompts(1)[0];
    let want = generate("ar", prompt, MAX_NEW).tokens();
    let max_new = MAX_NEW.to_string();
    for seed in ["3", "5"] {
        let run = amusd_run(
            &[
                "generate",
                "--strategy",
                "amusd",
                "--prompt",
                prompt,
                "--max-new-tokens",
                &max_new,
                "--json",
                "--chaos",
                seed,
                "--chaos-signal",
                "mixed",
                "--chaos-faults",
                "3",
                "--chaos-rate",
                "0.5",
                "--hang-timeout-ms",
                "2000",
            ],
            TIMEOUT,
        );
        let got = run.tokens();
        assert_eq!(got, want, "seed {seed}\n{}", run.describe());
        assert_cleaned_up(&run);
    }
}

/// A prompt past what the region's KV exchange holds of every block at once (1,092 positions of
/// SmolLM2-135M) is still split, through a ring of fewer blocks, and changes no token.
#[test]
fn a_prompt_past_the_exchange_is_split_through_a_ring_and_changes_no_token() {
    const MAX_NEW: usize = 8;
    require_default_model();
    let prompt = humaneval_prompts(10).join("\n\n");
    let ar = generate("ar", &prompt, MAX_NEW);
    let n = ar.json()["prompt_tokens"].as_u64().unwrap();
    assert!(
        n > 1_200,
        "the prompt is too short to need the ring: {n} tokens"
    );
    // A loaded machine can make the verify worker give a split up (it then prefills alone):
    // three tries to see one.
    let mut split = 0;
    for _ in 0..3 {
        let run = generate("amusd", &prompt, MAX_NEW);
        assert_eq!(run.tokens(), ar.tokens(), "{}", run.describe());
        split = run.json()["metrics"]["split_prompt_tokens"]
            .as_u64()
            .unwrap_or(0);
        if split > 0 {
            break;
        }
    }
    assert!(
        split > n / 3,
        "{split} of {n} positions prefilled by the draft worker"
    );
}

/// A stream cut in the middle of a character still prints its last bytes (as U+FFFD, as `decode`
/// renders them): the printed text is the whole decoded text, not a prefix that lost its tail.
#[test]
fn a_stream_cut_mid_character_prints_its_tail() {
    let model = require_default_model();
    let prompt = "Write 'good morning' in Japanese, Chinese and Korean.";
    let full = generate("ar", prompt, 48).json();
    let tokens = amusd_e2e::tokens_of(&full);
    let spec = format!("{}:f32", model.display());
    let text = amusd_model::loader::load_text(&spec.parse().unwrap()).unwrap();
    let decode = |n: usize| text.tokenizer.decode(&tokens[..n], true).unwrap();
    let cut = (1..=tokens.len())
        .find(|&n| decode(n).ends_with('\u{FFFD}'))
        .unwrap_or_else(|| panic!("no prefix of {:?} ends mid-character", decode(tokens.len())));
    let max_new = cut.to_string();
    let args = [
        "generate",
        "--strategy",
        "ar",
        "--prompt",
        prompt,
        "--max-new-tokens",
        &max_new,
    ];
    let run = amusd_run(&args, TIMEOUT);
    assert!(run.status.success(), "{}", run.describe());
    assert_eq!(
        run.stdout,
        format!("{}\n", decode(cut)),
        "{}",
        run.describe()
    );
}

/// `amusd chat` on piped input: each line is a turn, the replies stream to stdout one per line,
/// the second turn finds the first one's prompt cached, and `ar` and `amusd` write the same
/// conversation, whose first reply is `generate`'s for that prompt.
#[test]
fn chat_turns_are_exact_and_reuse_the_cache() {
    require_default_model();
    // The second message spans two lines (`\\` goes on to the next); a line that is not UTF-8
    // is said and skipped (it ended the chat).
    let input = b"What is the capital of France?\n\xff Latin-1\n/help\nAnd \\\nof Italy?\n";
    let chat = |strategy: &str| {
        let mut child = start_chat(&["--strategy", strategy, "--max-new-tokens", "12"]);
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, input).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert!(out.status.success(), "{strategy}: {stdout}\n{stderr}");
        (stdout, stderr)
    };
    let (amusd_out, amusd_err) = chat("amusd");
    let (ar_out, _) = chat("ar");
    assert_eq!(
        amusd_out, ar_out,
        "the conversation differs between strategies"
    );
    let first = generate("amusd", "What is the capital of France?", 12).json()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        amusd_out.starts_with(&format!("{first}\n")),
        "{amusd_out:?} vs {first:?}"
    );
    let stats: Vec<&str> = amusd_err.lines().filter(|l| l.starts_with('[')).collect();
    assert_eq!(stats.len(), 2, "{amusd_err}");
    assert!(stats[0].contains("(0 of "), "{}", stats[0]);
    assert!(
        !stats[1].contains("(0 of "),
        "turn 2 cached nothing: {}",
        stats[1]
    );
    assert!(
        amusd_err.contains("/reset"),
        "/help said nothing: {amusd_err}"
    );
    assert!(amusd_err.contains("not UTF-8 was skipped"), "{amusd_err}");
}

/// Ctrl-C while `amusd chat` waits for the next message ends it at once: exit 130, workers
/// stopped, region removed.
#[test]
fn ctrl_c_ends_a_chat_waiting_for_input() {
    use std::io::BufRead;
    require_default_model();
    let mut child = start_chat(&["--max-new-tokens", "8", "--quiet"]);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Hi\n").unwrap();
    stdin.flush().unwrap();
    let (tx, replies) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The reply's end: the chat now waits for the next line (stdin stays open).
    replies.recv_timeout(TIMEOUT).expect("no reply");
    let pid = child.id();
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "chat ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    assert_eq!(status.code(), Some(130));
    assert!(
        amusd_e2e::shm_entries_of(pid).is_empty(),
        "region left behind"
    );
    amusd_e2e::wait_until("the workers to exit", Duration::from_secs(10), || {
        amusd_e2e::workers_of(pid).is_empty()
    });
}

/// `amusd chat ARGS...` with its standard streams piped.
fn start_chat(args: &[&str]) -> std::process::Child {
    amusd_e2e::amusd()
        .arg("chat")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot start amusd chat")
}
