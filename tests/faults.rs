//! Faults through the real binaries, with fake models whose speed we choose: killed and stopped
//! workers are restarted and the request ends with exactly the undisturbed tokens; Ctrl-C stops
//! everything and removes the region; workers die with a killed coordinator and `amusd dump --gc`
//! removes the region it left; `amusd dump` reads a live region.

use std::time::Duration;

use amusd_e2e::{amusd, amusd_run, assert_cleaned_up, shm_entries_of, spawn, wait_until};
use amusd_e2e::{workers_of, Run, Running};
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
    let mut v = Verifier::new(FakeDecoder::new(FakeModel::parse(verify).unwrap()))
        .with_constraints(Some(std::sync::Arc::new(
            amusd_spec::constraint::fake::FakeConstraints,
        )));
    autoregressive(&mut v, &PROMPT, &stop, sampling, &mut |_, _| {
        std::ops::ControlFlow::Continue(())
    })
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
        kill_mid_run(&verify, &draft, &[], worker, &want);
    }
}

/// Starts a slow amusd run with `flags`, kills its `worker` once it has committed some tokens, and
/// checks that the run still commits `want`, reports the one restart and cleans up. Returns the run.
fn kill_mid_run(verify: &str, draft: &str, flags: &[&str], worker: &str, want: &[u32]) -> Run {
    let (running, region) = start_slow_run(verify, draft, flags);
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
    run
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
        let run = kill_mid_run(&verify, &draft, &flags, worker, &want);
        assert_eq!(run.json()["sampling"]["seed"], 9, "{}", run.describe());
    }
}

