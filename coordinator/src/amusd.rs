//! `--strategy amusd`: the two worker processes, driven through the shared-memory region.

use std::process::ExitCode;
use std::time::Duration;

use amusd_model::chat::Message;
use amusd_model::loader::{load_text, ModelText};
use amusd_shm::Role;
use amusd_spec::fake::FakeModel;
use amusd_spec::worker::run_request;
use amusd_spec::{Generation, SpecError, StopCriteria};
use anyhow::{bail, Context, Result};

use crate::generate::{
    check_same_vocabulary, encode_conversation, finish_output, GenerateArgs, ModelArgs, Strategy,
};
use crate::output::{print_text, Spinner};
use crate::supervisor::{install_signal_handlers, Policy, Supervisor, WorkerSpec};

/// Both workers, loaded once, serving requests one after another.
pub struct Engine {
    pub sup: Supervisor,
    next_id: u64,
}

impl Engine {
    pub fn start(m: &ModelArgs, verify_spec: &str, draft_spec: &str) -> Result<Self> {
        install_signal_handlers();
        let specs = vec![
            WorkerSpec {
                role: Role::Draft,
                model: draft_spec.to_string(),
                device: m.draft_device()?,
                extra_args: vec!["--max-lookahead".into(), m.max_lookahead.to_string()],
            },
            WorkerSpec {
                role: Role::Verify,
                model: verify_spec.to_string(),
                device: m.verify_device()?,
                extra_args: vec![
                    "--max-verify-batch".into(),
                    m.max_verify_batch.to_string(),
                    "--verify-wait-us".into(),
                    m.verify_wait_us.to_string(),
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
        Ok(Self { sup, next_id: 1 })
    }

    pub fn generate(
        &mut self,
        prompt: &[u32],
        stop: &StopCriteria,
        on_tokens: &mut dyn FnMut(&[u32]),
    ) -> Result<Generation> {
        let id = self.next_id;
        self.next_id += 1;
        let shm = self.sup.shm_handle();
        let region = shm.region();
        let sup = &mut self.sup;
        let mut supervise = |_: &amusd_shm::Region| {
            sup.check(true)
                .map_err(|e| SpecError::Protocol(format!("{e:#}")))
        };
        Ok(run_request(
            region,
            id,
            prompt,
            stop,
            on_tokens,
            &mut supervise,
        )?)
    }
}

pub fn generate(args: &GenerateArgs, messages: &[Message]) -> Result<ExitCode> {
    let m = &args.models;
    let verify_spec = m.verify_spec()?;
    let draft_spec = m.draft_spec()?;
    let verify_text = text_of(&verify_spec, "verify")?;
    if let (Some(v), Some(d)) = (&verify_text, &text_of(&draft_spec, "draft")?) {
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
    amusd_spec::generate::check_fits(
        amusd_shm::TOKEN_CAPACITY,
        prompt.len(),
        args.max_new_tokens,
        0,
    )?;
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
    let result = engine.generate(&prompt, &stop, &mut on_tokens);
    let restarts = engine.sup.restarts;
    drop(engine);
    if crate::supervisor::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        println!();
        eprintln!("amusd: interrupted; workers stopped, region removed");
        return Ok(ExitCode::from(130));
    }
    let g = result?;
    match &verify_text {
        Some(t) => finish_output(Strategy::Amusd, &t.tokenizer, prompt.len(), &g, json)?,
        None => println!(
            "{}",
            serde_json::json!({"strategy": "amusd", "tokens": g.tokens, "finish_reason": g.finish})
        ),
    }
    if restarts > 0 {
        eprintln!("amusd: {restarts} worker restart(s) during the run");
    }
    Ok(ExitCode::SUCCESS)
}

fn text_of(spec: &str, role: &str) -> Result<Option<ModelText>> {
    if FakeModel::is_fake(spec) {
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
