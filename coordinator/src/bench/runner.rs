//! Running the strategies over the samples: models loaded once, each sample through every
//! strategy in turn (ar first: the reference, every other output checked against ar's as it is
//! produced), so a machine whose speed drifts over the run slows all strategies alike and the
//! ratios between them stay fair.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use amusd_model::chat::Message;
use amusd_model::loader::ModelText;
use amusd_proc::bind::SavedAffinity;
use amusd_shm::TOKEN_CAPACITY;
use amusd_spec::generate::check_fits;
use amusd_spec::{Generation, RequestSampling, StopCriteria};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::datasets::{Dataset, Sample};
use super::records::{write_output, write_records, Record};
use super::report::{render_report, summarize};
use super::timeline::{build_plot, render_svg};
use super::trace_lines;
use super::BenchArgs;
use crate::args::{sampling_label, ModelArgs, Strategy};
use crate::backend::{bind_in_process, Backend, InProcess, Request, Trace, Workers};
use crate::prompt::{encode_conversation, Texts};
use crate::supervisor::INTERRUPTED;
use amusd_model::DeviceSpec;

/// A sample with its first prompt tokenized.
pub(super) struct Prepared {
    pub(super) sample: Sample,
    pub(super) first_prompt: Vec<u32>,
}

/// What one strategy produced for one sample.
pub(super) struct Outcome {
    pub(super) records: Vec<Record>,
    /// The trace of the plotted sample's first turn, if this is the plotted sample.
    pub(super) plot: Option<(Generation, Trace)>,
    /// Each generation's `--trace` line.
    pub(super) traces: Vec<serde_json::Value>,
}

/// What a strategy run needs besides the backend.
pub(super) struct RunContext<'a> {
    pub(super) text: &'a ModelText,
    pub(super) samples: &'a [Prepared],
    pub(super) stop: StopCriteria,
    pub(super) sampling: RequestSampling,
    pub(super) dataset: String,
    /// How sd and amusd draft (recorded with each of their generations).
    pub(super) drafter: String,
    pub(super) warmup: usize,
    pub(super) plot_sample: Option<usize>,
    /// Whether to keep every generation's trace (`--trace`).
    pub(super) trace: bool,
    /// Whether a conversation's later turns keep what the previous turn left cached (the first
    /// turn always prefills its whole prompt, as every peer's benchmark does).
    pub(super) prompt_cache: bool,
}

impl RunContext<'_> {
    pub(super) fn encode(&self, conversation: &[Message]) -> Result<Vec<u32>> {
        encode_conversation(
            &self.text.tokenizer,
            self.text.chat_template.as_ref(),
            conversation,
            false,
        )
    }

    /// One request on `backend`, the sampling the bench's, drafting as `arm` says; with
    /// `cache_prompt`, keeping what the previous request left cached.
    pub(super) fn generate(
        &self,
        backend: &mut Backend,
        arm: Arm,
        prompt: &[u32],
        stop: &StopCriteria,
        cache_prompt: bool,
    ) -> Result<(Generation, Trace)> {
        let sampling = RequestSampling {
            no_draft_lookup: arm.no_lookup,
            cache_prompt,
            ..self.sampling.clone()
        };
        let request = Request {
            prompt,
            stop,
            sampling: &sampling,
            cancelled: None,
        };
        let c = backend.generate(&request, &mut |_, _| ControlFlow::Continue(()))?;
        Ok((c.generation, c.trace))
    }

    /// The untimed warm-up generations on `backend`, before its first timed one.
    pub(super) fn warm_up(&self, backend: &mut Backend) -> Result<()> {
        if let Some(first) = self.samples.first() {
            let warm = StopCriteria {
                stop_ids: self.stop.stop_ids.clone(),
                max_new_tokens: self.stop.max_new_tokens.min(16),
            };
            let arm = Arm::new(backend.strategy(), false);
            for _ in 0..self.warmup {
                self.generate(backend, arm, &first.first_prompt, &warm, false)?;
            }
        }
        Ok(())
    }

    /// Runs sample `k` (every turn) through `backend` as `arm`, keeping its records (and plot) in
    /// `done`. Stops at the first error (or Ctrl-C).
    pub(super) fn run_sample(
        &self,
        backend: &mut Backend,
        arm: Arm,
        k: usize,
        pb: &ProgressBar,
        exact: &mut Exactness,
        done: &mut Outcome,
    ) -> Result<()> {
        let strategy = backend.strategy();
        let p = &self.samples[k];
        let drafter = if arm.no_lookup {
            "model"
        } else {
            &self.drafter
        };
        let s = &p.sample;
        let mut conversation = s.conversation.clone();
        for turn in 1..=s.follow_ups.len() + 1 {
            let prompt = if turn == 1 {
                p.first_prompt.clone()
            } else {
                self.encode(&conversation)?
            };
            let (g, trace) = self
                .generate(
                    backend,
                    arm,
                    &prompt,
                    &self.stop,
                    turn > 1 && self.prompt_cache,
                )
                .with_context(|| {
                    format!("{} failed on sample {} ({})", arm.name(), s.index, s.id)
                })?;
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            if let Some(want) = exact.reference.get(&(s.index, turn)) {
                if let Some(m) = mismatch(&arm.name(), s, turn, want, &g.tokens) {
                    pb.suspend(|| eprintln!("amusd: {m}"));
                    exact.mismatches.push(m);
                }
            }
            if turn <= s.follow_ups.len() {
                let answer = self.text.tokenizer.decode(&g.tokens, true)?;
                conversation.push(Message::assistant(answer));
                conversation.push(Message::user(s.follow_ups[turn - 1].clone()));
            }
            done.records.push(
                Record::of(
                    s,
                    turn,
                    strategy,
                    &self.dataset,
                    prompt.len(),
                    &self.sampling,
                    &g,
                )
                .drafted_by(drafter),
            );
            if self.trace {
                let origin = trace_lines::Origin {
                    sample_index: s.index,
                    sample_id: &s.id,
                    turn,
                    strategy,
                    drafter,
                };
                done.traces.push(trace_lines::line(&origin, &trace));
            }
            // The plot shows the drafters as configured.
            if turn == 1 && self.plot_sample == Some(k) && !arm.no_lookup {
                done.plot = Some((g, trace));
            }
        }
        Ok(())
    }
}

