//! The README's results table is what `amusd report --markdown` prints for the committed results,
//! so the two cannot drift apart. After rerunning the benchmark, regenerate the table with the
//! command in the README's marker line.

use std::path::Path;
use std::time::Duration;

/// The marker line before the table: `<!-- amusd report --markdown FILE... -->`.
const MARKER: &str = "<!-- amusd report --markdown ";

fn table_lines(text: &str) -> Vec<&str> {
    text.lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect()
}

#[test]
fn readme_results_table_equals_the_report_of_the_committed_results() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let (_, after) = readme
        .split_once(MARKER)
        .expect("the README has a results table marked `<!-- amusd report --markdown FILE... -->`");
    let (files, table) = after
        .split_once("-->")
        .expect("the marker line ends with -->");
    let files: Vec<String> = files
        .split_whitespace()
        .map(|f| root.join(f).display().to_string())
        .collect();
    assert!(!files.is_empty(), "the marker names no result file");
    let mut args = vec!["report", "--markdown"];
    args.extend(files.iter().map(String::as_str));
    let run = amusd_e2e::amusd_run(&args, Duration::from_secs(60));
    assert!(run.status.success(), "{}", run.describe());
    let want = table_lines(&run.stdout);
    assert!(want.len() > 2, "the report has no table:\n{}", run.stdout);
    assert_eq!(
        table_lines(table),
        want,
        "README.md's results table differs from `amusd report --markdown` of {files:?}; \
         replace it with the report's table"
    );
}
