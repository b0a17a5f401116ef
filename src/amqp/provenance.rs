//! Who may speak for sendwell on the broker. Messages sendwell sends to itself (consent
//! questions and webhook events routed through `sendwell.jobs`, jobs back from a delay queue,
//! consent imports) carry `x-sendwell-*` headers that change what the consumer does with them.
//! A header is something any publisher can set; the `user_id` property is not: RabbitMQ refuses
//! a publish whose `user_id` differs from the connection's user (its "validated user ID"), so a
//! message whose `user_id` is sendwell's own broker user was published by sendwell (or by a
//! user the operator tagged `impersonator`). Every internal message carries it; a message with
//! an `x-sendwell-*` header and any other `user_id` is forged and is refused as an invalid job.
//!
//! Chosen over a separate internal exchange because it needs no new permission rules from the
//! operator (a wrong `write` regex there would silently reopen the hole) and works for every
//! path an internal message takes, including dead-lettering from the delay queues, which keeps
//! the properties of the message.

use std::str::FromStr;

use lapin::BasicProperties;
use lapin::types::ShortString;

/// Prefix of the headers only sendwell may set on messages it consumes.
pub const INTERNAL_HEADER_PREFIX: &str = "x-sendwell-";

/// The headers of a job back from a delay queue (see [`Identity::forged_claim`]).
const LEGACY_DELAY_HEADERS: &[&str] = &["x-sendwell-due", "x-sendwell-attempts"];

/// The broker user sendwell connects as: the AMQP URI's user name (percent-decoded), or
/// `guest` when the URI names none, as lapin and RabbitMQ read it.
pub fn broker_user(url: &str) -> String {
    lapin::uri::AMQPUri::from_str(url)
        .map(|u| u.authority.userinfo.username)
        .unwrap_or_else(|_| "guest".into())
}

/// sendwell's own identity on the broker, stamped on everything it publishes to itself.
#[derive(Clone, Debug)]
pub struct Identity {
    user: ShortString,
}

impl Identity {
    pub fn from_url(url: &str) -> Self {
        Self {
            user: ShortString::from(broker_user(url)),
        }
    }

    pub fn user(&self) -> &str {
        self.user.as_str()
    }

    /// `props` with sendwell's validated `user_id`.
    pub fn stamp(&self, props: BasicProperties) -> BasicProperties {
        props.with_user_id(self.user.clone())
    }

    /// Whether the broker vouches that sendwell published this message.
    pub fn vouched(&self, props: &BasicProperties) -> bool {
        props.user_id().as_ref().map(|u| u.as_str()) == Some(self.user.as_str())
    }

    /// A message that claims to be internal (an `x-sendwell-*` header) without the broker
    /// vouching for it: the name of the first such header. `exchange`: the one the message was
    /// delivered through.
    ///
    /// One allowance, for upgrades: copies that a sendwell older than this check put in its
    /// delay queues carry no `user_id`, and come back dead-lettered through the default exchange
    /// (`""`), which no upstream user may write to (docs/operations.md gives them their own
    /// exchange only). Their delay headers are accepted on that path, so a job deferred before
    /// the upgrade is not refused after it; any other claim still needs the `user_id`.
    pub fn forged_claim<'a>(&self, props: &'a BasicProperties, exchange: &str) -> Option<&'a str> {
        if self.vouched(props) {
            return None;
        }
        props
            .headers()
            .as_ref()?
            .inner()
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with(INTERNAL_HEADER_PREFIX))
            .find(|k| !(exchange.is_empty() && LEGACY_DELAY_HEADERS.contains(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    fn with_header(name: &str) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from("x")),
        );
        BasicProperties::default().with_headers(h)
    }

    #[test]
    fn the_broker_user_is_read_from_the_uri_as_lapin_reads_it() {
        assert_eq!(broker_user("amqp://sendwell:pw@host:5672/%2f"), "sendwell");
        assert_eq!(broker_user("amqp://send%40well:pw@host/v"), "send@well");
        assert_eq!(broker_user("amqp://127.0.0.1:5672/%2f"), "guest");
    }

    #[test]
    fn an_internal_header_needs_our_validated_user_id() {
        let us = Identity::from_url("amqp://sendwell:pw@h/v");
        let forged = with_header("x-sendwell-kind");
        assert_eq!(us.forged_claim(&forged, JOBS), Some("x-sendwell-kind"));
        let other = forged.clone().with_user_id("upstream".into());
        assert_eq!(us.forged_claim(&other, JOBS), Some("x-sendwell-kind"));
        assert_eq!(us.forged_claim(&us.stamp(forged), JOBS), None);
        // Headers of others are none of our business; nor is a plain job.
        assert_eq!(us.forged_claim(&with_header("x-death"), JOBS), None);
        assert_eq!(us.forged_claim(&BasicProperties::default(), JOBS), None);
    }

    const JOBS: &str = "sendwell.jobs";

    #[test]
    fn delay_headers_without_user_id_pass_only_through_the_default_exchange() {
        let us = Identity::from_url("amqp://sendwell:pw@h/v");
        let legacy = with_header("x-sendwell-attempts");
        assert_eq!(us.forged_claim(&legacy, ""), None);
        assert_eq!(us.forged_claim(&legacy, JOBS), Some("x-sendwell-attempts"));
        assert_eq!(
            us.forged_claim(&with_header("x-sendwell-kind"), ""),
            Some("x-sendwell-kind")
        );
    }
}
