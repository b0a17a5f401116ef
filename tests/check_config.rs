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

/// `[state.postgres]` through the real binary: each refusal exits 64 naming its key (and never
/// repeats a password), and an accepted one prints as a config that loads back the same, its
/// password left in its file.
#[test]
fn state_postgres_is_checked_printed_and_its_password_kept_out() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sendwell.toml");
    let example = example.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pw_file = dir.path().join("pg-password");
    std::fs::write(&pw_file, "pg-s3cret\n").unwrap();
    let pw_file = pw_file.to_str().unwrap();
    let postgres = ("SENDWELL_STATE__BACKEND", "postgres");
    let url = (
        "SENDWELL_STATE__POSTGRES__URL",
        "postgres://sendwell@127.0.0.1:5432/sw",
    );
    for (env, key) in [
        (vec![postgres], "state.postgres.url"),
        (
            vec![
                postgres,
                (
                    "SENDWELL_STATE__POSTGRES__URL",
                    "postgres://sendwell:s3cret@127.0.0.1/sw",
                ),
            ],
            "state.postgres.url",
        ),
        (
            // Refused with redb too: a password written into the config is refused wherever.
            vec![(
                "SENDWELL_STATE__POSTGRES__URL",
                "postgres://sendwell@127.0.0.1/sw?password=s3cret",
            )],
            "state.postgres.url",
        ),
        (
            vec![postgres, url, ("SENDWELL_STATE__POSTGRES__POOL_SIZE", "0")],
            "state.postgres.pool_size",
        ),
        (
            vec![
                postgres,
                url,
                ("SENDWELL_STATE__POSTGRES__CONNECT_TIMEOUT", "5"),
            ],
            "state.postgres.connect_timeout",
        ),
        (
            vec![
                postgres,
                url,
                ("SENDWELL_STATE__POSTGRES__STATEMENT_TIMEOUT", "0s"),
            ],
            "state.postgres.statement_timeout",
        ),
        (
            vec![
                postgres,
                url,
                ("SENDWELL_STATE__POSTGRES__PASSWORD_FILE", "/nonexistent/pw"),
            ],
            "state.postgres.password_file",
        ),
        (vec![("SENDWELL_STATE__BACKEND", "sqlite")], "state.backend"),
    ] {
        let out = sendwell(&["check-config", example], &env);
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(64), "{env:?}: {all}");
        assert!(all.contains(&format!("`{key}`")), "{env:?}: {all}");
        assert!(!all.contains("s3cret"), "{env:?}: {all}");
    }

    let env = [
        postgres,
        url,
        ("SENDWELL_STATE__POSTGRES__PASSWORD_FILE", pw_file),
        ("SENDWELL_STATE__POSTGRES__STATEMENT_TIMEOUT", "90s"),
    ];
    let out = sendwell(&["check-config", example], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(!printed.contains("s3cret"), "{printed}");
    let table: toml::Table = toml::from_str(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    let state = &table["state"];
    assert_eq!(state["backend"].as_str(), Some("postgres"), "{printed}");
    let pg = &state["postgres"];
    assert_eq!(pg["url"].as_str(), Some(url.1), "{printed}");
    assert_eq!(pg["password_file"].as_str(), Some(pw_file), "{printed}");
    assert_eq!(pg["pool_size"].as_integer(), Some(8), "{printed}");
    assert_eq!(pg["connect_timeout"].as_str(), Some("5s"), "{printed}");
    assert_eq!(pg["statement_timeout"].as_str(), Some("90s"), "{printed}");

    // Saved (the broker's guest password put back), it is the same configuration.
    let saved = dir.path().join("saved.toml");
    std::fs::write(&saved, printed.replace("guest:***@", "guest:guest@")).unwrap();
    let again = check_config(&saved);
    assert_eq!(
        again.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8(again.stdout).unwrap(), printed);

    // With redb the table is ignored: accepted (its password file need not exist), not printed.
    let out = sendwell(
        &["check-config", example],
        &[
            url,
            ("SENDWELL_STATE__POSTGRES__PASSWORD_FILE", "/nonexistent/pw"),
        ],
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("backend = \"redb\""), "{printed}");
    assert!(!printed.contains("[state.postgres]"), "{printed}");
}
