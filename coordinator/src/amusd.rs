//! `--strategy amusd`: the two worker processes, driven through the shared-memory region.

use std::process::ExitCode;
use std::time::Duration;

use amusd_model::chat::Message;
use amusd_model::loader::{load_text, ModelText};
use amusd_shm::Role;
use amusd_spec::fake::FakeModel;
use amusd_spec::worker::run_request;
use amusd_spec::{Generation, RequestSampling, SpecError, StopCriteria};
use anyhow::{bail, Context, Result};

use crate::generate::ChaosSignal;
use crate::generate::{
    check_same_vocabulary, encode_conversation, finish_output, sampling_json, GenerateArgs,
    ModelArgs, Output, Strategy,
};
use crate::output::{print_text, Spinner};
use crate::supervisor::{install_signal_handlers, Policy, Supervisor, WorkerSpec};

/// Both workers, loaded once, serving requests one after another.
pub struct Engine {
    pub sup: Supervisor,
    next_id: u64,
    chaos: Option<Chaos>,
}

/// Seeded fault injection (`--chaos`): at each supervision check, with some probability, signal one
/// worker chosen at random, at most `faults` times per request.
struct Chaos {
    rng: rand::rngs::StdRng,
    faults: u32,
    rate: f64,
    signal: ChaosSignal,
    /// Faults injected so far, over all requests.
    injected: u32,
    /// Processes already struck: a stopped worker still looks busy until the hang check catches it.
    struck: Vec<u32>,
}

impl Chaos {
    fn maybe_strike(&mut self, sup: &Supervisor, left: &mut u32) {
        use rand::Rng;
        if *left == 0 || !self.rng.gen_bool(self.rate.clamp(0.0, 1.0)) {
            return;
        }
        let role = if self.rng.gen_bool(0.5) {
            Role::Draft
        } else {
            Role::Verify
        };
        let stop = match self.signal {
            ChaosSignal::Kill => false,
            ChaosSignal::Stop => true,
            ChaosSignal::Mixed => self.rng.gen_bool(0.5),
        };
        // Only strike a worker that is at work, so every fault hits the request in flight.
        if sup.shm_handle().worker_state(role) != Some(amusd_shm::WorkerState::Busy) {
            return;
        }
        if let Some(pid) = sup.pid(role).filter(|p| !self.struck.contains(p)) {
            self.struck.push(pid);
            let sig = if stop { libc::SIGSTOP } else { libc::SIGKILL };
            // SAFETY: kill() on our own child's pid; no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
            eprintln!(
                "amusd: chaos: {} the {} worker (pid {pid})",
                if stop { "stopped" } else { "killed" },
                role.name()
            );
            *left -= 1;
            self.injected += 1;
        }
    }
}

impl Engine {
    pub fn start(m: &ModelArgs, verify_spec: &str, draft_spec: &str) -> Result<Self> {
        install_signal_handlers();
        let specs = vec![
            WorkerSpec {
                role: Role::Draft,
                model: draft_spec.to_string(),
                device: m.draft_device()?,
                extra_args: draft_args(m),
            },
            WorkerSpec {
                role: Role::Verify,
                model: verify_spec.to_string(),
                device: m.verify_device()?,
                extra_args: vec![
                    "--max-verify-batch".into(),
                    m.max_verify_batch.to_string(),
                    "--verify-wait-us".into(),
                    m.verify_wait_us().to_string(),
                ],
            },
        ];
        let policy = Policy {
            load_timeout: Duration::from_secs(m.load_timeout_s),
            hang_timeout: Duration::from_millis(m.hang_timeout_ms),
            max_restarts: m.max_restarts,
        };
        let mut sup = Supervisor::start(specs, policy)?;
        {
            let _spinner = Spinner::new("loading the draft and verify workers".into());
            sup.wait_ready()?;
        }
        let chaos = m.chaos.map(|seed| Chaos {
            rng: rand::SeedableRng::seed_from_u64(seed),
            faults: m.chaos_faults,
            rate: m.chaos_rate,
            signal: m.chaos_signal,
            injected: 0,
            struck: Vec::new(),
        });
        Ok(Self {
            sup,
            next_id: 1,
            chaos,
        })
    }

    pub fn generate(
        &mut self,
        prompt: &[u32],
        stop: &StopCriteria,
        sampling: &RequestSampling,
        on_tokens: &mut dyn FnMut(&[u32]),
    ) -> Result<Generation> {
        let id = self.next_id;
        self.next_id += 1;
        let shm = self.sup.shm_handle();
        let region = shm.region();
        let sup = &mut self.sup;
        let chaos = &mut self.chaos;
        let mut left = chaos.as_ref().map_or(0, |c| c.faults);
        let mut supervise = |_: &amusd_shm::Region| {
            if let Some(c) = chaos.as_mut() {
                c.maybe_strike(sup, &mut left);
            }
            sup.check(true)
                .map_err(|e| SpecError::Protocol(format!("{e:#}")))
        };
        Ok(run_request(
            region,
            id,
            prompt,
            stop,
            sampling,
            on_tokens,
            &mut supervise,
        )?)
    }
}

