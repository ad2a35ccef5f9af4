//! Faults through the real binaries, with fake models whose speed we choose: killed and stopped
//! workers are restarted and the request ends with exactly the undisturbed tokens; Ctrl-C stops
//! everything and removes the region; workers die with a killed coordinator and `amusd dump --gc`
//! removes the region it left; `amusd dump` reads a live region.

use std::time::Duration;

use amusd_e2e::{amusd, amusd_run, assert_cleaned_up, shm_entries_of, spawn, wait_until};
use amusd_e2e::{workers_of, Running};
use amusd_spec::fake::{FakeDecoder, FakeModel};
use amusd_spec::generate::autoregressive;
use amusd_spec::{RequestSampling, SamplingParams, StopCriteria, Verifier};

const PROMPT: [u32; 3] = [1, 2, 3];
const MAX_NEW: usize = 200;

/// A verify model slow enough (`verify_us` per forward, a sleep) that a fault lands mid-request, and
/// a draft that is wrong half the time, so both workers matter and requests take many verify steps.
fn models(verify_us: u64) -> (String, String) {
    (
        format!("fake:vocab=512,seed=5,us={verify_us}"),
        "fake:vocab=512,seed=5,err=0.5,us=1000".to_string(),
    )
}

/// Greedy decoding with the verify model: what every run must commit.
fn expected(verify: &str) -> Vec<u32> {
    expected_with(verify, &RequestSampling::default())
}

/// Autoregressive decoding with the verify model and this sampling.
fn expected_with(verify: &str, sampling: &RequestSampling) -> Vec<u32> {
    let stop = StopCriteria {
        stop_ids: Vec::new(),
        max_new_tokens: MAX_NEW,
    };
    let mut v = Verifier::new(FakeDecoder::new(FakeModel::parse(verify).unwrap()));
    autoregressive(&mut v, &PROMPT, &stop, sampling, &mut |_| {})
        .unwrap()
        .tokens
}

fn generate_args(verify: &str, draft: &str, extra: &[&str]) -> Vec<String> {
    let max_new = MAX_NEW.to_string();
    let mut args = vec!["generate"];
    args.extend(amusd_e2e::model_args("amusd", verify, draft));
    args.extend([
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        &max_new,
        "--json",
    ]);
    args.extend_from_slice(extra);
    args.into_iter().map(String::from).collect()
}

/// Starts a slow amusd run and waits until it has committed some tokens; returns it and its region.
fn start_slow_run(verify: &str, draft: &str, extra: &[&str]) -> (Running, String) {
    let running = spawn(amusd().args(generate_args(verify, draft, extra)));
    let pid = running.pid;
    let mut region = String::new();
    wait_until("the run to commit tokens", Duration::from_secs(30), || {
        let Some(name) = shm_entries_of(pid).into_iter().next() else {
            return false;
        };
        region = format!("/{name}");
        let dump = amusd_run(&["dump", &region, "--json"], Duration::from_secs(30));
        dump.status.success()
            && serde_json::from_str::<serde_json::Value>(&dump.stdout)
                .ok()
                .and_then(|v| v["verified"]["len"].as_u64())
                .is_some_and(|n| n > PROMPT.len() as u64 + 5)
    });
    (running, region)
}

#[test]
fn chaos_kills_and_stops_change_no_token() {
    let (verify, draft) = models(5000);
    let want = expected(&verify);
    let mut injected = 0;
    for seed in 1..=4 {
        let seed = seed.to_string();
        let run = amusd_e2e::run(
            amusd().args(generate_args(
                &verify,
                &draft,
                &[
                    "--chaos",
                    &seed,
                    "--chaos-signal",
                    "mixed",
                    "--chaos-faults",
                    "2",
                    "--chaos-rate",
                    "0.3",
                    "--hang-timeout-ms",
                    "500",
                ],
            )),
            Duration::from_secs(120),
        );
        let got = amusd_e2e::tokens_of(&run.json());
        assert_eq!(
            got,
            want,
            "seed {seed}: first difference at {}\n{}",
            amusd_e2e::first_difference(&got, &want),
            run.describe()
        );
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains("faults injected"))
            .unwrap_or_else(|| panic!("seed {seed}: no fault summary\n{}", run.describe()));
        let n: u32 = line
            .split("faults injected ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read {line:?}"));
        injected += n;
        assert_cleaned_up(&run);
    }
    assert!(
        injected >= 4,
        "only {injected} faults in 4 runs: the test tests nothing"
    );
}

