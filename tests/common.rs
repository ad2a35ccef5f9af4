//! Shared helpers of the end-to-end tests: where the built binaries are, running them with a
//! timeout, the `/dev/shm` regions they leave, the datasets, tiny models.
//!
//! The tests drive the real binaries in `target/release/` (or `target/debug/`), next to the test
//! executable's own directory: build them first with `cargo build --release` (`scripts/test.sh`
//! does).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use amusd_model::testing::TinyModel;
pub use candle_core::quantized::GgmlDType;

/// The directory holding the binaries: the test executable is `target/<profile>/deps/<test>-<hash>`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable is not in target/<profile>/deps/")
        .to_path_buf()
}

/// The path of a workspace binary, failing clearly if it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run cargo build --release first (scripts/test.sh builds every binary)",
        p.display()
    );
    p
}

/// `amusd` with both worker binaries checked to be present too.
pub fn amusd() -> Command {
    bin("amusd-draft-worker");
    bin("amusd-verify-worker");
    let mut c = Command::new(bin("amusd"));
    // Keep error output to what a user sees by default.
    c.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    c
}

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "status {:?}, {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }

    /// The stdout parsed as one JSON object (`--json`), failing with the whole output otherwise.
    pub fn json(&self) -> serde_json::Value {
        assert!(self.status.success(), "command failed: {}", self.describe());
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", self.describe()))
    }

    /// The `tokens` array of the JSON output.
    pub fn tokens(&self) -> Vec<u32> {
        tokens_of(&self.json())
    }
}

/// The first position where two token sequences differ (the shorter length if one is a prefix).
pub fn first_difference(a: &[u32], b: &[u32]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

pub fn tokens_of(v: &serde_json::Value) -> Vec<u32> {
    v["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens array in {v}"))
        .iter()
        .map(|t| t.as_u64().expect("token id") as u32)
        .collect()
}

/// A started command whose stdout and stderr are being collected.
pub struct Running {
    child: std::process::Child,
    pub pid: u32,
    started: Instant,
    what: String,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

/// Starts `cmd` with stdin closed, collecting stdout and stderr.
pub fn spawn(cmd: &mut Command) -> Running {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    Running {
        pid: child.id(),
        child,
        started,
        what: format!("{cmd:?}"),
        out,
        err,
    }
}

impl Running {
    /// Waits for the command to exit; kills it and fails if it takes longer than `timeout` (counted
    /// from its start).
    pub fn wait(mut self, timeout: Duration) -> Run {
        let (what, pid) = (&self.what, self.pid);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("cannot wait for the child") {
                break s;
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                // The pipes may be held open by grandchildren (workers): do not wait for them.
                panic!("{what} (pid {pid}) did not finish within {timeout:?}; killed it");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The coordinator has exited; its workers must have too, so the pipes close. Bound the wait
        // anyway so a leaked worker fails the test instead of hanging it.
        let join = |h: std::thread::JoinHandle<String>, stream: &str| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !h.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "{what} (pid {pid}) exited but its {stream} stayed open for 10 s: a worker outlived it"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            h.join().unwrap()
        };
        let stdout = join(self.out, "stdout");
        let stderr = join(self.err, "stderr");
        Run {
            pid,
            status,
            stdout,
            stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

/// Runs `cmd` to completion with stdin closed, capturing stdout and stderr; kills it and fails if it
/// takes longer than `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Run {
    spawn(cmd).wait(timeout)
}

/// Polls `condition` until it holds; fails after `timeout`. For waiting on another process's state,
/// which offers nothing to block on.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `--strategy S --verify-model V --draft-model D`: how most `amusd generate` calls start.
pub fn model_args<'a>(strategy: &'a str, verify: &'a str, draft: &'a str) -> Vec<&'a str> {
    vec![
        "--strategy",
        strategy,
        "--verify-model",
        verify,
        "--draft-model",
        draft,
    ]
}

/// Runs `amusd ARGS...` with a timeout.
pub fn amusd_run(args: &[&str], timeout: Duration) -> Run {
    run(amusd().args(args), timeout)
}

/// Names of the `amusd-*` entries in `/dev/shm`.
pub fn shm_entries() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("amusd-"))
                .collect()
        })
        .unwrap_or_default()
}

