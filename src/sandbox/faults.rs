//! Failure injection: scripted [`Fault`]s answer matching sends with an error instead, random
//! faults are drawn per send at the configured rates, and [`AsyncFailure`]s accept a send but
//! call back `sent` then `failed`, as when Meta accepts a message it cannot deliver.

use axum::http::StatusCode;
use rand::Rng;

use super::error::{MetaError, known_details};
use super::state::{AsyncFailure, Fault, Shared, digits};

impl Shared {
    pub(super) fn add_fault(&self, fault: Fault) {
        if fault.times > 0 {
            self.faults
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(fault);
        }
    }

    /// Uses up one matching scripted fault, if any.
    pub(super) fn take_fault(&self, wa_id: &str) -> Option<MetaError> {
        let mut faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let i = faults
            .iter()
            .position(|f| f.to.as_deref().is_none_or(|to| digits(to) == wa_id))?;
        let fault = &mut faults[i];
        // Never 0 here: add_fault drops empty faults and used-up ones are removed below.
        fault.times -= 1;
        let error = scripted_error(fault);
        if fault.times == 0 {
            faults.remove(i);
        }
        Some(error)
    }

    pub(super) fn random_fault(&self) -> Option<MetaError> {
        // Skip the RNG entirely in the common all-zero configuration.
        if self.rate_server_error == 0.0
            && self.rate_throttle == 0.0
            && self.rate_undeliverable == 0.0
        {
            return None;
        }
        let mut rng = rand::rng();
        if rng.random_bool(self.rate_server_error) {
            return Some(MetaError::canonical(StatusCode::SERVICE_UNAVAILABLE, 2));
        }
        if rng.random_bool(self.rate_throttle) {
            return Some(MetaError::canonical(StatusCode::BAD_REQUEST, 130_429));
        }
        if rng.random_bool(self.rate_undeliverable) {
            return Some(MetaError::canonical(StatusCode::BAD_REQUEST, 131_026));
        }
        None
    }

    pub(super) fn add_async_failure(&self, failure: AsyncFailure) {
        if failure.times > 0 {
            self.async_failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(failure);
        }
    }

    /// Uses up one matching asynchronous failure, if any; a copy with `times: 1` is returned.
    pub(super) fn take_async_failure(&self, wa_id: &str) -> Option<AsyncFailure> {
        let mut failures = self
            .async_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let i = failures
            .iter()
            .position(|f| f.to.as_deref().is_none_or(|to| digits(to) == wa_id))?;
        // Never 0 here: add_async_failure drops empty ones and used-up ones are removed below.
        failures[i].times -= 1;
        let taken = AsyncFailure {
            times: 1,
            ..failures[i].clone()
        };
        if failures[i].times == 0 {
            failures.remove(i);
        }
        Some(taken)
    }
}

