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
