//! The benchmark's datasets: HumanEval, MT-Bench (both turns), the RefactorChat stand-in, or a
//! JSONL file of conversations (see the module doc of `bench`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use amusd_model::chat::Message;
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Which dataset `--dataset` names.
#[derive(Clone, Debug)]
pub(super) enum Dataset {
    HumanEval,
    MtBench,
    /// The deterministic RefactorChat stand-in built from HumanEval.
    RefactorStandIn,
    File(PathBuf),
}

/// One sample: a conversation ending with a user turn, then user turns asked after the model's own
/// answer (MT-Bench's second turn).
#[derive(Clone, Debug)]
pub(super) struct Sample {
    /// Index in the dataset (kept when earlier samples are skipped).
    pub(super) index: usize,
    /// The dataset's own name for it (task id, question id, line number).
    pub(super) id: String,
    pub(super) conversation: Vec<Message>,
    pub(super) follow_ups: Vec<String>,
}

impl Dataset {
    pub(super) fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "humaneval" => Self::HumanEval,
            "mt-bench" | "mt_bench" | "mtbench" => Self::MtBench,
            "refactor" | "refactor-standin" => Self::RefactorStandIn,
            _ => {
                let path = PathBuf::from(s);
                if !path.is_file() {
                    bail!(
                        "unknown dataset '{s}': expected humaneval, mt-bench, refactor, or a JSONL file (no file {s})"
                    );
                }
                Self::File(path)
            }
        })
    }

    /// The name recorded in results. The stand-in says so.
    pub(super) fn name(&self) -> String {
        match self {
            Self::HumanEval => "humaneval".into(),
            Self::MtBench => "mt-bench".into(),
            Self::RefactorStandIn => "refactor-standin".into(),
            Self::File(p) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
        }
    }

    pub(super) fn load(&self) -> Result<Vec<Sample>> {
        match self {
            Self::HumanEval => Ok(humaneval_tasks()?
                .into_iter()
                .enumerate()
                .map(|(index, t)| Sample {
                    index,
                    id: t.task_id,
                    conversation: vec![Message::user(format!(
                        "Complete the following Python function:\n```python\n{}```",
                        t.prompt
                    ))],
                    follow_ups: Vec::new(),
                })
                .collect()),
            Self::MtBench => mt_bench(),
            Self::RefactorStandIn => Ok(refactor_standin(&humaneval_tasks()?)),
            Self::File(path) => conversation_file(path),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct HumanEvalTask {
    pub(super) task_id: String,
    pub(super) prompt: String,
    pub(super) canonical_solution: String,
}

/// Makes sure a fetched dataset file is there, fetching it on first use.
pub(super) fn ensure_asset(path: &Path, asset: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    let hint = format!(
        "run scripts/fetch-assets.sh {asset}, or put the file at {} by hand",
        path.display()
    );
    if crate::assets::fetch(&[asset]).is_err() || !path.is_file() {
        bail!(
            "the {asset} dataset is missing at {} and could not be fetched; {hint}",
            path.display()
        );
    }
    Ok(())
}

/// Parses one JSON value per non-blank line. Any unreadable line (bad gzip, bad UTF-8, bad JSON)
/// fails with the line number and `fix`, the way to repair it.
pub(super) fn read_jsonl<T: DeserializeOwned>(
    reader: impl BufRead,
    path: &Path,
    fix: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| {
            anyhow::anyhow!(
                "{} is unreadable at line {} ({e}); {fix}",
                path.display(),
                i + 1
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{} is malformed at line {} ({e}); {fix}",
                path.display(),
                i + 1
            )
        })?;
        out.push(value);
    }
    if out.is_empty() {
        bail!("{} holds no samples; {fix}", path.display());
    }
    Ok(out)
}

pub(super) fn dataset_path(rel: &str) -> PathBuf {
    amusd_model::paths::amusd_home().join("datasets").join(rel)
}

/// How to repair a fetched dataset that does not parse.
pub(super) fn refetch_hint(asset: &str) -> String {
    format!("delete it and run scripts/fetch-assets.sh {asset}")
}

/// Reads a fetched dataset (`rel` under `$AMUSD_HOME/datasets`, gzipped if it ends in `.gz`),
/// fetching it first when it is missing.
pub(super) fn read_dataset<T: DeserializeOwned>(rel: &str, asset: &str) -> Result<Vec<T>> {
    let path = dataset_path(rel);
    ensure_asset(&path, asset)?;
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let fix = refetch_hint(asset);
    if rel.ends_with(".gz") {
        let gz = flate2::read::GzDecoder::new(file);
        read_jsonl(BufReader::new(gz), &path, &fix)
    } else {
        read_jsonl(BufReader::new(file), &path, &fix)
    }
}