#[test]
fn worker_kill_mid_request_restarts_the_worker_and_loses_nothing() {
    for worker in ["verify", "draft"] {
        let (verify, draft) = models(20000);
        let want = expected(&verify);
        let (running, region) = start_slow_run(&verify, &draft, &[]);
        let kill = amusd_run(
            &["worker-kill", worker, "--region", &region],
            Duration::from_secs(30),
        );
        assert!(kill.status.success(), "{}", kill.describe());
        let run = running.wait(Duration::from_secs(120));
        assert!(run.status.success(), "{worker}: {}", run.describe());
        assert_eq!(amusd_e2e::tokens_of(&run.json()), want, "{worker} killed");
        assert!(
            run.stderr.contains("worker restarts 1"),
            "{worker}: the restart is not reported\n{}",
            run.describe()
        );
        assert_cleaned_up(&run);
    }
}

/// The restarted worker reads the request's sampling from the region and, the noise being a function
/// of (seed, position, token), chooses exactly the tokens its predecessor would have.
#[test]
fn a_worker_killed_while_sampling_samples_the_same_tokens_after_its_restart() {
    let sampling = RequestSampling::new(SamplingParams {
        temperature: 1.0,
        top_k: 50,
        seed: 9,
        ..SamplingParams::GREEDY
    });
    let flags = ["--temperature", "1", "--top-k", "50", "--seed", "9"];
    for worker in ["verify", "draft"] {
        let (verify, draft) = models(20000);
        let want = expected_with(&verify, &sampling);
        assert_ne!(
            want,
            expected(&verify),
            "sampling should differ from greedy"
        );
        let (running, region) = start_slow_run(&verify, &draft, &flags);
        let kill = amusd_run(
            &["worker-kill", worker, "--region", &region],
            Duration::from_secs(30),
        );
        assert!(kill.status.success(), "{}", kill.describe());
        let run = running.wait(Duration::from_secs(120));
        assert!(run.status.success(), "{worker}: {}", run.describe());
        assert_eq!(amusd_e2e::tokens_of(&run.json()), want, "{worker} killed");
        assert_eq!(run.json()["sampling"]["seed"], 9, "{}", run.describe());
        assert!(
            run.stderr.contains("worker restarts 1"),
            "{worker}: the restart is not reported\n{}",
            run.describe()
        );
        assert_cleaned_up(&run);
    }
}

#[test]
fn ctrl_c_stops_the_workers_removes_the_region_and_exits_130() {
    let (verify, draft) = models(20000);
    let (running, _region) = start_slow_run(&verify, &draft, &[]);
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(running.pid as i32, libc::SIGINT) }, 0);
    let run = running.wait(Duration::from_secs(60));
    assert_eq!(run.status.code(), Some(130), "{}", run.describe());
    assert!(run.stderr.contains("interrupted"), "{}", run.describe());
    assert_cleaned_up(&run);
}

#[test]
fn workers_die_with_their_coordinator_and_gc_removes_its_region() {
    let (verify, draft) = models(20000);
    let (running, region) = start_slow_run(&verify, &draft, &[]);
    let pid = running.pid;

    let live = amusd_run(&["dump", &region, "--json"], Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_str(&live.stdout).expect("dump --json");
    assert_eq!(v["coordinator_alive"], true, "{v}");
    let roles: Vec<&str> = v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["role"].as_str())
        .collect();
    assert_eq!(roles, ["draft", "verify"], "{v}");

    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let run = running.wait(Duration::from_secs(30));
    assert!(run.status.code().is_none(), "{}", run.describe());
    wait_until("the workers to exit", Duration::from_secs(10), || {
        workers_of(pid).is_empty()
    });
    assert_eq!(
        shm_entries_of(pid).len(),
        1,
        "the killed coordinator's region"
    );

    let list = amusd_run(&["dump", "--json"], Duration::from_secs(30));
    let regions: serde_json::Value = serde_json::from_str(&list.stdout).expect("dump --json");
    let ours = regions
        .as_array()
        .expect("a list of regions")
        .iter()
        .find(|r| r["name"] == region.as_str())
        .unwrap_or_else(|| panic!("{region} not listed: {regions}"));
    assert_eq!(ours["coordinator_alive"], false, "{ours}");

    let gc = amusd_run(&["dump", "--gc"], Duration::from_secs(30));
    assert!(gc.status.success(), "{}", gc.describe());
    assert!(shm_entries_of(pid).is_empty(), "dump --gc left {region}");
}