/// Describes how `got` differs from the reference `want`, if it does.
pub(super) fn mismatch(
    name: &str,
    s: &Sample,
    turn: usize,
    want: &[u32],
    got: &[u32],
) -> Option<String> {
    if want == got {
        return None;
    }
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let show = |t: &[u32]| {
        t.get(at)
            .map_or("the end".to_string(), |v| format!("token {v}"))
    };
    Some(format!(
        "{name} output differs from ar on sample {} ({}) turn {turn} at position {at}: ar has {}, {name} has {} (lengths {} and {})",
        s.index,
        s.id,
        show(want),
        show(got),
        want.len(),
        got.len()
    ))
}

/// One strategy as the bench runs it: sd and amusd draft as the options say, or with
/// `--compare-lookup` also with the draft model alone (each such request turns the lookup off, on
/// the same models and workers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Arm {
    pub strategy: Strategy,
    pub no_lookup: bool,
}

impl Arm {
    fn new(strategy: Strategy, no_lookup: bool) -> Self {
        Self {
            strategy,
            no_lookup,
        }
    }

    /// The strategy's name, marked when its draft model drafts alone.
    pub(super) fn name(self) -> String {
        if self.no_lookup {
            format!("{} (model draft alone)", self.strategy.name())
        } else {
            self.strategy.name().into()
        }
    }
}

/// What the options ask for, validated.
pub(super) struct Plan {
    /// ar first: it is the reference every other output is checked against as it is produced.
    pub strategies: Vec<Strategy>,
    /// What runs each sample, in turn: the strategies, and with `--compare-lookup` sd and amusd a
    /// second time with the draft model alone, each beside its counterpart.
    pub arms: Vec<Arm>,
    pub dataset: Dataset,
    pub dataset_name: String,
    pub sampling: RequestSampling,
}

impl Plan {
    pub fn new(args: &BenchArgs) -> Result<Self> {
        let strategies: Vec<Strategy> = [Strategy::Ar, Strategy::Sd, Strategy::Amusd]
            .into_iter()
            .filter(|s| args.strategies.contains(s))
            .collect();
        if strategies.is_empty() {
            bail!("no strategy: pass --strategies ar,sd,amusd (or a subset)");
        }
        let arms = arms(&strategies, args)?;
        if args.num_samples == Some(0) {
            bail!("--num-samples 0 runs nothing; pass at least 1");
        }
        if args.max_new_tokens == 0 {
            bail!("--max-new-tokens 0 generates nothing; pass at least 1");
        }
        let dataset = Dataset::parse(&args.dataset)?;
        let sampling = args.sampling.resolve()?;
        if !sampling.params.is_plain_greedy() || sampling.grammar.is_some() {
            eprintln!("amusd: sampling with {}", sampling_label(&sampling));
        }
        Ok(Self {
            strategies,
            arms,
            dataset_name: dataset.name(),
            dataset,
            sampling,
        })
    }
}

