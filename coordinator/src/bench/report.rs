//! `amusd report`, and the table `amusd bench` prints: records grouped by dataset and strategy.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::{bail, Result};

use super::records::{read_records, row_label, Record, RecordMetrics};
use super::ReportArgs;

/// One line of the table: a strategy on a dataset.
pub(super) struct Row {
    pub(super) dataset: String,
    pub(super) strategy: String,
    pub(super) samples: usize,
    pub(super) generations: usize,
    pub(super) ttft_ms: f64,
    pub(super) ms_per_token: Option<f64>,
    /// Some record predates `decode_tokens`: its ms/token divides by `tokens - 1`.
    pub(super) old_denominator: bool,
    pub(super) speedup_ar: Option<f64>,
    pub(super) speedup_sd: Option<f64>,
    /// Generated tokens over request time, pooled.
    pub(super) e2e_tokens_per_s: Option<f64>,
    pub(super) e2e_speedup_ar: Option<f64>,
    /// Draft forwards, tokens offered to the verify model, tokens it accepted; summed.
    pub(super) drafting: Option<(usize, usize, usize)>,
    pub(super) acceptance: Option<f64>,
    pub(super) tokens_per_step: Option<f64>,
    pub(super) rollbacks_per_100: Option<f64>,
    /// Of the accepted draft tokens, the share drafted by prompt lookup (rows that used it).
    pub(super) from_lookup: Option<f64>,
    /// Generations equal to ar's, of those that have an ar counterpart.
    pub(super) identical: Option<(usize, usize)>,
}

pub(super) fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

pub(super) fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Groups records by dataset (in order of appearance) and strategy (ar, sd, amusd, then others).
pub(super) fn summarize(records: &[Record]) -> Vec<Row> {
    let mut datasets: Vec<String> = Vec::new();
    for r in records {
        if !datasets.contains(&r.group()) {
            datasets.push(r.group());
        }
    }
    let mut rows = Vec::new();
    for ds in &datasets {
        let of_ds: Vec<&Record> = records.iter().filter(|r| &r.group() == ds).collect();
        let group = Group::new(&of_ds);
        for st in strategies_of(&of_ds) {
            rows.push(group.row(ds, &st, &of_ds));
        }
    }
    rows
}

/// The rows of a dataset's records, one per strategy and drafter ([`Record::row`]): ar, sd,
/// amusd (model drafts), then any other in order of appearance.
fn strategies_of(records: &[&Record]) -> Vec<String> {
    let mut strategies: Vec<String> = Vec::new();
    for known in ["ar", "sd", "amusd"] {
        if records.iter().any(|r| r.row() == known) {
            strategies.push(known.into());
        }
    }
    for r in records {
        if !strategies.contains(&r.row()) {
            strategies.push(r.row());
        }
    }
    strategies
}

/// What every row of one dataset is compared with: ar's tokens and rates, and sd's.
struct Group<'r> {
    reference: HashMap<(usize, usize), &'r Vec<u32>>,
    ar_ms: Option<f64>,
    ar_e2e: Option<f64>,
}

/// The mean ms/token a row is compared with: sd drafting as the row's records did (`amusd [X]`
/// with `sd [X]`), so the ratio is AMUSD's own gain; rows without such a twin (ar, or an sd run
/// with another drafter only) compare with sd's model-drafted row.
fn sd_twin(records: &[&Record], gens: &[&&Record]) -> Option<f64> {
    let drafter = gens.first().map_or("", |r| r.drafter.as_str());
    decode_mean(records, &row_label("sd", drafter)).or_else(|| decode_mean(records, "sd"))
}

/// Generated tokens over request time (prompt processing included), pooled over `strategy`'s
/// generations.
fn e2e_rate(records: &[&Record], strategy: &str) -> Option<f64> {
    let (tokens, secs) = records
        .iter()
        .filter(|r| r.row() == strategy)
        .fold((0usize, 0.0), |(n, t), r| {
            (n + r.metrics.tokens_generated, t + r.metrics.total_time)
        });
    (secs > 0.0).then(|| tokens as f64 / secs)
}

