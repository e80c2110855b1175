//! The quic-reverse crate's own `edge` and `relay` examples, with `quic_reverse` renamed to
//! `backhaul`, must build and run against this crate.
//!
//! The examples are not ours to copy into the project, so `scripts/check-reference-examples.sh`
//! copies them from `../shared/reference/quic-reverse-examples` into a throwaway crate at test
//! time, builds them against backhaul and runs relay + edge on 127.0.0.1. This test runs that
//! script; it is skipped (with a message) only when `../shared/reference` is absent, and
//! then only outside CI.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

#[test]
fn reference_examples_build_and_run_against_backhaul() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference = repo.join("../shared/reference");
    if !reference.is_dir() {
        let why = format!(
            "{} is absent, so the reference examples cannot be checked",
            reference.display()
        );
        // `.ci/run` sets CI: there, ../shared is beside the clone and must be used.
        assert!(std::env::var_os("CI").is_none(), "{why}");
        println!("SKIPPED: {why}");
        return;
    }
    let script = repo.join("scripts/check-reference-examples.sh");
    let started = Instant::now();
    // The script bounds its own build and run with `timeout`.
    let output = Command::new("bash")
        .arg(&script)
        .current_dir(repo)
        .output()
        .expect("run scripts/check-reference-examples.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    eprintln!("reference example check took {:.1?}", started.elapsed());
    assert!(
        output.status.success(),
        "scripts/check-reference-examples.sh failed ({}); see its output above",
        output.status
    );
}