pub(super) fn humaneval_tasks() -> Result<Vec<HumanEvalTask>> {
    read_dataset("HumanEval.jsonl.gz", "humaneval")
}

#[derive(Deserialize)]
pub(super) struct MtBenchQuestion {
    pub(super) question_id: serde_json::Value,
    #[serde(default)]
    pub(super) category: Option<String>,
    pub(super) turns: Vec<String>,
}

pub(super) fn mt_bench() -> Result<Vec<Sample>> {
    let rel = "mt_bench/question.jsonl";
    let questions: Vec<MtBenchQuestion> = read_dataset(rel, "mt-bench")?;
    questions
        .into_iter()
        .enumerate()
        .map(|(index, q)| {
            let mut turns = q.turns.into_iter();
            let Some(first) = turns.next() else {
                bail!(
                    "{}: question {} has no turns; {}",
                    dataset_path(rel).display(),
                    q.question_id,
                    refetch_hint("mt-bench")
                );
            };
            let id = match (&q.question_id, q.category) {
                (serde_json::Value::String(s), Some(c)) => format!("{s} ({c})"),
                (v, Some(c)) => format!("{v} ({c})"),
                (serde_json::Value::String(s), None) => s.clone(),
                (v, None) => v.to_string(),
            };
            Ok(Sample {
                index,
                id,
                conversation: vec![Message::user(first)],
                follow_ups: turns.collect(),
            })
        })
        .collect()
}

/// What the stand-in asks for, in rotation.
pub(super) const REFACTOR_ASKS: [&str; 6] = [
    "Rename the variables to be more descriptive.",
    "Add type hints and a docstring.",
    "Extract a helper function.",
    "Rewrite the loops as comprehensions where that keeps the code readable.",
    "Add input validation that raises ValueError on bad arguments.",
    "Add a short comment before each step explaining what it does.",
];

/// The RefactorChat stand-in: sample `i` pastes HumanEval task `i`'s reference solution and asks for
/// `1 + i % 3` refactorings in turn; earlier assistant turns are canned and re-paste the code.
pub(super) fn refactor_standin(tasks: &[HumanEvalTask]) -> Vec<Sample> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let code = format!("{}{}", t.prompt, t.canonical_solution);
            let asks: Vec<&str> = (0..1 + i % 3)
                .map(|k| REFACTOR_ASKS[(i + k) % REFACTOR_ASKS.len()])
                .collect();
            let mut conversation = vec![Message::user(format!(
                "Here is a Python function:\n\n```python\n{code}```\n\n{}",
                asks[0]
            ))];
            for ask in &asks[1..] {
                conversation.push(Message::assistant(format!(
                    "Here is the updated function:\n\n```python\n{code}```"
                )));
                conversation.push(Message::user(*ask));
            }
            Sample {
                index: i,
                id: format!(
                    "{} (stand-in, {} turn{})",
                    t.task_id,
                    asks.len(),
                    if asks.len() > 1 { "s" } else { "" }
                ),
                conversation,
                follow_ups: Vec::new(),
            }
        })
        .collect()
}

#[derive(Deserialize)]
pub(super) struct ConversationLine {
    pub(super) conversation: Vec<Message>,
}

pub(super) fn conversation_file(path: &Path) -> Result<Vec<Sample>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let fix =
        r#"expected one {"conversation": [{"role": ..., "content": ...}, ...]} object a line"#;
    let lines: Vec<ConversationLine> = read_jsonl(BufReader::new(file), path, fix)?;
    lines
        .into_iter()
        .enumerate()
        .map(|(index, l)| {
            let mut conversation = l.conversation;
            if let Some(last) = conversation.iter().rposition(|m| m.role == "assistant") {
                conversation.truncate(last);
            }
            if conversation.is_empty() {
                bail!(
                    "{}: conversation {} has no turn before its last assistant turn; {fix}",
                    path.display(),
                    index + 1
                );
            }
            Ok(Sample {
                index,
                id: format!("line {}", index + 1),
                conversation,
                follow_ups: Vec::new(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refactor_standin_is_deterministic_and_ends_with_a_user_turn() {
        let tasks: Vec<HumanEvalTask> = (0..5)
            .map(|i| HumanEvalTask {
                task_id: format!("HumanEval/{i}"),
                prompt: format!("def f{i}(x):\n"),
                canonical_solution: "    return x\n".into(),
            })
            .collect();
        let a = refactor_standin(&tasks);
        let b = refactor_standin(&tasks);
        for (s, t) in a.iter().zip(&b) {
            assert_eq!(s.conversation, t.conversation);
            assert_eq!(s.conversation.last().map(|m| m.role.as_str()), Some("user"));
            assert!(s.conversation[0].content.contains("    return x"));
        }
        assert_eq!(a[0].conversation.len(), 1);
        assert_eq!(a[2].conversation.len(), 5);
    }
}