/// A restarted worker compiles the request's grammar again and brings it to the tokens committed
/// before its start: the run commits what `ar` under the grammar does. (The fake models follow the
/// fake grammar, `amusd_spec::constraint::fake`: here token `i` is `≡ i (mod 3)`.)
#[test]
fn a_worker_killed_under_a_grammar_follows_it_after_its_restart() {
    let grammar = amusd_spec::constraint::fake::grammar(3, 1000, 0);
    let sampling = RequestSampling {
        grammar: Some(grammar.clone()),
        ..RequestSampling::default()
    };
    for worker in ["verify", "draft"] {
        let (verify, draft) = models(20000);
        let want = expected_with(&verify, &sampling);
        assert!(
            // Token 0 is the fake grammar's stop, allowed anywhere (not a stop of this run).
            want.iter()
                .enumerate()
                .all(|(i, &t)| t == 0 || t % 3 == i as u32 % 3),
            "the grammar is not followed: {want:?}"
        );
        kill_mid_run(&verify, &draft, &["--regex", &grammar.text], worker, &want);
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
    // Any amusd start (another test's, another user's run) may garbage-collect the dead run's
    // region from here on: check what is left of it, whoever removes it.
    let list = amusd_run(&["dump", "--json"], Duration::from_secs(30));
    let regions: serde_json::Value = serde_json::from_str(&list.stdout).expect("dump --json");
    let ours = regions
        .as_array()
        .expect("a list of regions")
        .iter()
        .find(|r| r["name"] == region.as_str());
    if let Some(ours) = ours {
        assert_eq!(ours["coordinator_alive"], false, "{ours}");
    }
    let gc = amusd_run(&["dump", "--gc"], Duration::from_secs(30));
    assert!(gc.status.success(), "{}", gc.describe());
    assert!(shm_entries_of(pid).is_empty(), "dump --gc left {region}");
}

/// Greedy decoding of `prompt` with the verify model, `max_new` tokens.
fn expected_for(verify: &str, prompt: &[u32], max_new: usize) -> Vec<u32> {
    let stop = StopCriteria {
        stop_ids: Vec::new(),
        max_new_tokens: max_new,
    };
    let mut v = Verifier::new(FakeDecoder::new(FakeModel::parse(verify).unwrap()));
    autoregressive(&mut v, prompt, &stop, &Default::default(), &mut |_, _| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap()
    .tokens
}

/// The state of `role` ("draft"/"verify") in `region`, from `amusd dump --json`.
fn worker_state(region: &str, role: &str) -> Option<String> {
    let dump = amusd_run(&["dump", region, "--json"], Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_str(&dump.stdout).ok()?;
    v["workers"]
        .as_array()?
        .iter()
        .find(|w| w["role"] == role)
        .and_then(|w| w["state"].as_str().map(str::to_string))
}

/// Starts a run whose `slow` worker takes `load_ms` to load; returns it and its region once
/// `target` ("draft"/"verify") is in state `state`.
fn start_loading_run(slow: &str, target: &str, state: &str, extra: &[&str]) -> (Running, String) {
    let (mut verify, mut draft) = models(2000);
    let slow_load = ",load_ms=4000";
    match slow {
        "draft" => draft.push_str(slow_load),
        _ => verify.push_str(slow_load),
    }
    let running = spawn(amusd().args(generate_args(&verify, &draft, extra)));
    let pid = running.pid;
    let mut region = String::new();
    wait_until(
        &format!("the {target} worker to be {state}"),
        Duration::from_secs(30),
        || {
            let Some(name) = shm_entries_of(pid).into_iter().next() else {
                return false;
            };
            region = format!("/{name}");
            worker_state(&region, target).as_deref() == Some(state)
        },
    );
    (running, region)
}

/// A worker stopped while it waits (Ready, the other still loading) or while it loads: it sends no
/// heartbeat, so it is killed and restarted within the hang timeout, and the output is unchanged.
#[test]
fn a_worker_stopped_while_ready_or_loading_is_replaced() {
    // (the worker that loads slowly, the one stopped, its state when stopped)
    for (slow, target, state) in [("draft", "verify", "Ready"), ("draft", "draft", "Loading")] {
        let (running, region) =
            start_loading_run(slow, target, state, &["--hang-timeout-ms", "1000"]);
        let stop = amusd_run(
            &[
                "worker-kill",
                target,
                "--region",
                &region,
                "--signal",
                "stop",
            ],
            Duration::from_secs(30),
        );
        assert!(stop.status.success(), "{}", stop.describe());
        // Well under the 300 s load timeout: the hang check caught it.
        let run = running.wait(Duration::from_secs(90));
        let want = expected(&models(2000).0);
        assert_eq!(run.tokens(), want, "{target} stopped while {state}");
        assert!(
            run.stderr.contains("worker restarts 1"),
            "{target} stopped while {state}: no restart\n{}",
            run.describe()
        );
        assert_cleaned_up(&run);
    }
}

/// A prefill longer than the hang timeout is run in chunks, heartbeating between them: the healthy
/// worker is not killed.
#[test]
fn a_long_prefill_is_not_taken_for_a_hang() {
    // 20 ms per forward plus 5 ms per 4 tokens: 400 tokens at once would take 2 s, a 64-token
    // chunk 340 ms.
    let verify = "fake:vocab=512,seed=5,us=20000".to_string();
    let draft = "fake:vocab=512,seed=5,err=0.5,us=1000".to_string();
    let prompt: Vec<u32> = (0..400).map(|i| (i * 7 + 1) % 512).collect();
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let ids = ids.join(",");
    let mut args = vec!["generate"];
    args.extend(amusd_e2e::model_args("amusd", &verify, &draft));
    args.extend([
        "--prompt-ids",
        &ids,
        "--max-new-tokens",
        "20",
        "--hang-timeout-ms",
        "1000",
        "--json",
    ]);
    let run = amusd_run(&args, Duration::from_secs(120));
    assert_eq!(run.tokens(), expected_for(&verify, &prompt, 20));
    assert!(
        !run.stderr.contains("restarting"),
        "a healthy worker was killed\n{}",
        run.describe()
    );
    assert_cleaned_up(&run);
}

/// `worker-kill` signals only a live worker of a live run: a region that records another
/// process's pid (pid reuse, corruption) or a pid that kill(2) would read as a process group gets
/// an error, and the other process lives on.
#[test]
fn worker_kill_refuses_a_pid_that_is_not_a_worker() {
    let (verify, draft) = models(20000);
    let want = expected(&verify);
    let (running, region) = start_slow_run(&verify, &draft, &[]);
    let shm = amusd_shm::Shm::attach(&region).expect("attach to the run's region");
    let pid_slot = &shm.worker(amusd_shm::Role::Verify).pid;
    let real = pid_slot.load(std::sync::atomic::Ordering::Relaxed);
    let mut sentinel = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("start a sentinel process");
    // The sentinel first: if that check failed, the next one would signal every process we own.
    for (pid, why) in [(sentinel.id(), "not a child"), (u32::MAX, "corrupt")] {
        pid_slot.store(pid, std::sync::atomic::Ordering::Relaxed);
        let kill = amusd_run(
            &["worker-kill", "verify", "--region", &region],
            Duration::from_secs(30),
        );
        assert!(!kill.status.success(), "{}", kill.describe());
        assert!(kill.stderr.contains(why), "{}", kill.describe());
        assert!(
            sentinel
                .try_wait()
                .expect("wait for the sentinel")
                .is_none(),
            "worker-kill killed an unrelated process"
        );
    }
    pid_slot.store(real, std::sync::atomic::Ordering::Relaxed);
    let _ = sentinel.kill();
    let _ = sentinel.wait();
    let run = running.wait(Duration::from_secs(120));
    assert_eq!(run.tokens(), want);
    assert_cleaned_up(&run);
}
