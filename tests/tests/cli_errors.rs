//! `husk run` refuses bad input before it starts anything (no KVM needed).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use husk_tests::{bin, run_with_timeout};

fn husk(args: &[&str]) -> husk_tests::Finished {
    run_with_timeout(
        Command::new(bin("husk")).args(args),
        Duration::from_secs(30),
    )
}

#[test]
fn out_of_range_values_and_missing_commands_are_one_line_errors() {
    for (args, expected) in [
        (
            &["run", "--cpus", "0", "--", "true"][..],
            "--cpus 0 is out of range",
        ),
        (
            &["run", "--cpus", "64", "--", "true"][..],
            "--cpus 64 is out of range",
        ),
        (
            &["run", "--memory", "16", "--", "true"][..],
            "--memory 16 MiB is out of range",
        ),
        (&["run", "--"][..], "no command given"),
        (&["frob"][..], "unknown command"),
    ] {
        let run = husk(args);
        assert_eq!(run.code(), Some(125), "{args:?}: {}", run.stderr());
        assert!(
            run.stderr().starts_with("husk: error: "),
            "{args:?}: {}",
            run.stderr()
        );
        assert!(
            run.stderr().contains(expected),
            "{args:?}: {}",
            run.stderr()
        );
    }
}

#[test]
fn a_missing_kernel_names_the_path_and_the_fix() {
    let run = husk(&["run", "--kernel", "/no/such/vmlinux", "--", "true"]);
    assert_eq!(run.code(), Some(125));
    assert!(
        run.stderr().contains("/no/such/vmlinux"),
        "{}",
        run.stderr()
    );
    assert!(
        run.stderr().contains("scripts/build-kernel"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_command_too_long_for_the_kernel_command_line_is_refused() {
    let long = "x".repeat(4000);
    let run = husk(&["run", "--", "echo", &long]);
    assert_eq!(run.code(), Some(125));
    assert!(
        run.stderr()
            .contains("too long for the kernel command line"),
        "{}",
        run.stderr()
    );
}
