//! What a Cloud API answer means for the job: a small pure classifier, decided on Meta's error
//! `code` first (Meta's advice: HTTP statuses per code are not documented and not stable), then
//! on the HTTP status (any 429/5xx is retryable), then on the transport error.

use std::time::Duration;

/// The decision, with the facts it was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiFailure {
    pub class: FailureClass,
    /// Meta's `error.code`, when the answer had one.
    pub code: Option<i64>,
    pub http_status: Option<u16>,
    /// Meta's message or the transport error, for logs and the outcome's `detail`.
    pub message: String,
    /// `Retry-After`, when the server sent one; the retry policy clamps it.
    pub retry_after: Option<Duration>,
    /// Machine-readable reason for a `failed` outcome (CONTRACT §3).
    pub reason: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Transient (server trouble, throughput limits): back off and try again.
    Retryable,
    /// Too many messages to this one recipient (131056): only this pair waits, 4^X seconds.
    PairLimited,
    /// The request reached Meta and its result is unknown (timeout after sending): a retry may
    /// send a second message.
    Ambiguous,
    /// The account cannot send at all (token, payment, policy): pause the account, keep the job.
    Account,
    /// This message will never be accepted as it is.
    Permanent,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Retryable => "retryable",
            FailureClass::PairLimited => "pair_limited",
            FailureClass::Ambiguous => "ambiguous",
            FailureClass::Account => "account",
            FailureClass::Permanent => "permanent",
        }
    }
}

/// Classifies a Meta error code (the source of truth when present).
pub fn class_of_code(code: i64) -> (FailureClass, &'static str) {
    use FailureClass::*;
    match code {
        // Authentication and permissions: nothing this account sends can succeed.
        0 | 3 | 10 | 190 | 200..=299 | 131005 => (Account, "account_auth"),
        // Account-level blocks: payment, policy, registration, quality restrictions.
        33 | 368 | 131031 | 131037 | 131042 | 131045 | 131048 | 131064 | 133010 | 134011 => {
            (Account, "account_blocked")
        }
        // Throughput and transient server trouble.
        1 | 2 | 4 | 80007 | 130429 | 131000 | 131016 | 131057 | 132069 | 133004 => {
            (Retryable, "api_error")
        }
        131056 => (PairLimited, "pair_rate_limit"),
        131026 => (Permanent, "undeliverable"),
        131050 => (Permanent, "opted_out"),
        130403 => (Permanent, "blocked"),
        131047 => (Permanent, "outside_service_window"),
        131049 => (Permanent, "per_user_limit"),
        132001 => (Permanent, "template_missing"),
        132007 | 132015 | 132016 | 132068 => (Permanent, "template_paused"),
        131021 => (Permanent, "invalid_number"),
        _ => (Permanent, "api_error"),
    }
}

/// Classifies a complete HTTP answer that was not a success.
pub fn classify_response(
    http_status: u16,
    code: Option<i64>,
    message: String,
    retry_after: Option<Duration>,
) -> ApiFailure {
    let (class, reason) = match code {
        Some(c) => {
            let (class, reason) = class_of_code(c);
            // A 429 or 5xx is retryable whatever code rides along, unless the code says the
            // account itself is broken (retrying that only burns attempts).
            if (http_status == 429 || http_status >= 500) && class == FailureClass::Permanent {
                (FailureClass::Retryable, "api_error")
            } else {
                (class, reason)
            }
        }
        None if http_status == 429 || http_status >= 500 => (FailureClass::Retryable, "api_error"),
        None if http_status == 401 || http_status == 403 => (FailureClass::Account, "account_auth"),
        None => (FailureClass::Permanent, "api_error"),
    };
    ApiFailure {
        class,
        code,
        http_status: Some(http_status),
        message,
        retry_after,
        reason,
    }
}

/// Classifies a transport failure. `sent` says whether the request may have reached the server.
pub fn classify_transport(message: String, request_may_have_been_sent: bool) -> ApiFailure {
    ApiFailure {
        class: if request_may_have_been_sent {
            FailureClass::Ambiguous
        } else {
            FailureClass::Retryable
        },
        code: None,
        http_status: None,
        message,
        retry_after: None,
        reason: if request_may_have_been_sent {
            "ambiguous"
        } else {
            "api_error"
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use FailureClass::*;

    #[test]
    fn meta_codes_decide_before_http_status() {
        let c = |status, code| classify_response(status, Some(code), String::new(), None).class;
        assert_eq!(c(400, 130429), Retryable);
        assert_eq!(c(400, 131000), Retryable);
        assert_eq!(c(400, 131016), Retryable);
        assert_eq!(c(400, 80007), Retryable);
        assert_eq!(c(400, 131056), PairLimited);
        assert_eq!(c(400, 131026), Permanent);
        assert_eq!(c(400, 131047), Permanent);
        assert_eq!(c(400, 131051), Permanent);
        assert_eq!(c(400, 132000), Permanent);
        assert_eq!(c(401, 190), Account);
        assert_eq!(c(403, 131031), Account);
        assert_eq!(c(400, 131042), Account);
        // A 5xx is retried even if it carries a code that would otherwise be permanent.
        assert_eq!(c(503, 100), Retryable);
        assert_eq!(c(500, 190), Account);
    }

    #[test]
    fn without_a_code_the_status_decides() {
        let c = |status| classify_response(status, None, String::new(), None).class;
        assert_eq!(c(429), Retryable);
        assert_eq!(c(502), Retryable);
        assert_eq!(c(401), Account);
        assert_eq!(c(400), Permanent);
    }

    #[test]
    fn a_timeout_after_sending_is_ambiguous_a_refused_connection_is_not() {
        assert_eq!(classify_transport("t".into(), true).class, Ambiguous);
        assert_eq!(classify_transport("c".into(), false).class, Retryable);
    }

    #[test]
    fn failed_reasons_are_machine_readable() {
        assert_eq!(class_of_code(131026).1, "undeliverable");
        assert_eq!(class_of_code(132015).1, "template_paused");
        assert_eq!(class_of_code(999999).1, "api_error");
    }
}
