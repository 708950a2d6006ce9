//! The `sightline gate` binary: exit code 4 with a clear message when the collector cannot be
//! reached or the config is bad, and its help states every exit code. (Verdicts and formats
//! against a real collector: tests/gate.rs.)

use std::process::Command;

#[test]
fn errors_exit_4_with_a_message_and_help_lists_the_exit_codes() {
    let gate = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sightline"))
            .args([
                "gate",
                "--service",
                "chat",
                "--baseline",
                "1.4.2",
                "--candidate",
                "1.5.0",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let unreachable = gate(&["--url", "http://127.0.0.1:9"]);
    assert_eq!(unreachable.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        stderr.contains("cannot reach the collector at http://127.0.0.1:9"),
        "{stderr}"
    );
    assert!(unreachable.stdout.is_empty(), "no report on error");

    let missing = gate(&["--config", "/nonexistent/gate.toml"]);
    assert_eq!(missing.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("gate config /nonexistent/gate.toml does not exist"));

    let help = Command::new(env!("CARGO_BIN_EXE_sightline"))
        .args(["gate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for code in ["0 pass", "1 fail", "2 warn", "3 inconclusive", "4 error"] {
        assert!(help.contains(code), "{code} missing from:\n{help}");
    }
    for flag in [
        "--format",
        "--output",
        "--fail-on-warn",
        "--config",
        "--from",
        "--to",
        "--url",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