/// The answer a scripted fault gives.
fn scripted_error(fault: &Fault) -> MetaError {
    let status = StatusCode::from_u16(fault.http_status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = if fault.message.starts_with("(#") {
        fault.message.clone()
    } else {
        format!("(#{}) {}", fault.code, fault.message)
    };
    let details = known_details(fault.code).map_or_else(|| fault.message.clone(), Into::into);
    MetaError::new(status, fault.code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxConfig;
    use crate::sandbox::error::known_details;
    use crate::sandbox::testing::*;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn scripted_fault_fires_exactly_times_then_succeeds() {
        let sb = start(quick()).await;
        sb.handle.add_fault(Fault {
            to: Some("+49 170 1234567".into()),
            http_status: 400,
            code: 131_056,
            message: "Pair rate limit hit".into(),
            times: 2,
        });
        // Another recipient is unaffected and does not use the fault up.
        assert_eq!(sb.send(&template("4915112345678", "other")).await.0, 200);
        for _ in 0..2 {
            let (status, answer) = sb.send(&template("491701234567", "job")).await;
            assert_eq!(status, 400);
            let (code, details) = error_of(&answer);
            assert_eq!(code, 131_056);
            assert_eq!(answer["error"]["message"], "(#131056) Pair rate limit hit");
            assert!(details.starts_with("Too many messages"), "{details}");
        }
        assert_eq!(sb.send(&template("491701234567", "job")).await.0, 200);
        assert_eq!(sb.handle.accepted_count_for("job"), 1);

        // A fault for any recipient, with a status outside the error range: answered as 500.
        sb.handle.add_fault(Fault {
            to: None,
            http_status: 200,
            code: 1,
            message: "(#1) An unknown error occurred".into(),
            times: 1,
        });
        let (status, answer) = sb.send(&text("1", "x")).await;
        assert_eq!(status, 500);
        assert_eq!(answer["error"]["message"], "(#1) An unknown error occurred");
        assert_eq!(sb.send(&text("1", "x")).await.0, 200);
        sb.stop().await;
    }

    #[tokio::test]
    async fn random_faults_have_metas_codes() {
        let cases = [
            (
                SandboxConfig {
                    rate_throttle: 1.0,
                    ..quick()
                },
                400,
                130_429,
                "(#130429) Rate limit hit",
                "Cloud API message throughput has been reached.",
            ),
            (
                SandboxConfig {
                    rate_server_error: 1.0,
                    ..quick()
                },
                503,
                2,
                "(#2) Service temporarily unavailable",
                "Temporary due to downtime or due to being overloaded.",
            ),
            (
                SandboxConfig {
                    // Out of range and NaN are clamped rather than panicking in the RNG.
                    rate_server_error: f64::NAN,
                    rate_throttle: -3.0,
                    rate_undeliverable: 7.0,
                    ..quick()
                },
                400,
                131_026,
                "(#131026) Message undeliverable",
                known_details(131_026).unwrap(),
            ),
        ];
        for (config, http, code, message, details) in cases {
            let sb = start(config).await;
            for _ in 0..3 {
                let (status, answer) = sb.send(&template("491701234567", "cb")).await;
                assert_eq!(status, http);
                assert_eq!(error_of(&answer), (code, details.to_owned()));
                assert_eq!(answer["error"]["message"], message);
            }
            assert!(sb.handle.accepted().is_empty());
            assert_eq!(sb.handle.accepted_count_for("cb"), 0);
            assert!(
                sb.handle
                    .requests()
                    .iter()
                    .all(|r| r.error_code == Some(code))
            );
            sb.stop().await;
        }
    }

    #[tokio::test]
    async fn accepted_count_for_counts_only_200s_per_callback() {
        let sb = start(quick()).await;
        for cb in ["a", "a", "b"] {
            assert_eq!(sb.send(&template("491701234567", cb)).await.0, 200);
        }
        sb.handle.add_fault(Fault {
            to: None,
            http_status: 400,
            code: 130_429,
            message: "Rate limit hit".into(),
            times: 1,
        });
        assert_eq!(sb.send(&template("491701234567", "a")).await.0, 400);
        assert_eq!(sb.handle.accepted_count_for("a"), 2);
        assert_eq!(sb.handle.accepted_count_for("b"), 1);
        assert_eq!(sb.handle.accepted_count_for("c"), 0);
        assert_eq!(sb.handle.requests().len(), 4);
        assert_eq!(sb.handle.accepted().len(), 3);
        sb.stop().await;
    }

    #[tokio::test]
    async fn async_failure_is_accepted_then_sent_and_failed_with_the_code() {
        let rx = receiver(vec![]).await;
        let sb = start(SandboxConfig {
            read_rate: 0.0,
            ..webhooked(&rx.url)
        })
        .await;
        sb.handle.add_async_failure(AsyncFailure {
            to: Some("+49 170 1234567".into()),
            code: 131_049,
            title: "This message was not delivered to maintain healthy ecosystem engagement."
                .into(),
            times: 1,
        });
        let other = wamid_of_send(&sb, &template("4915112345678", "other")).await;
        let failed = wamid_of_send(&sb, &template("491701234567", "job-1")).await;
        let fine = wamid_of_send(&sb, &template("491701234567", "job-1b")).await;
        wait_until("three callback tasks", || {
            (runs_done(&sb) == 3).then_some(())
        })
        .await;
        let bodies = rx.signed();
        let of = |w: &str| -> Vec<Value> {
            bodies
                .iter()
                .map(status_of)
                .filter(|s| s["id"] == w)
                .cloned()
                .collect()
        };
        let names = |v: &[Value]| -> Vec<String> {
            v.iter()
                .map(|s| s["status"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&of(&other)), ["sent", "delivered"]);
        assert_eq!(
            names(&of(&fine)),
            ["sent", "delivered"],
            "used up after one"
        );
        let f = of(&failed);
        assert_eq!(names(&f), ["sent", "failed"]);
        assert!(f[0].get("pricing").is_some());
        assert!(f[1].get("pricing").is_none());
        assert_eq!(f[1]["biz_opaque_callback_data"], "job-1");
        assert_eq!(
            f[1]["errors"],
            json!([{
                "code": 131_049,
                "title": "This message was not delivered to maintain healthy ecosystem engagement.",
                "message": "This message was not delivered to maintain healthy ecosystem engagement.",
                "error_data": { "details": known_details(131_049).unwrap() },
                "href": "/documentation/business-messaging/whatsapp/support/error-codes"
            }])
        );

        // The same over HTTP, for any recipient; a malformed rule is refused.
        let rule = json!({ "to": null, "code": 131_050, "title": "Unable to deliver", "times": 1 });
        assert_eq!(
            sb.control(reqwest::Method::POST, "/_sandbox/async_failures", &rule)
                .await,
            204
        );
        assert_eq!(
            sb.control(
                reqwest::Method::POST,
                "/_sandbox/async_failures",
                &json!({})
            )
            .await,
            400
        );
        let w = wamid_of_send(&sb, &text("16505551234", "x")).await;
        wait_until("the failed status", || {
            rx.signed()
                .iter()
                .map(status_of)
                .find(|s| s["id"] == w.as_str() && s["status"] == "failed")
                .map(|s| assert_eq!(s["errors"][0]["code"], 131_050))
        })
        .await;
        sb.stop().await;
    }
}