/// Mean decode ms/token of `strategy`'s generations.
fn decode_mean(records: &[&Record], strategy: &str) -> Option<f64> {
    mean(
        records
            .iter()
            .filter(|r| r.row() == strategy)
            .filter_map(|r| r.metrics.decode_ms_per_token),
    )
}

impl<'r> Group<'r> {
    fn new(records: &[&'r Record]) -> Self {
        Self {
            reference: records
                .iter()
                .filter(|r| r.strategy == "ar")
                .map(|r| ((r.sample_index, r.turn), &r.metrics.tokens))
                .collect(),
            ar_ms: decode_mean(records, "ar"),
            ar_e2e: e2e_rate(records, "ar"),
        }
    }

    fn row(&self, ds: &str, st: &str, records: &[&Record]) -> Row {
        let gens: Vec<&&Record> = records.iter().filter(|r| r.row() == st).collect();
        let sum =
            |f: fn(&RecordMetrics) -> usize| gens.iter().map(|r| f(&r.metrics)).sum::<usize>();
        let tokens = sum(|m| m.tokens_generated);
        let ms = decode_mean(records, st);
        let speedup = |base: Option<f64>| match (base, ms) {
            (Some(b), Some(v)) if v > 0.0 => Some(b / v),
            _ => None,
        };
        let compared: Vec<bool> = gens
            .iter()
            .filter_map(|r| {
                self.reference
                    .get(&(r.sample_index, r.turn))
                    .map(|want| **want == r.metrics.tokens)
            })
            .collect();
        let drafts = st != "ar";
        let e2e = e2e_rate(records, st);
        Row {
            dataset: ds.to_string(),
            strategy: st.to_string(),
            samples: gens
                .iter()
                .map(|r| r.sample_index)
                .collect::<BTreeSet<_>>()
                .len(),
            generations: gens.len(),
            ttft_ms: mean(gens.iter().map(|r| r.metrics.ttft * 1e3)).unwrap_or(0.0),
            ms_per_token: ms,
            old_denominator: drafts && gens.iter().any(|r| r.metrics.decode_tokens.is_none()),
            speedup_ar: speedup(self.ar_ms),
            speedup_sd: speedup(sd_twin(records, &gens)),
            e2e_tokens_per_s: e2e,
            e2e_speedup_ar: match (e2e, self.ar_e2e) {
                (Some(v), Some(b)) if b > 0.0 => Some(v / b),
                _ => None,
            },
            drafting: drafts.then(|| {
                (
                    sum(|m| m.draft_times.len()),
                    sum(|m| m.proposed),
                    sum(|m| m.accepted),
                )
            }),
            acceptance: drafts
                .then(|| ratio(sum(|m| m.accepted), sum(|m| m.proposed)))
                .flatten(),
            tokens_per_step: ratio(tokens, sum(|m| m.verify_steps)),
            rollbacks_per_100: drafts
                .then(|| ratio(100 * sum(|m| m.rollbacks), tokens))
                .flatten(),
            from_lookup: (sum(|m| m.proposed_lookup) > 0)
                .then(|| ratio(sum(|m| m.accepted_lookup), sum(|m| m.accepted)))
                .flatten(),
            identical: (drafts && !compared.is_empty()).then(|| {
                (
                    compared.iter().filter(|&&same| same).count(),
                    compared.len(),
                )
            }),
        }
    }
}

/// What the columns mean; printed under every table.
const FOOTNOTE: &str = "ms/token: decode time after the first commit / tokens committed after it, arithmetic mean \
over generations (an mt-bench turn is one generation); * marks rows with records written before that \
definition, which divided by tokens - 1 and so counted sd's first-round tokens, committed inside the ttft, \
as decoded (flattering sd). speedup = mean ms/token of ar (of sd) / this strategy's. ttft includes prefill: of the whole \
prompt, or where records have cached_prompt_tokens (a conversation's later turns), of the rest. \
e2e tokens/s: generated tokens / request time, prompt processing included, pooled over generations; \
e2e vs ar: its ratio to ar's. draft fwd: draft forward passes (one per drafted token); offered: draft tokens \
given to a verify step (sd: every drafted token; amusd: the valid ones beyond the committed tokens that a \
verify step took; the rest were drafted too far ahead or rolled back); accepted: offered tokens the verify \
model accepted; all three summed over generations. accept = accepted / offered and tokens/step = tokens / \
verify forwards, both pooled; from lookup = accepted tokens drafted by prompt lookup / all accepted; \
[lookup MIN-MAX]: prompt lookup drafts alone, [model+lookup MIN-MAX]: ahead of the draft model, \
+history: with the n-gram history across requests (its tokens count as the model's in from lookup); \
identical = generations token-for-token equal to ar's.";

const HEADER: [&str; 17] = [
    "dataset",
    "strategy",
    "samples",
    "ttft ms",
    "ms/token",
    "speedup vs ar",
    "speedup vs sd",
    "e2e tokens/s",
    "e2e vs ar",
    "draft fwd",
    "offered",
    "accepted",
    "accept",
    "tokens/step",
    "rollbacks/100 tok",
    "from lookup",
    "identical",
];

/// The table, as aligned text or GitHub markdown, with the footnote.
pub(super) fn render_report(rows: &[Row], markdown: bool) -> String {
    let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
    let mut out = if markdown {
        markdown_table(&body)
    } else {
        text_table(&body, rows)
    };
    let _ = writeln!(out, "\n{FOOTNOTE}");
    out
}

fn cells(r: &Row) -> Vec<String> {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("—".to_string(), f);
    vec![
        r.dataset.clone(),
        r.strategy.clone(),
        if r.generations == r.samples {
            r.samples.to_string()
        } else {
            format!("{} ({} gens)", r.samples, r.generations)
        },
        format!("{:.0}", r.ttft_ms),
        opt(r.ms_per_token, &|v| {
            format!("{v:.1}{}", if r.old_denominator { "*" } else { "" })
        }),
        opt(r.speedup_ar, &|v| format!("{v:.2}×")),
        opt(r.speedup_sd, &|v| format!("{v:.2}×")),
        opt(r.e2e_tokens_per_s, &|v| format!("{v:.1}")),
        opt(r.e2e_speedup_ar, &|v| format!("{v:.2}×")),
        count(r.drafting.map(|d| d.0)),
        count(r.drafting.map(|d| d.1)),
        count(r.drafting.map(|d| d.2)),
        opt(r.acceptance, &|v| format!("{:.1}%", 100.0 * v)),
        opt(r.tokens_per_step, &|v| format!("{v:.2}")),
        opt(r.rollbacks_per_100, &|v| format!("{v:.1}")),
        opt(r.from_lookup, &|v| format!("{:.1}%", 100.0 * v)),
        r.identical
            .map_or("—".to_string(), |(n, of)| format!("{n}/{of}")),
    ]
}

fn count(v: Option<usize>) -> String {
    v.map_or("—".to_string(), |n| n.to_string())
}

fn markdown_table(body: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", HEADER.join(" | "));
    let align: Vec<&str> = (0..HEADER.len())
        .map(|i| if i < 2 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for row in body {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// Columns padded to their widest cell (names left, figures right), a blank line between datasets.
fn text_table(body: &[Vec<String>], rows: &[Row]) -> String {
    let widths: Vec<usize> = (0..HEADER.len())
        .map(|i| {
            body.iter()
                .map(|r| r[i].chars().count())
                .chain([HEADER[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = " ".repeat(widths[i] - c.chars().count());
            if i < 2 {
                s.push_str(c);
                s.push_str(&pad);
            } else {
                s.push_str(&pad);
                s.push_str(c);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string()
    };
    let mut out = String::new();
    let head: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
    let _ = writeln!(out, "{}", line(&head));
    let mut last_dataset = None;
    for (row, r) in body.iter().zip(rows) {
        if last_dataset.is_some_and(|d| d != r.dataset.as_str()) {
            out.push('\n');
        }
        last_dataset = Some(r.dataset.as_str());
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

pub fn report(args: ReportArgs) -> Result<ExitCode> {
    crate::output::die_on_closed_stdout();
    let mut records = Vec::new();
    for path in &args.results {
        records.extend(read_records(path)?);
    }
    if records.is_empty() {
        bail!(
            "no records in {}",
            args.results
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut out = std::io::stdout().lock();
    out.write_all(render_report(&summarize(&records), args.markdown).as_bytes())?;
    writeln!(out, "\n{}", commits_line(&records))?;
    Ok(ExitCode::SUCCESS)
}

/// Which code the records were measured with: the commits their binaries were built from.
fn commits_line(records: &[Record]) -> String {
    let mut named: Vec<&str> = records
        .iter()
        .map(|r| r.commit.as_str())
        .filter(|c| !c.is_empty())
        .collect();
    let unnamed = named.len() < records.len();
    named.sort_unstable();
    named.dedup();
    match (named.is_empty(), unnamed) {
        (true, _) => "Built from: not recorded.".into(),
        (false, false) => format!("Built from commit {}.", named.join(", ")),
        (false, true) => format!(
            "Built from commit {} (some records do not say).",
            named.join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::records::{tokens_hash, SamplingRecord};

    fn record(strategy: &str, sample: usize, ms: f64, tokens: Vec<u32>) -> Record {
        Record {
            sample_index: sample,
            sample_id: String::new(),
            turn: 1,
            strategy: strategy.into(),
            drafter: String::new(),
            dataset: "d".into(),
            prompt_tokens: 10,
            finish_reason: "length".into(),
            sampling: SamplingRecord::default(),
            metrics: RecordMetrics {
                total_time: 1.0,
                tokens_generated: tokens.len(),
                time_per_token: Some(0.1),
                draft_times: vec![],
                verify_times: vec![],
                accepted_tokens: vec![],
                ttft: 0.1,
                decode_ms_per_token: Some(ms),
                decode_tokens: Some(tokens.len().saturating_sub(1)),
                acceptance_rate: 0.5,
                proposed: 4,
                accepted: 2,
                verify_steps: 2,
                rollbacks: 1,
                proposed_lookup: 0,
                accepted_lookup: 0,
                cached_prompt_tokens: 0,
                tokens_hash: tokens_hash(&tokens),
                tokens,
            },
            commit: "abc1234".into(),
        }
    }

    #[test]
    fn records_without_decode_tokens_are_marked() {
        let mut old = record("sd", 0, 20.0, vec![1, 2, 3, 4]);
        old.metrics.decode_tokens = None;
        let rows = summarize(&[record("ar", 0, 40.0, vec![1, 2, 3, 4]), old]);
        assert!(!rows[0].old_denominator && rows[1].old_denominator);
        assert!(render_report(&rows, true).contains("| 20.0* |"));
    }

    /// Each drafter gets its own row beside the model-drafted ones, with its share of accepted
    /// tokens from the lookup; records from before the drafter field count as model drafts.
    #[test]
    fn report_has_a_row_per_drafter_with_the_lookup_share() {
        let mut lookup = record("amusd", 0, 5.0, vec![1, 2, 3, 4]);
        lookup.drafter = "lookup 2-4".into();
        (
            lookup.metrics.proposed_lookup,
            lookup.metrics.accepted_lookup,
        ) = (4, 2);
        let mut model = record("amusd", 0, 10.0, vec![1, 2, 3, 4]);
        model.drafter = "model".into();
        let rows = summarize(&[
            record("ar", 0, 40.0, vec![1, 2, 3, 4]),
            model,
            lookup,
            record("amusd", 1, 10.0, vec![5]),
        ]);
        let names: Vec<&str> = rows.iter().map(|r| r.strategy.as_str()).collect();
        assert_eq!(names, ["ar", "amusd", "amusd [lookup 2-4]"]);
        assert_eq!(rows[1].generations, 2, "an old record is a model draft");
        assert_eq!(rows[2].speedup_ar, Some(8.0));
        assert_eq!(rows[2].from_lookup, Some(1.0));
        assert_eq!(rows[1].from_lookup, None);
        let md = render_report(&rows, true);
        assert!(md.contains("| d | amusd [lookup 2-4] |"), "{md}");
        assert!(md.contains("| 100.0% |"), "{md}");
    }

    /// `amusd [X]` is compared with `sd [X]`, AMUSD's own gain; without that twin, with sd.
    #[test]
    fn speedup_vs_sd_compares_rows_with_the_same_drafter() {
        let with = |st: &str, ms: f64, drafter: &str| {
            let mut r = record(st, 0, ms, vec![1, 2]);
            r.drafter = drafter.into();
            r
        };
        let rows = summarize(&[
            record("ar", 0, 40.0, vec![1, 2]),
            with("sd", 30.0, "model+lookup 2-4"),
            with("amusd", 10.0, "model+lookup 2-4"),
            with("amusd", 8.0, "lookup 2-4"),
        ]);
        let names: Vec<&str> = rows.iter().map(|r| r.strategy.as_str()).collect();
        assert_eq!(
            names,
            [
                "ar",
                "sd [model+lookup 2-4]",
                "amusd [model+lookup 2-4]",
                "amusd [lookup 2-4]"
            ]
        );
        assert_eq!(rows[1].speedup_sd, Some(1.0));
        assert_eq!(rows[2].speedup_sd, Some(3.0));
        assert_eq!(rows[3].speedup_sd, None, "no sd twin and no plain sd row");
        let rows = summarize(&[
            record("sd", 0, 20.0, vec![1, 2]),
            with("amusd", 10.0, "lookup 2-4"),
        ]);
        assert_eq!(
            rows[1].speedup_sd,
            Some(2.0),
            "falls back to the model-drafted sd"
        );
    }

    #[test]
    fn report_computes_speedups_and_identity() {
        let rows = summarize(&[
            record("ar", 0, 40.0, vec![1, 2, 3, 4]),
            record("sd", 0, 20.0, vec![1, 2, 3, 4]),
            record("amusd", 0, 10.0, vec![1, 2, 9, 4]),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].speedup_ar, Some(2.0));
        assert_eq!(rows[2].speedup_sd, Some(2.0));
        assert_eq!(rows[1].identical, Some((1, 1)));
        assert_eq!(rows[2].identical, Some((0, 1)));
        assert_eq!(rows[0].acceptance, None);
        assert_eq!(rows[1].drafting, Some((0, 4, 2)));
        assert_eq!(rows[0].drafting, None);
        // 4 tokens in 1 s each: every strategy's e2e rate is 4 tokens/s.
        assert_eq!(rows[2].e2e_tokens_per_s, Some(4.0));
        assert_eq!(rows[2].e2e_speedup_ar, Some(1.0));
        assert!(!rows[1].old_denominator);
        let md = render_report(&rows, true);
        assert!(md.contains("| d | amusd |"));
    }

    #[test]
    fn the_commits_line_names_each_commit_once_and_says_when_some_are_missing() {
        let a = record("ar", 0, 10.0, vec![1]);
        let mut b = a.clone();
        b.commit = "def5678-modified".into();
        assert_eq!(
            commits_line(&[a.clone(), b.clone(), a.clone()]),
            "Built from commit abc1234, def5678-modified."
        );
        let mut old = a.clone();
        old.commit.clear();
        assert_eq!(
            commits_line(&[a, old.clone()]),
            "Built from commit abc1234 (some records do not say)."
        );
        assert_eq!(commits_line(&[old]), "Built from: not recorded.");
    }
}