/// Each strategy's arm, and with `--compare-lookup` sd's and amusd's with the draft model alone.
fn arms(strategies: &[Strategy], args: &BenchArgs) -> Result<Vec<Arm>> {
    if args.compare_lookup {
        let m = &args.models;
        if m.lookup_ahead().is_none() {
            bail!("--compare-lookup compares a draft model with and without prompt lookup ahead of it: it needs a draft model and the lookup (drop --no-draft-lookup, and --draft-model lookup)");
        }
        if !strategies.iter().any(|&s| s != Strategy::Ar) {
            bail!("--compare-lookup compares drafters: run sd or amusd");
        }
    }
    let mut arms = Vec::new();
    for &s in strategies {
        arms.push(Arm::new(s, false));
        if args.compare_lookup && s != Strategy::Ar {
            arms.push(Arm::new(s, true));
        }
    }
    Ok(arms)
}

/// The models, loaded once: the text side of both, the backends.
pub(super) struct Models {
    pub(super) text: ModelText,
    /// The longest request every strategy run can hold.
    pub(super) capacity: usize,
    pub(super) backends: Backends,
}

/// Every strategy's backend, kept for the whole run: the in-process models, on which ar and sd
/// take turns with this process bound to the verify core, and the amusd workers, started on first
/// use and run with this process unbound.
pub(super) struct Backends {
    verify_spec: String,
    /// The amusd workers' draft (sd's is in `in_process`).
    amusd_draft: Option<String>,
    verify_device: DeviceSpec,
    /// ar and sd, in this process, sharing one verify model.
    in_process: Option<InProcess>,
    workers: Option<Workers>,
    /// The affinity before binding to the verify core, given back to the amusd coordinator.
    saved_affinity: Option<SavedAffinity>,
}

impl Models {
    pub fn load(m: &ModelArgs, strategies: &[Strategy]) -> Result<Self> {
        let runs = |s| strategies.contains(&s);
        let in_process = runs(Strategy::Ar) || runs(Strategy::Sd);
        let saved_affinity = SavedAffinity::current();
        if in_process {
            bind_in_process(m.verify_device()?)?;
        }
        crate::supervisor::install_signal_handlers();
        let verify_spec = m.verify_spec()?;
        // The draft's defaults depend on the strategy (`ModelArgs::draft_spec`).
        let draft_for = |s| runs(s).then(|| m.draft_spec(s)).transpose();
        let (sd_draft, amusd_draft) = (draft_for(Strategy::Sd)?, draft_for(Strategy::Amusd)?);
        // Every strategy reserves exactly prompt + max_new positions, in both models (sd and amusd
        // reserve the same positions in the draft), and amusd in the region's token buffer.
        let texts = Texts::load(&verify_spec, amusd_draft.as_deref().or(sd_draft.as_deref()))?
            .with_chat_template(m.chat_template_file.as_deref())?;
        let mut capacity = texts.context(usize::MAX);
        let text = texts
            .verify
            .context("bench needs a real verify model: a fake one has no tokenizer")?;
        let in_process = if in_process {
            let p = InProcess::load(&verify_spec, sd_draft.as_deref(), m)?;
            capacity = capacity.min(p.max_position());
            Some(p)
        } else {
            None
        };
        if runs(Strategy::Amusd) {
            capacity = capacity.min(TOKEN_CAPACITY);
        }
        Ok(Self {
            text,
            capacity,
            backends: Backends {
                verify_spec,
                amusd_draft,
                verify_device: m.verify_device()?,
                in_process,
                workers: None,
                saved_affinity,
            },
        })
    }
}

impl Backends {
    /// Runs `f` on the backend of `strategy`: the in-process models for ar and sd, with this
    /// process bound to the verify core; for amusd, the workers, with this process unbound (pinned
    /// to the verify core, it would steal time from the verify worker on every wake-up).
    fn with<R>(
        &mut self,
        strategy: Strategy,
        m: &ModelArgs,
        pb: &ProgressBar,
        f: impl FnOnce(&mut Backend) -> Result<R>,
    ) -> Result<R> {
        let mut backend = match strategy {
            Strategy::Ar | Strategy::Sd => {
                bind_in_process(self.verify_device)?;
                let p = self
                    .in_process
                    .take()
                    .context("internal: no in-process models")?;
                match strategy {
                    Strategy::Ar => Backend::Ar(p),
                    _ => Backend::Sd(p),
                }
            }
            Strategy::Amusd => {
                if let Some(a) = &self.saved_affinity {
                    a.restore();
                }
                Backend::Amusd(match self.workers.take() {
                    Some(w) => w,
                    None => {
                        let draft = self.amusd_draft.as_deref().unwrap_or_default();
                        pb.suspend(|| Workers::start(m, &self.verify_spec, draft))?
                    }
                })
            }
        };
        let result = f(&mut backend);
        match backend {
            Backend::Ar(p) | Backend::Sd(p) => self.in_process = Some(p),
            Backend::Amusd(w) => self.workers = Some(w),
        }
        result
    }
}