pub fn generate(
    args: &GenerateArgs,
    messages: &[Message],
    sampling: &RequestSampling,
) -> Result<ExitCode> {
    let m = &args.models;
    let verify_spec = m.verify_spec()?;
    let draft_spec = m.draft_spec()?;
    // A bad lookup range, or lookup both alone and ahead of a model, is the user's error: say so
    // before any worker starts.
    m.lookup_alone()?;
    let verify_text = text_of(&verify_spec, "verify")?;
    let draft_text = text_of(&draft_spec, "draft")?;
    if let (Some(v), Some(d)) = (&verify_text, &draft_text) {
        check_same_vocabulary(&v.tokenizer, &d.tokenizer)?;
    }
    let (prompt, stop_ids) = match (&verify_text, &args.prompt_ids) {
        (_, Some(ids)) => (ids.clone(), fake_stop(&verify_spec)),
        (Some(t), None) => (
            encode_conversation(&t.tokenizer, t.chat_template.as_ref(), messages, args.raw)?,
            t.eos_ids.clone(),
        ),
        (None, None) => bail!("a fake verify model needs --prompt-ids"),
    };
    let stop = StopCriteria {
        stop_ids,
        max_new_tokens: args.max_new_tokens,
    };
    // Checked here, before the workers see the request: a request that cannot fit is the user's
    // error, not a worker fault to restart.
    let context = [&verify_text, &draft_text]
        .into_iter()
        .flatten()
        .map(|t| t.context_length)
        .fold(amusd_shm::TOKEN_CAPACITY, usize::min);
    amusd_spec::generate::check_fits(context, prompt.len(), args.max_new_tokens)?;
    let mut engine = Engine::start(m, &verify_spec, &draft_spec)?;
    let mut stream = verify_text.as_ref().map(|t| t.tokenizer.stream(true));
    let json = args.json;
    let mut on_tokens = |ids: &[u32]| {
        if let (false, Some(s)) = (json, stream.as_mut()) {
            for &id in ids {
                if let Ok(piece) = s.step(id) {
                    print_text(&piece);
                }
            }
        }
    };
    let result = engine.generate(&prompt, &stop, sampling, &mut on_tokens);
    let restarts = engine.sup.restarts;
    let worst = engine.sup.worst_recovery;
    let injected = engine.chaos.as_ref().map_or(0, |c| c.injected);
    drop(engine);
    if crate::supervisor::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        println!();
        eprintln!("amusd: interrupted; workers stopped, region removed");
        return Ok(ExitCode::from(130));
    }
    let g = result?;
    match &verify_text {
        Some(t) => {
            let out = Output {
                strategy: Strategy::Amusd,
                prompt_tokens: prompt.len(),
                sampling,
                drafter: m.drafter_label(),
                json,
            };
            finish_output(&out, &t.tokenizer, &g)?
        }
        None => {
            let mut metrics = crate::generate::summary_json(&g.metrics);
            metrics["drafted"] = g.metrics.draft_times.len().into();
            println!(
                "{}",
                serde_json::json!({
                    "strategy": "amusd",
                    "drafter": m.drafter_label(),
                    "tokens": g.tokens,
                    "finish_reason": g.finish,
                    "sampling": sampling_json(sampling),
                    "metrics": metrics,
                })
            )
        }
    }
    if restarts > 0 || injected > 0 {
        eprintln!(
            "amusd: faults injected {injected}, worker restarts {restarts}, worst recovery {} ms",
            worst.map_or(0, |d| d.as_millis())
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The draft worker's options: its lookahead, and prompt lookup ahead of its model if asked.
fn draft_args(m: &ModelArgs) -> Vec<String> {
    let mut args = vec![
        "--max-lookahead".into(),
        m.max_lookahead.to_string(),
        "--lookup-max-run".into(),
        m.lookup_max_run.to_string(),
    ];
    if let Some(range) = m.draft_lookup {
        args.extend(["--lookup".into(), range.to_string()]);
    }
    args
}

/// A model's tokenizer and metadata; `None` for a fake model or prompt lookup (no model).
fn text_of(spec: &str, role: &str) -> Result<Option<ModelText>> {
    if FakeModel::is_fake(spec) || amusd_spec::lookup::parse_spec(spec).is_some() {
        return Ok(None);
    }
    let s = spec.parse()?;
    Ok(Some(load_text(&s).with_context(|| {
        format!("cannot load the {role} model")
    })?))
}

fn fake_stop(spec: &str) -> Vec<u32> {
    match FakeModel::parse(spec) {
        Ok(m) if m.eos_every > 0 => vec![m.eos],
        _ => Vec::new(),
    }
}