/// The `amusd-*` entries of `/dev/shm` that a coordinator with this pid created (`amusd-<pid>-<hex>`).
pub fn shm_entries_of(pid: u32) -> Vec<String> {
    let prefix = format!("amusd-{pid}-");
    shm_entries()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Processes still alive whose command line names a region of the coordinator `pid` (its workers).
pub fn workers_of(pid: u32) -> Vec<String> {
    let needle = format!("amusd-{pid}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            out.push(format!("{}: {}", e.file_name().to_string_lossy(), cmdline));
        }
    }
    out
}

/// Fails if the amusd coordinator of `run` left its region in `/dev/shm` or a worker alive.
pub fn assert_cleaned_up(run: &Run) {
    let left = shm_entries_of(run.pid);
    assert!(
        left.is_empty(),
        "amusd (pid {}) left {left:?} in /dev/shm",
        run.pid
    );
    // Workers are reaped by the coordinator before it exits; allow a moment for /proc to settle.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = workers_of(run.pid);
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers of amusd (pid {}) outlived it: {alive:?}",
            run.pid
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `${AMUSD_HOME:-$HOME/.cache/amusd}`, as the binaries compute it.
pub fn amusd_home() -> PathBuf {
    amusd_model::paths::amusd_home()
}

/// The default model, failing with how to fetch it if it is absent.
pub fn require_default_model() -> PathBuf {
    let p = amusd_model::default_model_path();
    assert!(
        p.is_file(),
        "the default model {} is missing: run scripts/fetch-assets.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

fn require_dataset(rel: &str) -> PathBuf {
    let p = amusd_home().join("datasets").join(rel);
    assert!(
        p.is_file(),
        "the dataset {} is missing: run scripts/fetch-assets.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The first `n` HumanEval prompts, wrapped as a chat request to complete the function.
pub fn humaneval_prompts(n: usize) -> Vec<String> {
    let p = require_dataset("HumanEval.jsonl.gz");
    let f = std::fs::File::open(&p).unwrap_or_else(|e| panic!("cannot open {}: {e}", p.display()));
    let mut text = String::new();
    flate2::read::GzDecoder::new(f)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("cannot gunzip {}: {e}", p.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("HumanEval line is JSON");
            let prompt = v["prompt"].as_str().expect("HumanEval line has a prompt");
            format!("Complete the following Python function:\n```python\n{prompt}```")
        })
        .collect()
}

/// The first turn of the first `n` MT-Bench questions.
pub fn mt_bench_prompts(n: usize) -> Vec<String> {
    let p = require_dataset("mt_bench/question.jsonl");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("MT-Bench line is JSON");
            v["turns"][0]
                .as_str()
                .expect("MT-Bench line has turns")
                .to_string()
        })
        .collect()
}

/// Writes a tiny Hugging Face model directory under `parent/name` and returns its path.
pub fn tiny_hf(parent: &Path, name: &str, model: &TinyModel) -> PathBuf {
    let dir = parent.join(name);
    model
        .write_hf(&dir)
        .unwrap_or_else(|e| panic!("cannot write a tiny model to {}: {e}", dir.display()));
    dir
}

/// Writes a tiny GGUF file `parent/name` and returns its path.
pub fn tiny_gguf(parent: &Path, name: &str, model: &TinyModel, dtype: GgmlDType) -> PathBuf {
    let path = parent.join(name);
    model
        .write_gguf(&path, dtype)
        .unwrap_or_else(|e| panic!("cannot write a tiny GGUF to {}: {e}", path.display()));
    path
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
