//! Embeds the commit the binary was built from (`AMUSD_COMMIT`): `amusd --version` prints it and
//! every `amusd bench` record carries it, so a figure names the code that produced it.

use std::process::Command;

/// Sources whose change makes the embedded "-modified" flag stale.
const WATCHED: [&str; 9] = [
    "../amusd-model/src",
    "../amusd-proc/src",
    "../amusd-shm/src",
    "../amusd-spec/src",
    "../amusd-server/src",
    "../draft-worker/src",
    "../verify-worker/src",
    "src",
    "../Cargo.lock",
];

fn git(args: &[&str]) -> Option<std::process::Output> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
}

fn main() {
    let commit = git(&["rev-parse", "--short=7", "HEAD"])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    // Only code counts: results/ and the README change after a measurement without changing it.
    let modified = git(&[
        "status",
        "--porcelain",
        "--",
        "*.rs",
        "*.toml",
        "Cargo.lock",
    ])
    .is_some_and(|o| !o.stdout.is_empty());
    let suffix = if modified { "-modified" } else { "" };
    println!("cargo:rustc-env=AMUSD_COMMIT={commit}{suffix}");
    for path in WATCHED {
        println!("cargo:rerun-if-changed={path}");
    }
    // A commit or checkout moves HEAD or the branch it names; packed refs cover `git gc`.
    for path in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
