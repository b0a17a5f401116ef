//! Every subcommand finds its config file the same way: `--config`, else `SENDWELL_CONFIG`,
//! else `/etc/sendwell/sendwell.toml`; when none of them names a file that exists, it exits 64,
//! says where it looked and names the example config. The real binary, as a user runs it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const DEFAULT: &str = "/etc/sendwell/sendwell.toml";
const HINT: &str = "try --config config/sendwell.toml";

/// Every subcommand that reads the config, with arguments that would otherwise run it. None of
/// them gets past the missing config, so none changes anything.
const NEED_CONFIG: &[&[&str]] = &[
    &["run"],
    &["check-config"],
    &["consent", "show", "+491701234567"],
    &["consent", "export"],
    &["consent", "import", "-"],
    &["consent", "erase", "+491701234567", "--yes"],
    &["dead", "list"],
    &["dead", "replay", "--dry-run"],
    &["state", "backup", "--to", "backup.redb"],
    &["state", "restore", "--from", "backup.redb"],
];

/// The binary in `cwd`, without any SENDWELL_ variable from the test's environment.
fn command(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendwell"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SENDWELL_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(cwd)
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    cmd
}

fn sendwell(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(cwd, args, env).output().expect("the binary runs")
}

/// A child process killed when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

trait OutputOf {
    /// The exit status and what an exited child wrote.
    fn wait_with_output_ref(&mut self) -> Output;
}

impl OutputOf for std::process::Child {
    fn wait_with_output_ref(&mut self) -> Output {
        use std::io::Read;
        let status = self.wait().unwrap();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        if let Some(o) = self.stdout.as_mut() {
            o.read_to_end(&mut stdout).unwrap();
        }
        if let Some(e) = self.stderr.as_mut() {
            e.read_to_end(&mut stderr).unwrap();
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A valid config in a directory of its own (state there too); the broker is unreachable, so
/// a command that works with it did not need the broker.
fn offline_config(dir: &Path) -> PathBuf {
    write_config(
        dir,
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &"127.0.0.1:9".parse().unwrap(),
        GOOD_TOKEN,
        10,
        RELAXED_LIMITS,
        "",
    )
}

#[test]
fn without_any_config_every_command_exits_64_naming_the_example() {
    assert!(
        !Path::new(DEFAULT).exists(),
        "this test needs a machine without {DEFAULT}"
    );
    let cwd = tempfile::tempdir().unwrap();
    for args in NEED_CONFIG {
        let out = sendwell(cwd.path(), args, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(&format!("{DEFAULT} does not exist"))
                && err.contains("no --config given")
                && err.contains("SENDWELL_CONFIG is not set")
                && err.contains(HINT),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_config_named_by_flag_or_environment_must_exist() {
    let cwd = tempfile::tempdir().unwrap();
    let missing = cwd.path().join("nowhere.toml");
    let missing = missing.to_str().unwrap();
    // publish and tail too: a config they were told about must be there.
    let publish: &[&str] = &["publish", "--to", "+491701234567", "--text", "hi"];
    let tail: &[&str] = &["tail", "-n", "1"];
    for args in NEED_CONFIG.iter().copied().chain([publish, tail]) {
        let out = sendwell(cwd.path(), args, &[("SENDWELL_CONFIG", missing)]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(
            err.contains(&format!("SENDWELL_CONFIG={missing} does not exist"))
                && err.contains(HINT),
            "{args:?}: {err}"
        );

        let mut with_flag = args.to_vec();
        with_flag.extend(["--config", missing]);
        let out = sendwell(cwd.path(), &with_flag, &[]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{with_flag:?}: {err}");
        assert!(
            err.contains(&format!("--config {missing} does not exist")) && err.contains(HINT),
            "{with_flag:?}: {err}"
        );
    }
}

#[test]
fn the_flag_wins_over_the_environment_which_wins_over_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(dir.path());
    let config = config.to_str().unwrap();
    let missing = dir.path().join("nowhere.toml");
    let missing = missing.to_str().unwrap();
    let cwd = tempfile::tempdir().unwrap();

    // From the environment alone: check-config, and a tool that opens the state store.
    for args in [
        &["check-config"][..],
        &["consent", "show", "+491701234567"][..],
    ] {
        let out = sendwell(cwd.path(), args, &[("SENDWELL_CONFIG", config)]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
    // The flag over a wrong environment; the positional path of check-config likewise.
    let out = sendwell(
        cwd.path(),
        &["consent", "show", "+491701234567", "--config", config],
        &[("SENDWELL_CONFIG", missing)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = sendwell(
        cwd.path(),
        &["check-config", config],
        &[("SENDWELL_CONFIG", missing)],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A config file that exists but is invalid is still reported by its keys, not as missing.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[broker]\nprefetch = 0\n").unwrap();
    let out = sendwell(
        cwd.path(),
        &["dead", "list"],
        &[("SENDWELL_CONFIG", bad.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("`broker.prefetch`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_tail_take_the_broker_from_the_config_and_work_without_one() {
    assert!(
        !Path::new(DEFAULT).exists(),
        "this test needs a machine without {DEFAULT}"
    );
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let config = env.config_path.to_str().unwrap().to_string();
    let cwd = tempfile::tempdir().unwrap();
    let cwd = cwd.path().to_path_buf();

    // tail through SENDWELL_CONFIG: the config's broker is the test's vhost.
    let mut tail = Killed(
        command(
            &cwd,
            &["tail", "-n", "2", "--pattern", "sent"],
            &[("SENDWELL_CONFIG", config.as_str())],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap(),
    );
    // tail's queue is bound (so it misses nothing published from now on) once the test's vhost
    // shows a binding of `sendwell.outcomes` with its pattern.
    let bindings = format!(
        "{MGMT}/api/exchanges/{}/sendwell.outcomes/bindings/source",
        env.broker.vhost
    );
    wait_for(
        "tail to bind its queue",
        Duration::from_secs(20),
        async || {
            let r = reqwest::Client::new()
                .get(&bindings)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            let r: serde_json::Value = serde_json::from_str(&r).ok()?;
            r.as_array()?
                .iter()
                .any(|b| b["routing_key"] == "sent")
                .then_some(())
        },
    )
    .await;

    // publish with --config ...
    let out = sendwell(
        &cwd,
        &[
            "publish",
            "--config",
            &config,
            "--id",
            "via-config",
            "--to",
            &number(1),
            "--category",
            "authentication",
            "--template",
            "otp",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // ... and with no config anywhere: the broker from SENDWELL_BROKER__URL, as before.
    let out = sendwell(
        &cwd,
        &[
            "publish",
            "--id",
            "no-config",
            "--to",
            &number(2),
            "--category",
            "authentication",
            "--template",
            "otp",
        ],
        &[("SENDWELL_BROKER__URL", env.broker.url.as_str())],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let finals = env
        .final_outcomes(
            &["via-config".into(), "no-config".into()],
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(finals["via-config"][0]["status"], "sent");
    assert_eq!(finals["no-config"][0]["status"], "sent");

    wait_for(
        "tail to exit after two events",
        Duration::from_secs(20),
        async || tail.0.try_wait().unwrap(),
    )
    .await;
    let out = tail.0.wait_with_output_ref();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for id in ["via-config", "no-config"] {
        assert!(printed.contains(&format!("\"id\":\"{id}\"")), "{printed}");
    }
    app.stop().await;
}
