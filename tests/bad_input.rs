//! Bad input gets one clear line on stderr, `amusd: error: ...`, and a non-zero exit: no panic, no
//! backtrace, no hint to set RUST_BACKTRACE. Each case writes what amusd said to the test's stderr
//! (past the harness's capture), so `cargo test` shows the messages.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use amusd_e2e::{amusd_run, assert_cleaned_up, s, tiny_gguf, tiny_hf, GgmlDType, TinyModel};

/// Tiny models for the cases (a Hugging Face directory and a GGUF of the same weights), in a
/// temporary directory removed when this is dropped.
struct Fixtures {
    _dir: tempfile::TempDir,
    hf: PathBuf,
    gguf: PathBuf,
}

fn fixtures() -> Fixtures {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny_hf(dir.path(), "tiny-hf", &TinyModel::default());
    let gguf = tiny_gguf(
        dir.path(),
        "model.gguf",
        &TinyModel::default(),
        GgmlDType::F32,
    );
    Fixtures {
        _dir: dir,
        hf,
        gguf,
    }
}

/// A fresh scratch directory for one case's files.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Runs `amusd generate ARGS`, checks it fails with exactly one `amusd: error:` line that mentions
/// every one of `mentions` (case-insensitive), and returns that line.
fn expect_error(case: &str, args: &[&str], mentions: &[&str]) -> String {
    let mut full = vec!["generate"];
    full.extend_from_slice(args);
    let run = amusd_run(&full, Duration::from_secs(120));
    // Long arguments (the 600-word prompt) abbreviated.
    let shown = full
        .iter()
        .map(|a| match a.char_indices().nth(60) {
            Some((i, _)) => format!("'{}...' ({} chars)", &a[..i], a.chars().count()),
            None => a.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let _ = writeln!(
        std::io::stderr(),
        "[bad input] {case}\n  args: {shown}\n  exit: {:?}\n  stderr: {}",
        run.status.code(),
        run.stderr.trim_end().replace('\n', "\n          ")
    );
    let ctx = || format!("case '{case}', args {}:\n{}", shown, run.describe());
    assert!(
        run.status.code().is_some_and(|c| c != 0),
        "expected a non-zero exit code, not a signal or success; {}",
        ctx()
    );
    for bad in ["panicked", "RUST_BACKTRACE", "backtrace", "stack backtrace"] {
        assert!(
            !run.stderr.contains(bad),
            "stderr mentions '{bad}'; {}",
            ctx()
        );
    }
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line on stderr; {}",
        ctx()
    );
    let line = lines[0];
    assert!(
        line.starts_with("amusd: error: "),
        "the line does not start with 'amusd: error: '; {}",
        ctx()
    );
    let lower = line.to_lowercase();
    for m in mentions {
        assert!(
            lower.contains(&m.to_lowercase()),
            "the error does not mention '{m}'; {}",
            ctx()
        );
    }
    assert!(
        run.stdout.trim().is_empty(),
        "nothing should reach stdout on an error; {}",
        ctx()
    );
    assert_cleaned_up(&run);
    line.to_string()
}

const STRATEGIES: [&str; 3] = ["ar", "sd", "amusd"];

/// [`expect_error`] under each of `strategies` with the given models and further arguments.
fn expect_error_per_strategy(
    case: &str,
    strategies: &[&str],
    (verify, draft): (&str, &str),
    rest: &[&str],
    mentions: &[&str],
) {
    for strategy in strategies {
        let mut args = amusd_e2e::model_args(strategy, verify, draft);
        args.extend_from_slice(rest);
        expect_error(&format!("{case}, {strategy}"), &args, mentions);
    }
}

/// The model cases with the spec as the verify model, for every strategy, and as the draft model of
/// sd and amusd (with a good verify model).
fn expect_model_error(case: &str, spec: &str, mentions: &[&str]) {
    let f = fixtures();
    let good = s(&f.hf);
    let rest = ["--prompt", "hello", "--max-new-tokens", "4"];
    expect_error_per_strategy(
        &format!("{case}: verify model"),
        &STRATEGIES,
        (spec, good),
        &rest,
        mentions,
    );
    expect_error_per_strategy(
        &format!("{case}: draft model"),
        &["sd", "amusd"],
        (good, spec),
        &rest,
        mentions,
    );
}

#[test]
fn missing_model_path() {
    let dir = scratch();
    let missing = dir.path().join("no-such-model.gguf");
    expect_model_error("missing model path", s(&missing), &[s(&missing)]);
}

#[test]
fn directory_that_is_not_a_model() {
    let dir = scratch();
    let not_model = dir.path().join("just-a-directory");
    std::fs::create_dir(&not_model).unwrap();
    std::fs::write(not_model.join("notes.txt"), "not a model").unwrap();
    expect_model_error(
        "directory that is not a model",
        s(&not_model),
        &[s(&not_model)],
    );
}

#[test]
fn random_bytes_named_gguf() {
    let dir = scratch();
    let path = dir.path().join("x.gguf");
    // Deterministic noise that does not start with the GGUF magic.
    let mut state = 0x2545f4914f6cdd1du64;
    let bytes: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    assert_ne!(&bytes[..4], b"GGUF");
    std::fs::write(&path, bytes).unwrap();
    expect_model_error("random bytes named x.gguf", s(&path), &["x.gguf"]);
}

#[test]
fn gguf_truncated_in_its_tensor_data() {
    let dir = scratch();
    let full = std::fs::read(&fixtures().gguf).unwrap();
    let path = dir.path().join("truncated.gguf");
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    expect_model_error(
        "GGUF truncated in the middle of its tensor data",
        s(&path),
        &["truncated.gguf"],
    );
}

#[test]
fn gguf_with_bad_magic() {
    let dir = scratch();
    let mut bytes = std::fs::read(&fixtures().gguf).unwrap();
    assert_eq!(&bytes[..4], b"GGUF");
    bytes[..4].copy_from_slice(b"GGUX");
    let path = dir.path().join("badmagic.gguf");
    std::fs::write(&path, bytes).unwrap();
    expect_model_error("GGUF with bad magic", s(&path), &["badmagic.gguf"]);
}

#[test]
fn unknown_weight_format() {
    let f = fixtures();
    let spec = format!("{}:q9_9", s(&f.gguf));
    expect_model_error("unknown weight format", &spec, &["q9_9"]);
}

#[test]
fn restricted_head_on_the_verify_model() {
    let f = fixtures();
    for head in ["128", "screen", "screen:8"] {
        let verify = format!("{}:f32:head={head}", s(&f.gguf));
        for strategy in ["ar", "amusd"] {
            expect_error(
                &format!("head={head} on the verify model"),
                &[
                    "--verify-model",
                    &verify,
                    "--strategy",
                    strategy,
                    "--prompt",
                    "hi",
                ],
                &["--verify-model", "head=screen", "whole vocabulary"],
            );
        }
    }
    for head in ["0", "screen:0", "sceen"] {
        let bad = format!("{}:head={head}", s(&f.gguf));
        expect_model_error("a bad head", &bad, &[&format!("bad head '{head}'")]);
    }
}

fn expect_device_error(case: &str, flag: &str, device: &str, mentions: &[&str]) {
    let f = fixtures();
    let model = s(&f.gguf);
    let strategies: &[&str] = if flag == "--draft-device" {
        &["amusd"]
    } else {
        &STRATEGIES
    };
    for strategy in strategies {
        expect_error(
            &format!("{case}: {flag} {device}, {strategy}"),
            &[
                "--strategy",
                strategy,
                "--verify-model",
                model,
                "--draft-model",
                model,
                flag,
                device,
                "--prompt",
                "hello",
                "--max-new-tokens",
                "4",
            ],
            mentions,
        );
    }
}

#[test]
fn unknown_device() {
    expect_device_error("unknown device", "--verify-device", "gpu:0", &["gpu:0"]);
    expect_device_error("unknown device", "--draft-device", "gpu:0", &["gpu:0"]);
}

#[test]
fn core_that_does_not_exist() {
    expect_device_error("missing core", "--verify-device", "cpu:999", &["999"]);
    expect_device_error("missing core", "--draft-device", "cpu:999", &["999"]);
}

#[test]
fn cuda_on_a_cpu_build() {
    expect_device_error(
        "cuda on a CPU build",
        "--verify-device",
        "cuda:0",
        &["cuda"],
    );
    expect_device_error("cuda on a CPU build", "--draft-device", "cuda:0", &["cuda"]);
}

#[test]
fn empty_prompt() {
    let f = fixtures();
    let model = s(&f.hf);
    for prompt in ["", "   "] {
        expect_error_per_strategy(
            &format!("empty prompt {prompt:?}"),
            &STRATEGIES,
            (model, model),
            &["--prompt", prompt],
            &["prompt", "empty"],
        );
    }
}

#[test]
fn prompt_file_with_invalid_utf8() {
    let dir = scratch();
    let path = dir.path().join("latin1-prompt.txt");
    // "café" in Latin-1: the é is the lone byte 0xE9.
    std::fs::write(&path, b"caf\xe9 au lait").unwrap();
    let f = fixtures();
    let model = s(&f.hf);
    expect_error_per_strategy(
        "prompt file with invalid UTF-8",
        &STRATEGIES,
        (model, model),
        &["--prompt-file", s(&path)],
        &["latin1-prompt.txt", "UTF-8"],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let words: Vec<String> = (0..600).map(|i| format!("word{i}")).collect();
    let prompt = words.join(" ");
    let f = fixtures();
    let model = s(&f.hf);
    expect_error_per_strategy(
        "600-word prompt, context 512",
        &STRATEGIES,
        (model, model),
        &["--raw", "--prompt", &prompt, "--max-new-tokens", "16"],
        &["512"],
    );
}

#[test]
fn draft_and_verify_embeddings_of_different_sizes_are_refused() {
    // The same tokenizer, one embedding padded: passed the vocabulary check, then the verify
    // worker failed on a padded id the draft proposed (and was restarted until it gave up).
    let dir = scratch();
    let plain = tiny_hf(dir.path(), "plain", &TinyModel::default());
    let padded = TinyModel {
        padded_rows: 64,
        ..TinyModel::default()
    };
    let padded = tiny_hf(dir.path(), "padded", &padded);
    expect_pair_refused(
        "padded vocabulary",
        (&plain, &padded),
        &["embedding has", "259", "323", "rows"],
    );
}

/// Both strategies with a draft refuse the pair `models` either way round, saying `mentions`.
fn expect_pair_refused(case: &str, (a, b): (&Path, &Path), mentions: &[&str]) {
    for strategy in ["sd", "amusd"] {
        for (verify, draft) in [(a, b), (b, a)] {
            expect_error(
                &format!(
                    "{case}, verify {}, draft {}, {strategy}",
                    name(verify),
                    name(draft)
                ),
                &[
                    "--strategy",
                    strategy,
                    "--verify-model",
                    s(verify),
                    "--draft-model",
                    s(draft),
                    "--prompt",
                    "hello",
                    "--max-new-tokens",
                    "4",
                ],
                mentions,
            );
        }
    }
}

#[test]
fn an_unknown_pre_tokenizer_is_warned_about() {
    // The tokenizer approximates it (GPT-2's split); nothing said so before.
    let dir = scratch();
    for (pre, warned) in [("gpt2", false), ("some-new-model", true)] {
        let tiny = TinyModel {
            pre_tokenizer: pre,
            ..TinyModel::default()
        };
        let model = tiny_gguf(dir.path(), pre, &tiny, GgmlDType::F32);
        let args = ["generate", "--strategy", "ar", "--verify-model", s(&model)];
        let run = amusd_run(
            &[
                &args[..],
                &["--raw", "--prompt", "hi", "--max-new-tokens", "2"],
            ]
            .concat(),
            Duration::from_secs(60),
        );
        assert!(run.status.success(), "{pre}: {}", run.describe());
        let said = run.stderr.contains("warning") && run.stderr.contains("pre-tokenizer");
        assert_eq!(said, warned, "{pre}: {}", run.describe());
    }
}

fn vocab_fixtures() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = scratch();
    let a = tiny_hf(dir.path(), "vocab-a", &TinyModel::default());
    let b = tiny_hf(
        dir.path(),
        "vocab-b",
        &TinyModel {
            extra_vocab: 5,
            ..TinyModel::default()
        },
    );
    (dir, a, b)
}

#[test]
fn draft_and_verify_vocabularies_differ() {
    let (_dir, a, b) = vocab_fixtures();
    expect_pair_refused(
        "vocabulary mismatch",
        (&a, &b),
        &["vocabulary", "259", "264"],
    );
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// A copy of the tiny Hugging Face checkpoint in `dir/name`, its `config.json` passed through `edit`.
fn edited_hf_copy(dir: &Path, name: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let f = fixtures();
    let to = dir.join(name);
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&f.hf).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let config = to.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, edit(text)).unwrap();
    to
}