/// The samples to run: the first `--num-samples` whose first prompt fits the context.
pub(super) fn select_samples(
    args: &BenchArgs,
    plan: &Plan,
    models: &Models,
) -> Result<Vec<Prepared>> {
    let (name, capacity, text) = (&plan.dataset_name, models.capacity, &models.text);
    crate::prompt::check_logit_bias(&text.tokenizer, &plan.sampling)?;
    let all = plan.dataset.load()?;
    let available = all.len();
    let want = args.num_samples.unwrap_or(available);
    let mut samples = Vec::new();
    for sample in all {
        if samples.len() == want {
            break;
        }
        let first_prompt = encode_conversation(
            &text.tokenizer,
            text.chat_template.as_ref(),
            &sample.conversation,
            false,
        )?;
        if check_fits(capacity, first_prompt.len(), args.max_new_tokens).is_err() {
            eprintln!(
                "amusd: skipping sample {} ({}): {} prompt tokens + {} new tokens do not fit the context of {capacity}",
                sample.index,
                sample.id,
                first_prompt.len(),
                args.max_new_tokens
            );
            continue;
        }
        samples.push(Prepared {
            sample,
            first_prompt,
        });
    }
    check_selection(args, name, samples.len(), want, available)?;
    Ok(samples)
}

pub(super) fn check_selection(
    args: &BenchArgs,
    name: &str,
    n: usize,
    want: usize,
    available: usize,
) -> Result<()> {
    if n == 0 {
        bail!(
            "no sample of {name} fits the context with --max-new-tokens {}",
            args.max_new_tokens
        );
    }
    if n < want && args.num_samples.is_some() {
        eprintln!("amusd: {name} has only {n} usable samples of {available}; running those");
    }
    if args.plot.is_some() && args.plot_sample >= n {
        bail!(
            "--plot-sample {} is out of range: {n} samples are run (0..={})",
            args.plot_sample,
            n - 1
        );
    }
    Ok(())
}

/// What every strategy produced, and the first error if one stopped the run.
pub(super) struct Run {
    pub(super) records: Vec<Record>,
    pub(super) plots: Vec<(Strategy, (Generation, Trace))>,
    pub(super) traces: Vec<serde_json::Value>,
    pub(super) exact: Exactness,
    pub(super) failure: Option<anyhow::Error>,
}

/// ar's outputs, which every other is checked against as it is produced, and what differed.
#[derive(Default)]
pub(super) struct Exactness {
    /// ar's tokens by (sample index, turn).
    pub(super) reference: HashMap<(usize, usize), Vec<u32>>,
    pub(super) mismatches: Vec<String>,
}

impl Exactness {
    /// Keeps ar's `records` as the outputs the other strategies must equal.
    fn adopt_reference(&mut self, records: &[Record]) {
        for r in records {
            self.reference
                .insert((r.sample_index, r.turn), r.metrics.tokens.clone());
        }
    }
}

/// Warms every strategy up, then runs each sample through every strategy in turn, stopping at
/// the first error.
pub(super) fn run_all(
    args: &BenchArgs,
    plan: &Plan,
    models: Models,
    samples: &[Prepared],
) -> Result<Run> {
    let Models {
        text,
        backends: mut from,
        ..
    } = models;
    let ctx = RunContext {
        text: &text,
        samples,
        stop: StopCriteria {
            stop_ids: text.eos_ids.clone(),
            max_new_tokens: args.max_new_tokens,
        },
        sampling: plan.sampling.clone(),
        dataset: plan.dataset_name.clone(),
        drafter: args.models.drafter_label(),
        warmup: args.warmup,
        plot_sample: args.plot.as_ref().map(|_| args.plot_sample),
        trace: args.trace.is_some(),
        prompt_cache: !args.no_prompt_cache,
    };
    let pb = progress_bar((samples.len() * plan.arms.len()) as u64)?;
    let mut run = Run {
        records: Vec::new(),
        plots: Vec::new(),
        traces: Vec::new(),
        exact: Exactness::default(),
        failure: None,
    };
    let result = warm_up(&ctx, plan, &mut from, &args.models, &pb)
        .and_then(|()| run_samples(&ctx, plan, &mut from, &args.models, &pb, &mut run));
    run.failure = result.err();
    pb.finish_and_clear();
    Ok(run)
}

