//! The send path end to end: the real RabbitMQ, the daemon in-process, the sandbox over HTTP.
//!
//! Timing (two busy cores): a failure that must come mid-run first makes the sandbox slow
//! rather than racing the daemon; the busy-recipient count has seconds of room either way.

mod common;

use std::time::Duration;

use common::*;
use sendwell::sandbox::Fault;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_and_text_jobs_are_sent_and_confirmed() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let text = serde_json::json!({
        "id": "text-1", "account": "acme-de", "to": number(2), "category": "service",
        "text": { "body": "Your parcel is on its way", "preview_url": false }
    });
    env.publish(&[template_job("tpl-1", &number(1)), text])
        .await;
    let finals = env
        .final_outcomes(&["tpl-1".into(), "text-1".into()], T)
        .await;

    for id in ["tpl-1", "text-1"] {
        let e = &finals[id][0];
        assert_eq!(e["status"], "sent", "{e}");
        assert_eq!(e["attempts"], 1);
        assert_eq!(e["account"], "acme-de");
        let wamid = e["wamid"].as_str().unwrap();
        let rec = env
            .sandbox
            .accepted()
            .into_iter()
            .find(|r| r.callback_data.as_deref() == Some(id))
            .unwrap();
        assert_eq!(
            rec.wamid.as_deref(),
            Some(wamid),
            "the outcome carries the sandbox's wamid"
        );
    }
    assert_eq!(
        finals["tpl-1"][0]["metadata"]["campaign"], "test",
        "metadata is echoed"
    );
    let kinds: Vec<_> = env
        .sandbox
        .accepted()
        .iter()
        .map(|r| (r.to.clone(), r.kind.clone()))
        .collect();
    assert!(kinds.contains(&(number(1), "template".into())));
    assert!(kinds.contains(&(number(2), "text".into())));
    // The routing key of an outcome is its status.
    assert!(env.outcomes.all().iter().any(|s| s.routing_key == "sent"));

    // The admin listener tells readiness and counts what happened.
    let base = format!("http://{}", app.admin());
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sendwell_jobs_finished_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sendwell_api_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(!metrics.contains("+49170"), "no phone number in metrics");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_invalid_job_is_dead_lettered_with_its_reason() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let base = template_job("x", &number(3));
    let with = |id: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut j = base.clone();
        j["id"] = id.into();
        f(&mut j);
        j
    };
    // (id, job, expected reason)
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "bad-account",
            with("bad-account", &|j| j["account"] = "nobody".into()),
            "unknown_account",
        ),
        (
            "bad-number",
            with("bad-number", &|j| j["to"] = "0170123".into()),
            "invalid_number",
        ),
        (
            "bad-country",
            with("bad-country", &|j| j["to"] = "+99912345678".into()),
            "invalid_number",
        ),
        (
            "no-purpose",
            with("no-purpose", &|j| {
                j.as_object_mut().unwrap().remove("purpose");
            }),
            "missing_purpose",
        ),
        (
            "bad-purpose",
            with("bad-purpose", &|j| j["purpose"] = "lottery".into()),
            "unknown_purpose",
        ),
        (
            "both",
            with("both", &|j| j["text"] = serde_json::json!({"body": "hi"})),
            "invalid_content",
        ),
        (
            "neither",
            with("neither", &|j| {
                j.as_object_mut().unwrap().remove("template");
            }),
            "invalid_content",
        ),
        (
            "bad-category",
            with("bad-category", &|j| j["category"] = "spam".into()),
            "malformed",
        ),
        (
            "typo-field",
            with("typo-field", &|j| {
                j["not_befor"] = "2026-01-01T00:00:00Z".into()
            }),
            "malformed",
        ),
        (
            "bad-time",
            with("bad-time", &|j| {
                j["not_before"] = "2026-02-01T00:00:00Z".into();
                j["expires_at"] = "2026-01-01T00:00:00Z".into();
            }),
            "invalid_time",
        ),
        (
            "bad-metadata",
            with("bad-metadata", &|j| {
                j["metadata"] = serde_json::json!({"x": "y".repeat(5000)})
            }),
            "invalid_metadata",
        ),
        (
            "long-text",
            with("long-text", &|j| {
                j.as_object_mut().unwrap().remove("template");
                j["category"] = "service".into();
                j["text"] = serde_json::json!({"body": "x".repeat(5000)});
            }),
            "invalid_content",
        ),
        ("bad\u{7}id", with("bad\u{7}id", &|_| {}), "invalid_id"),
        // PostgreSQL's text cannot hold a NUL: its outcome must not be kept under that id
        // (a store error there broke the broker session again at every redelivery).
        ("bad\u{0}id", with("bad\u{0}id", &|_| {}), "invalid_id"),
    ];
    env.publish(&cases.iter().map(|c| c.1.clone()).collect::<Vec<_>>())
        .await;
    env.publish_raw("491701234567", b"{ this is not json").await;
    let mut huge = base.clone();
    huge["id"] = "too-large".into();
    huge["metadata"] = serde_json::json!({ "pad": "x".repeat(70 * 1024) });
    env.publish_raw("491701234567", &serde_json::to_vec(&huge).unwrap())
        .await;

    let expected = cases.len() + 2;
    let dead = env.dead.clone();
    wait_for("every invalid job in sendwell.dead", T, async || {
        (dead.all().len() >= expected).then_some(())
    })
    .await;
    let dead = env.dead.all();
    for (id, job, reason) in &cases {
        let body = serde_json::to_vec(job).unwrap();
        let d = dead
            .iter()
            .find(|d| d.body == body)
            .unwrap_or_else(|| panic!("{id} dead-lettered"));
        let header = &d.headers["x-sendwell-reason"];
        assert!(
            header.starts_with(&format!("{reason}: ")),
            "{id}: header {header:?}"
        );
        assert_eq!(d.headers["x-sendwell-reason-code"], *reason);
    }
    assert!(dead.iter().any(|d| d.body == b"{ this is not json"
        && d.headers["x-sendwell-reason"].starts_with("malformed")));
    assert!(
        dead.iter()
            .any(|d| d.headers["x-sendwell-reason"].starts_with("too_large"))
    );

    // Each readable id gets an `invalid` outcome with the same reason.
    let outcomes = env.outcomes.clone();
    let ids: Vec<String> = cases
        .iter()
        .map(|c| c.0.to_string())
        .chain(["too-large".to_string()])
        .collect();
    wait_for("invalid outcomes", T, async || {
        let f = finals_by_id(&outcomes.json());
        ids.iter().all(|i| f.contains_key(i)).then_some(())
    })
    .await;
    let finals = finals_by_id(&env.outcomes.json());
    for (id, _, reason) in &cases {
        let e = &finals[*id][0];
        assert_eq!(e["status"], "invalid", "{id}");
        assert_eq!(e["reason"], *reason, "{id}");
        assert!(!e["detail"].as_str().unwrap().is_empty());
        // The job's category rides along whenever it could be read, as on every outcome.
        let category = match *id {
            "bad-category" => None,
            "long-text" => Some("service"),
            _ => Some("marketing"),
        };
        assert_eq!(e.get("category").and_then(|c| c.as_str()), category, "{id}");
    }
    assert_eq!(finals["too-large"][0]["reason"], "too_large");
    assert_eq!(finals["too-large"][0]["category"], "marketing");
    assert!(
        env.sandbox.requests().is_empty(),
        "nothing invalid reached the API"
    );

    // The daemon is still consuming after all that.
    env.publish(&[template_job("after-garbage", &number(4))])
        .await;
    let f = env.final_outcomes(&["after-garbage".into()], T).await;
    assert_eq!(f["after-garbage"][0]["status"], "sent");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_is_sent_once_however_often_it_is_published() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let job = template_job("dup-1", &number(5));
    // Three copies at once, then one more after the first finished.
    env.publish(&[job.clone(), job.clone(), job.clone()]).await;
    env.final_outcomes(&["dup-1".into()], T).await;
    env.publish(std::slice::from_ref(&job)).await;
    let outcomes = env.outcomes.clone();
    wait_for("three duplicate outcomes", T, async || {
        (outcomes
            .for_id("dup-1")
            .iter()
            .filter(|e| e["status"] == "duplicate")
            .count()
            == 3)
            .then_some(())
    })
    .await;
    let events = env.outcomes.for_id("dup-1");
    assert_eq!(
        events.iter().filter(|e| e["status"] == "sent").count(),
        1,
        "{events:?}"
    );
    assert_eq!(env.sandbox.accepted_count_for("dup-1"), 1);
    assert_eq!(env.sandbox.requests().len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_the_send_succeeds() {
    let env = TestEnv::new(&AppOptions::default()).await;
    env.sandbox.add_fault(Fault {
        to: Some(number(6)),
        http_status: 503,
        code: 2,
        message: "Service temporarily unavailable".into(),
        times: 2,
    });
    let app = env.start().await;
    env.publish(&[template_job("retry-1", &number(6))]).await;
    let f = env.final_outcomes(&["retry-1".into()], T).await;
    let e = &f["retry-1"][0];
    assert_eq!(e["status"], "sent", "{e}");
    assert_eq!(e["attempts"], 3);
    let statuses: Vec<u16> = env.sandbox.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_fails_the_job_with_metas_code() {
    let env = TestEnv::new(&AppOptions::default()).await;
    env.sandbox.add_fault(Fault {
        to: Some(number(7)),
        http_status: 400,
        code: 131026,
        message: "Message undeliverable".into(),
        times: 1,
    });
    let app = env.start().await;
    env.publish(&[template_job("perm-1", &number(7))]).await;
    let f = env.final_outcomes(&["perm-1".into()], T).await;
    let e = &f["perm-1"][0];
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["reason"], "undeliverable");
    assert_eq!(e["error_code"], 131026);
    assert_eq!(e["attempts"], 1);
    assert_eq!(
        env.sandbox.requests().len(),
        1,
        "a permanent error is not retried"
    );
    assert!(
        env.outcomes
            .all()
            .iter()
            .any(|s| s.routing_key == "failed.undeliverable")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_that_run_out_fail_with_the_last_error() {
    let env = TestEnv::new(&AppOptions::default()).await;
    env.sandbox.add_fault(Fault {
        to: Some(number(8)),
        http_status: 400,
        code: 130429,
        message: "Rate limit hit".into(),
        times: 100,
    });
    let app = env.start().await;
    env.publish(&[template_job("exhaust-1", &number(8))]).await;
    let f = env.final_outcomes(&["exhaust-1".into()], T).await;
    let e = &f["exhaust-1"][0];
    assert_eq!(e["status"], "failed", "{e}");
    assert_eq!(e["error_code"], 130429);
    assert_eq!(e["attempts"], 5, "max_attempts in the test config");
    assert_eq!(env.sandbox.requests().len(), 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_pauses_the_account_and_a_fixed_token_resumes_it() {
    let env = TestEnv::new(&AppOptions {
        token: "expired-token".into(),
        ..Default::default()
    })
    .await;
    let app = env.start().await;
    let ids: Vec<String> = (0..5).map(|i| format!("paused-{i}")).collect();
    env.publish(
        &ids.iter()
            .enumerate()
            .map(|(i, id)| template_job(id, &number(100 + i)))
            .collect::<Vec<_>>(),
    )
    .await;

    // The sandbox refuses the token; jobs wait (deferred), none fails.
    let sandbox = env.sandbox.clone();
    wait_for("401s at the sandbox", T, async || {
        (sandbox
            .requests()
            .iter()
            .filter(|r| r.status == 401)
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    let metrics = reqwest::get(format!("http://{}/metrics", app.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendwell_account_paused{account=\"acme-de\"} 1")),
        "{metrics}"
    );
    assert!(
        finals_by_id(&env.outcomes.json()).is_empty(),
        "no job is failed while the account is paused"
    );
    assert!(env.sandbox.accepted().is_empty());

    // Rotate the token file: the next probe picks it up and every job goes out once.
    std::fs::write(env.dir.path().join("token"), GOOD_TOKEN).unwrap();
    let f = env.final_outcomes(&ids, T).await;
    for id in &ids {
        assert_eq!(f[id].len(), 1);
        assert_eq!(f[id][0]["status"], "sent", "{id}: {:?}", f[id]);
        assert_eq!(env.sandbox.accepted_count_for(id), 1);
    }
    let metrics = reqwest::get(format!("http://{}/metrics", app.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendwell_account_paused{account=\"acme-de\"} 0")),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_not_yet_due_wait_for_not_before_and_expired_jobs_are_not_sent() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let now = jiff::Timestamp::now();
    let mut later = template_job("later-1", &number(9));
    later["not_before"] = (now + jiff::SignedDuration::from_secs(2))
        .to_string()
        .into();
    let mut expired = template_job("expired-1", &number(10));
    expired["expires_at"] = (now - jiff::SignedDuration::from_secs(1))
        .to_string()
        .into();
    env.publish(&[later, expired]).await;
    let f = env
        .final_outcomes(&["later-1".into(), "expired-1".into()], T)
        .await;
    assert_eq!(f["expired-1"][0]["status"], "expired");
    assert_eq!(f["later-1"][0]["status"], "sent");
    let sent_at = env
        .sandbox
        .accepted()
        .iter()
        .find(|r| r.callback_data.as_deref() == Some("later-1"))
        .unwrap()
        .at_ms;
    assert!(
        sent_at as i64 >= (now + jiff::SignedDuration::from_secs(2)).as_millisecond(),
        "not sent before not_before"
    );
    assert_eq!(env.sandbox.accepted_count_for("expired-1"), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_connection_loses_no_job_and_sends_none_twice() {
    let env = TestEnv::new(&AppOptions {
        sandbox: sendwell::sandbox::SandboxConfig {
            latency: Duration::from_millis(100),
            ..AppOptions::default().sandbox
        },
        // Few in flight (1500 jobs take about 3 s).
        prefetch: 50,
        ..Default::default()
    })
    .await;
    let app = env.start().await;
    let ids: Vec<String> = (0..1500).map(|i| format!("conn-{i}")).collect();
    env.publish(
        &ids.iter()
            .enumerate()
            .map(|(i, id)| template_job(id, &number(1000 + i)))
            .collect::<Vec<_>>(),
    )
    .await;
    let outcomes = env.outcomes.clone();
    wait_for("some outcomes before the failure", T, async || {
        (finals_by_id(&outcomes.json()).len() >= 100).then_some(())
    })
    .await;
    // From now on every call takes a second, so the failure surely comes mid-run however long
    // `rabbitmqctl` takes to start on this machine (seconds when it is busy; the rest of the
    // run at full speed takes about three).
    env.sandbox.set_latency(Duration::from_secs(1));

    env.broker.close_all_connections();
    assert!(
        finals_by_id(&env.outcomes.json()).len() < ids.len(),
        "the failure came mid-run"
    );
    env.sandbox.set_latency(Duration::from_millis(100));

    let f = env.final_outcomes(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(
            f[id].len(),
            1,
            "{id} has exactly one final outcome: {:?}",
            f[id]
        );
        assert_eq!(f[id][0]["status"], "sent", "{id}: {:?}", f[id]);
        assert_eq!(
            env.sandbox.accepted_count_for(id),
            1,
            "{id} sent exactly once"
        );
    }
    let metrics = reqwest::get(format!("http://{}/metrics", app.admin()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sendwell_broker_reconnects_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendwell_tail_prints_outcome_events_as_json_lines() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let url = env.broker.url.clone();
    let tail = tokio::spawn(async move {
        let mut out = Vec::new();
        sendwell::publish::tail_outcomes(&url, "sent", Some(1), &mut out)
            .await
            .unwrap();
        out
    });
    // The tail's queue is bound once its consumer shows up; publish after that.
    let broker = &env.broker;
    wait_for("the tail to consume", T, async || {
        let r = reqwest::Client::new()
            .get(format!("{MGMT}/api/consumers/{}", broker.vhost))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
        v.as_array()?
            .iter()
            .any(|c| c["consumer_tag"] == "sendwell-tail")
            .then_some(())
    })
    .await;
    env.publish(&[template_job("tail-1", &number(11))]).await;
    let out = tokio::time::timeout(T, tail).await.unwrap().unwrap();
    let line: serde_json::Value = serde_json::from_slice(out.strip_suffix(b"\n").unwrap()).unwrap();
    assert_eq!(line["id"], "tail-1");
    assert_eq!(line["status"], "sent");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_send_is_not_repeated_for_marketing_but_is_for_utility() {
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_secs(2);
    let env = TestEnv::new(&opts).await;
    // Long enough for an answer on a busy machine once the sandbox is quick again, and for
    // the test to make it quick before the utility job's five attempts are spent.
    let app = env
        .start_with(|c| c.cloud_api.request_timeout = Duration::from_secs(1))
        .await;
    let mut utility = template_job("amb-utility", &number(13));
    utility["category"] = "utility".into();
    env.publish(&[template_job("amb-marketing", &number(12)), utility])
        .await;

    // The sandbox takes both (it decides on arrival); the daemon gives up waiting after 1 s.
    let sandbox = env.sandbox.clone();
    wait_for("both sends to reach the sandbox", T, async || {
        (sandbox.accepted_count_for("amb-marketing") >= 1
            && sandbox.accepted_count_for("amb-utility") >= 1)
            .then_some(())
    })
    .await;
    env.sandbox.set_latency(Duration::from_millis(5));

    let f = env
        .final_outcomes(&["amb-marketing".into(), "amb-utility".into()], T)
        .await;
    let m = &f["amb-marketing"][0];
    assert_eq!(m["status"], "failed", "{m}");
    assert_eq!(m["reason"], "ambiguous");
    assert_eq!(
        env.sandbox.accepted_count_for("amb-marketing"),
        1,
        "marketing is not resent when in doubt"
    );
    let u = &f["amb-utility"][0];
    assert_eq!(u["status"], "sent", "{u}");
    assert!(u["attempts"].as_u64().unwrap() >= 2, "{u}");
    assert!(
        env.sandbox.accepted_count_for("amb-utility") >= 2,
        "utility is resent when in doubt"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_busy_recipient_does_not_stall_the_others() {
    // 200 jobs for one number (they run one after another, 50 ms each), then one for somebody
    // else. Without the cap on a lane's waiting jobs the busy number's jobs would fill the
    // prefetch (100), and the other job could start only after 101 of them: 5 s. With it, the
    // other job waits only for the daemon to take the queue down to it, a small part of that.
    let mut opts = AppOptions::default();
    opts.sandbox.latency = Duration::from_millis(50);
    opts.prefetch = 100;
    let env = TestEnv::new(&opts).await;
    let app = env.start().await;
    let busy: Vec<String> = (0..200).map(|i| format!("busy-{i}")).collect();
    let mut jobs: Vec<_> = busy
        .iter()
        .map(|id| template_job(id, &number(20)))
        .collect();
    jobs.push(template_job("other-1", &number(21)));
    env.publish(&jobs).await;

    env.final_outcomes(&["other-1".into()], T).await;
    let busy_done = finals_by_id(&env.outcomes.json()).len() - 1;
    eprintln!("the other recipient's job was done after {busy_done} of the busy one's");
    assert!(
        busy_done < 100,
        "the other recipient waited behind {busy_done} jobs of the busy one"
    );
    let f = env.final_outcomes(&busy, Duration::from_secs(120)).await;
    for id in &busy {
        assert_eq!(f[id].len(), 1);
        assert_eq!(f[id][0]["status"], "sent");
        assert_eq!(env.sandbox.accepted_count_for(id), 1);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_acks_leave_nothing_unacked_while_running_or_after_a_stop() {
    let env = TestEnv::new(&AppOptions::default()).await;
    let app = env.start().await;
    let ids: Vec<String> = (0..400).map(|i| format!("ack-{i}")).collect();
    let jobs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(100 + i)))
        .collect();
    env.publish(&jobs).await;
    env.final_outcomes(&ids, T).await;
    // While running: every settled job's ack goes out within a flush or a straggler's wait.
    let broker = &env.broker;
    wait_for("every job acked while running", T, async || {
        broker.drained("sendwell.jobs.0").then_some(())
    })
    .await;
    let metrics = app.metrics().await;
    assert!(
        metric_value(&metrics, "sendwell_acks_total") >= 1.0,
        "acks are counted"
    );

    // A second burst, stopped right after its outcomes: whether its last acks went with a
    // flush tick or with the final flush before the connection closed, none is left behind
    // (an unsent ack would put its job back in the queue when the connection closes).
    let more: Vec<String> = (0..200).map(|i| format!("ack-late-{i}")).collect();
    let jobs: Vec<_> = more
        .iter()
        .enumerate()
        .map(|(i, id)| template_job(id, &number(600 + i)))
        .collect();
    env.publish(&jobs).await;
    env.final_outcomes(&more, T).await;
    app.stop().await;
    assert!(
        broker.drained("sendwell.jobs.0"),
        "a settled job came back to the queue after the stop"
    );
}