/// Overwrites `bytes[at..at + new.len()]`, checking that `old` was there.
fn patch(bytes: &mut [u8], at: usize, old: &[u8], new: &[u8]) {
    assert_eq!(&bytes[at..at + old.len()], old, "fixture layout changed");
    bytes[at..at + new.len()].copy_from_slice(new);
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the fixture", String::from_utf8_lossy(needle)))
}

#[test]
fn unsupported_architecture() {
    let dir = scratch();
    let hf = edited_hf_copy(dir.path(), "gpt2-hf", |c| {
        c.replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\"")
    });
    expect_model_error(
        "HF checkpoint of another architecture",
        s(&hf),
        &["GPT2LMHeadModel"],
    );

    // GGUF metadata value: key, type 8 (string), u64 length 5, "llama".
    let mut bytes = std::fs::read(&fixtures().gguf).unwrap();
    let key = b"general.architecture";
    let value = find(&bytes, key) + key.len() + 4 + 8;
    patch(&mut bytes, value, b"llama", b"qwen2");
    let path = dir.path().join("qwen2.gguf");
    std::fs::write(&path, bytes).unwrap();
    expect_model_error("GGUF of another architecture", s(&path), &["qwen2"]);
}

#[test]
fn unsupported_tensor_types() {
    let dir = scratch();
    // Integer weights: the safetensors header's first "F32" becomes "I32" (same size, valid file).
    let hf = edited_hf_copy(dir.path(), "int-hf", |c| c);
    let st = hf.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let at = find(&bytes, b"\"dtype\":\"F32\"") + b"\"dtype\":\"".len();
    patch(&mut bytes, at, b"F32", b"I32");
    std::fs::write(&st, bytes).unwrap();
    expect_model_error("safetensors with an I32 weight", s(&hf), &["I32", "f32"]);

    // A GGUF tensor of type 99: tensor info is name, u32 n_dims, n_dims u64 dims, u32 type.
    let mut bytes = std::fs::read(&fixtures().gguf).unwrap();
    let name = b"token_embd.weight";
    let dims_at = find(&bytes, name) + name.len();
    let n_dims = u32::from_le_bytes(bytes[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    let type_at = dims_at + 4 + 8 * n_dims;
    patch(
        &mut bytes,
        type_at,
        &0u32.to_le_bytes(),
        &99u32.to_le_bytes(),
    );
    let path = dir.path().join("type99.gguf");
    std::fs::write(&path, bytes).unwrap();
    expect_model_error(
        "GGUF tensor of type 99",
        s(&path),
        &["type99.gguf", "GGML type 99"],
    );
}

#[test]
fn max_new_tokens_zero_or_past_the_context() {
    let f = fixtures();
    let model = s(&f.hf);
    expect_error_per_strategy(
        "--max-new-tokens 0",
        &STRATEGIES,
        (model, model),
        &["--prompt", "hello", "--max-new-tokens", "0"],
        &["--max-new-tokens", "at least 1"],
    );
    expect_error_per_strategy(
        "--max-new-tokens 100000000",
        &STRATEGIES,
        (model, model),
        &["--prompt", "hello", "--max-new-tokens", "100000000"],
        &["--max-new-tokens", "context"],
    );
}

#[test]
fn worker_started_by_hand_with_wrong_arguments() {
    for worker in ["amusd-draft-worker", "amusd-verify-worker"] {
        let cases: [(&str, &[&str], &[&str]); 3] = [
            ("no arguments", &[], &["--region", "--model"]),
            (
                "a region that does not exist",
                &["--region", "/amusd-no-such-region", "--model", "x.gguf"],
                &["/amusd-no-such-region", "coordinator"],
            ),
            (
                "an unknown device",
                &[
                    "--region", "/amusd-x", "--model", "x.gguf", "--device", "tpu:0",
                ],
                &["tpu:0"],
            ),
        ];
        for (case, args, mentions) in cases {
            let mut cmd = std::process::Command::new(amusd_e2e::bin(worker));
            cmd.args(args);
            let run = amusd_e2e::run(&mut cmd, Duration::from_secs(60));
            let _ = writeln!(
                std::io::stderr(),
                "[bad input] {worker}, {case}\n  stderr: {}",
                run.stderr.trim_end().replace('\n', "\n          ")
            );
            let ctx = format!("{worker}, {case}:\n{}", run.describe());
            assert!(
                run.status.code().is_some_and(|c| c != 0),
                "expected a non-zero exit; {ctx}"
            );
            assert!(!run.stderr.contains("panicked"), "{ctx}");
            for m in mentions {
                assert!(
                    run.stderr.contains(m),
                    "stderr does not mention '{m}'; {ctx}"
                );
            }
        }
    }
}

#[test]
fn sampling_values_out_of_range() {
    let f = fixtures();
    let model = s(&f.hf);
    let cases: [(&str, &str, &[&str]); 16] = [
        ("--temperature", "-1", &["temperature", "-1"]),
        ("--temperature", "nan", &["temperature", "NaN"]),
        ("--temperature", "inf", &["temperature", "inf"]),
        ("--top-p", "0", &["top-p", "(0, 1]"]),
        ("--top-p", "1.5", &["top-p", "1.5"]),
        ("--top-p", "nan", &["top-p", "NaN"]),
        ("--min-p", "-0.5", &["min-p", "[0, 1]"]),
        ("--min-p", "2", &["min-p", "2"]),
        ("--typical", "0", &["typical-p", "(0, 1]"]),
        ("--xtc-probability", "1.5", &["xtc probability", "[0, 1]"]),
        ("--xtc-threshold", "-1", &["xtc threshold", "-1"]),
        ("--dry-base", "9", &["dry base", "[1, 4]"]),
        ("--dynatemp-range", "-1", &["dynamic temperature", "-1"]),
        ("--top-n-sigma", "nan", &["top-n-sigma", "NaN"]),
        (
            "--dry-penalty-last-n",
            "-2",
            &["--dry-penalty-last-n", "-2"],
        ),
        ("--min-p", "inf", &["min-p", "inf"]),
    ];
    for (flag, value, mentions) in cases {
        let mut args = vec!["--prompt", "hello", flag, value];
        if flag != "--temperature" {
            args.extend(["--temperature", "0.7"]);
        }
        expect_error_per_strategy(
            &format!("{flag} {value}"),
            &STRATEGIES,
            (model, model),
            &args,
            mentions,
        );
    }
}

#[test]
fn logprobs_without_json() {
    expect_error(
        "--logprobs without --json",
        &["--prompt", "hi", "--logprobs", "2"],
        &["--logprobs", "--json"],
    );
}

/// A grammar that does not compile is refused before anything runs, under every strategy, with
/// llguidance's reason; so is one longer than the region carries (refused by `ar` too, so the same
/// requests succeed under each strategy).
#[test]
fn a_bad_or_oversized_grammar() {
    let f = fixtures();
    let model = s(&f.hf);
    let prompt = ["--prompt", "hello", "--max-new-tokens", "4"];
    for (case, grammar, mentions) in [
        (
            "schema that is not JSON",
            ["--json-schema", "{nope"],
            &["json schema"][..],
        ),
        (
            "unclosed regex",
            ["--regex", "[a-"],
            &["regular expression", "unclosed"][..],
        ),
        (
            "GBNF with an undefined rule",
            ["--grammar", "root ::= item+"],
            &["gbnf grammar", "line 1, column 10", "undefined rule `item`"][..],
        ),
    ] {
        expect_error_per_strategy(
            case,
            &STRATEGIES,
            (model, model),
            &[&prompt[..], &grammar].concat(),
            mentions,
        );
    }
    let dir = scratch();
    let big = dir.path().join("schema.json");
    let pattern = format!("\"{}\"", "x".repeat(amusd_shm::GRAMMAR_TEXT_LEN));
    std::fs::write(
        &big,
        format!(r#"{{"type": "string", "pattern": {pattern}}}"#),
    )
    .unwrap();
    expect_error_per_strategy(
        "oversized schema",
        &STRATEGIES,
        (model, model),
        &[&prompt[..], &["--json-schema-file", s(&big)]].concat(),
        &["grammar", "at most 131072"],
    );
}
