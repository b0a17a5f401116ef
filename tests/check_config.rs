//! `sendwell check-config` prints the effective configuration as a config file: saved, it loads
//! and prints the same again (the round trip of every field is checked in `config`'s unit tests).

use std::path::Path;
use std::process::{Command, Output};

fn check_config(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sendwell"))
        .arg("check-config")
        .arg(path)
        // No SENDWELL_* override or credentials directory of the caller's may change the result.
        .env_clear()
        .output()
        .unwrap()
}

#[test]
fn check_config_prints_toml_that_can_be_saved_and_used_as_the_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sendwell.toml");
    let out = check_config(&example);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("configuration OK"), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let table: toml::Table = toml::from_str(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    assert_eq!(
        table["retry"]["base_delay"].as_str(),
        Some("500ms"),
        "{printed}"
    );
    assert_eq!(table["state"]["ledger_retention"].as_str(), Some("7d"));
    // The example writes RabbitMQ's guest password in the URL: redacted, and refused as it is.
    assert!(printed.contains("guest:***@") && !printed.contains("guest:guest"));
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved.toml");
    std::fs::write(&saved, &printed).unwrap();
    let refused = check_config(&saved);
    assert_eq!(refused.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("`broker.url`"));

    // With the password put back, the saved file is the same configuration.
    std::fs::write(&saved, printed.replace("guest:***@", "guest:guest@")).unwrap();
    let again = check_config(&saved);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);
}

/// Runs `sendwell args…` with only the given environment.
fn sendwell(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sendwell"));
    c.args(args).env_clear();
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A URL whose password the redaction cannot see (no `//`, so no authority: the password is
/// part of the path) is refused, and no output names the password; nor is the redaction's
/// placeholder taken for a password when it is percent-encoded.
#[test]
fn no_form_of_broker_url_gets_its_password_printed_or_the_placeholder_accepted() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sendwell.toml");
    let example = example.to_str().unwrap();
    for url in [
        "amqp:/u:s3cret@127.0.0.1:5672/%2f",
        "amqp:///u:s3cret@127.0.0.1:5672/%2f",
        "amqp:u:s3cret@127.0.0.1:5672/%2f",
    ] {
        let out = sendwell(&["check-config", example], &[("SENDWELL_BROKER__URL", url)]);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(64), "{url}: {all}");
        assert!(!all.contains("s3cret"), "{url}: {all}");
    }
    let out = sendwell(
        &["check-config", example],
        &[(
            "SENDWELL_BROKER__URL",
            "amqp://u:%2A%2A%2A@127.0.0.1:5672/%2f",
        )],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    // publish repeats no URL it cannot parse.
    let out = sendwell(
        &[
            "publish",
            "--url",
            "amqp:u:s3cret@127.0.0.1:5672/%2f",
            "--to",
            "+491701234567",
            "--text",
            "hi",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// `publish` and `tail` need only the broker: a config whose secret files they cannot read
/// (another user's, or not there) still gives them the broker URL.
#[test]
fn publish_reads_only_the_broker_section_of_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sendwell.toml");
    let example =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sendwell.toml"))
            .unwrap();
    // The example's relative paths (secret files and all) now point nowhere.
    std::fs::write(&cfg, example).unwrap();
    let cfg = cfg.to_str().unwrap();
    let full = sendwell(&["check-config", cfg], &[]);
    assert_eq!(
        full.status.code(),
        Some(64),
        "the full config needs its files"
    );
    // A vhost that does not exist: the publish gets as far as the broker (not exit 64).
    let out = sendwell(
        &[
            "publish",
            "--config",
            cfg,
            "--to",
            "+491701234567",
            "--text",
            "hi",
        ],
        &[(
            "SENDWELL_BROKER__URL",
            "amqp://guest:guest@127.0.0.1:5672/sendwell-no-such-vhost",
        )],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("broker"), "{stderr}");
}