/// Every strategy's warm-up generations, in the order they will run.
fn warm_up(
    ctx: &RunContext,
    plan: &Plan,
    from: &mut Backends,
    m: &ModelArgs,
    pb: &ProgressBar,
) -> Result<()> {
    for &strategy in &plan.strategies {
        pb.set_message(format!("warm-up {}", strategy.name()));
        from.with(strategy, m, pb, |b| ctx.warm_up(b))?;
    }
    Ok(())
}

/// Each sample through every strategy in turn, into `run`; stops at the first error, keeping
/// what was done.
fn run_samples(
    ctx: &RunContext,
    plan: &Plan,
    from: &mut Backends,
    m: &ModelArgs,
    pb: &ProgressBar,
    run: &mut Run,
) -> Result<()> {
    for k in 0..ctx.samples.len() {
        for &arm in &plan.arms {
            let strategy = arm.strategy;
            pb.set_message(format!("{} {}", plan.dataset_name, arm.name()));
            let mut done = Outcome {
                records: Vec::new(),
                plot: None,
                traces: Vec::new(),
            };
            let result = from.with(strategy, m, pb, |b| {
                ctx.run_sample(b, arm, k, pb, &mut run.exact, &mut done)
            });
            if strategy == Strategy::Ar {
                run.exact.adopt_reference(&done.records);
            }
            run.records.extend(done.records);
            run.plots.extend(done.plot.map(|p| (strategy, p)));
            run.traces.extend(done.traces);
            pb.inc(1);
            result?;
        }
    }
    Ok(())
}

pub(super) fn progress_bar(len: u64) -> Result<ProgressBar> {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>14} [{bar:30}] {pos}/{len} samples, {elapsed_precise} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    Ok(pb)
}

/// Writes the records and the plot, prints the table, and says whether every output equalled ar's.
pub(super) fn conclude(
    args: &BenchArgs,
    plan: &Plan,
    samples: &[Prepared],
    run: Run,
) -> Result<ExitCode> {
    if let Some(path) = &args.output {
        write_records(path, &run.records)?;
    }
    if let Some(path) = &args.trace {
        trace_lines::write(path, &run.traces)?;
    }
    if let Some(e) = run.failure {
        let kept = match &args.output {
            Some(p) if !run.records.is_empty() => format!(
                " ({} finished generations written to {})",
                run.records.len(),
                p.display()
            ),
            _ => String::new(),
        };
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("amusd: interrupted{kept}");
            return Ok(ExitCode::from(130));
        }
        return Err(e.context(format!("bench stopped{kept}")));
    }
    if let Some(path) = &args.plot {
        write_plot(path, args, plan, samples, &run.plots)?;
    }
    print!("{}", render_report(&summarize(&run.records), false));
    let checked = run
        .records
        .iter()
        .filter(|r| {
            r.strategy != "ar" && run.exact.reference.contains_key(&(r.sample_index, r.turn))
        })
        .count();
    if !run.exact.mismatches.is_empty() {
        eprintln!(
            "amusd: exactness FAILED: {} of {checked} outputs differ from ar's (listed above)",
            run.exact.mismatches.len()
        );
        return Ok(ExitCode::from(1));
    }
    if checked > 0 {
        eprintln!("amusd: exactness: all {checked} sd/amusd outputs equal ar's");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn write_plot(
    path: &std::path::Path,
    args: &BenchArgs,
    plan: &Plan,
    samples: &[Prepared],
    plots: &[(Strategy, (Generation, Trace))],
) -> Result<()> {
    let s = &samples[args.plot_sample].sample;
    let title = format!(
        "{} sample {} ({}), turn 1, max {} new tokens",
        plan.dataset_name, s.index, s.id, args.max_new_tokens
    );
    let plots: Vec<_> = plots
        .iter()
        .map(|(st, (g, t))| build_plot(*st, g, t))
        .collect();
    write_output(path, &render_svg(&title, &plots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_names_the_first_difference() {
        let s = Sample {
            index: 3,
            id: "x".into(),
            conversation: vec![],
            follow_ups: vec![],
        };
        assert!(mismatch("sd", &s, 1, &[1, 2], &[1, 2]).is_none());
        let m = mismatch("sd", &s, 1, &[1, 2, 3], &[1, 5]).unwrap_or_default();
        assert!(
            m.contains("position 1") && m.starts_with("sd output"),
            "{m}"
        );
        let m = mismatch("sd", &s, 1, &[1, 2], &[1, 2, 3]).unwrap_or_default();
        assert!(m.contains("position 2") && m.contains("the end"), "{m}");
    }
}
