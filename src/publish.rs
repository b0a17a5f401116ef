//! `sendwell publish`: puts send jobs on `sendwell.jobs` the way an upstream service should —
//! routing key = the recipient's E.164 digits, persistent, publisher confirms awaited. The first
//! tool an upstream developer tries, and a reference for their own publisher.

use std::io::BufRead;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

use crate::amqp::topology::JOBS_EXCHANGE;

/// How many confirms may be outstanding at once: enough to keep the broker busy.
const WINDOW: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishToolError {
    /// The connection's error, with the URL (which may hold the password) cut out.
    #[error("cannot reach the broker: {0}")]
    Connect(String),
    #[error("broker: {0} (has the daemon run once to declare sendwell.jobs?)")]
    Broker(lapin::Error),
    #[error("line {line}: {reason}")]
    Input { line: usize, reason: String },
    #[error(
        "{0} job(s) were not confirmed by the broker (nacked or unroutable: is a shard queue bound?)"
    )]
    NotConfirmed(usize),
    #[error("reading input: {0}")]
    Io(#[from] std::io::Error),
}

/// Splits input into jobs: one JSON object, a JSON array of objects, or JSON lines.
pub fn parse_jobs(text: &str) -> Result<Vec<serde_json::Value>, PublishToolError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str::<Vec<serde_json::Value>>(trimmed).map_err(|e| {
            PublishToolError::Input {
                line: e.line(),
                reason: e.to_string(),
            }
        });
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(trimmed)
        && v.is_object()
    {
        return Ok(vec![v]);
    }
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).map_err(|e| PublishToolError::Input {
            line: i + 1,
            reason: e.to_string(),
        })?;
        jobs.push(v);
    }
    Ok(jobs)
}

/// The consistent-hash routing key for a job: the recipient's digits.
pub fn routing_key(job: &serde_json::Value) -> String {
    job.get("to")
        .and_then(|t| t.as_str())
        .map(|t| t.trim_start_matches('+').to_string())
        .unwrap_or_default()
}

/// lapin repeats a URL it cannot parse, password and all: never print it.
fn connect_error(url: &str, e: lapin::Error) -> PublishToolError {
    PublishToolError::Connect(e.to_string().replace(url, "<the broker URL>"))
}

/// Publishes the jobs with confirms; returns how many were confirmed.
pub async fn publish_jobs(
    url: &str,
    jobs: &[serde_json::Value],
) -> Result<usize, PublishToolError> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| connect_error(url, e))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(PublishToolError::Broker)?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(PublishToolError::Broker)?;
    let mut pending = FuturesUnordered::new();
    let mut confirmed = 0usize;
    let mut failed = 0usize;
    for job in jobs {
        let payload = serde_json::to_vec(job).unwrap_or_default();
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(jiff::Timestamp::now().as_second().max(0) as u64);
        let confirm = ch
            .basic_publish(
                JOBS_EXCHANGE.into(),
                routing_key(job).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &payload,
                props,
            )
            .await
            .map_err(PublishToolError::Broker)?;
        pending.push(confirm);
        while pending.len() >= WINDOW {
            tally(pending.next().await, &mut confirmed, &mut failed)?;
        }
    }
    while !pending.is_empty() {
        tally(pending.next().await, &mut confirmed, &mut failed)?;
    }
    let _ = conn.close(200, "published".into()).await;
    if failed > 0 {
        return Err(PublishToolError::NotConfirmed(failed));
    }
    Ok(confirmed)
}

fn tally(
    c: Option<lapin::Result<Confirmation>>,
    confirmed: &mut usize,
    failed: &mut usize,
) -> Result<(), PublishToolError> {
    match c {
        Some(Ok(Confirmation::Ack(None))) => *confirmed += 1,
        Some(Ok(_)) => *failed += 1,
        Some(Err(e)) => return Err(PublishToolError::Broker(e)),
        None => {}
    }
    Ok(())
}

/// Reads JSON lines from a reader (stdin).
pub fn read_all(r: impl BufRead) -> Result<String, std::io::Error> {
    let mut s = String::new();
    for line in r.lines() {
        s.push_str(&line?);
        s.push('\n');
    }
    Ok(s)
}

/// `sendwell tail`: prints outcome events as JSON lines as they are published, through a
/// temporary queue of its own bound to `sendwell.outcomes` with `pattern` (`#` = everything,
/// `failed.*` = failures only). Stops after `limit` events when given.
pub async fn tail_outcomes(
    url: &str,
    pattern: &str,
    limit: Option<usize>,
    mut out: impl std::io::Write,
) -> Result<usize, PublishToolError> {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| connect_error(url, e))?;
    let ch = conn
        .create_channel()
        .await
        .map_err(PublishToolError::Broker)?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(PublishToolError::Broker)?;
    ch.queue_bind(
        q.name().clone(),
        crate::amqp::topology::OUTCOMES_EXCHANGE.into(),
        pattern.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(PublishToolError::Broker)?;
    let mut consumer = ch
        .basic_consume(
            q.name().clone(),
            "sendwell-tail".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(PublishToolError::Broker)?;
    let mut n = 0;
    while let Some(d) = consumer.next().await {
        let d = d.map_err(PublishToolError::Broker)?;
        out.write_all(&d.data)?;
        out.write_all(b"\n")?;
        out.flush()?;
        n += 1;
        if limit.is_some_and(|l| n >= l) {
            break;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_may_be_an_object_an_array_or_json_lines() {
        assert_eq!(parse_jobs(r#"{"id":"a"}"#).unwrap().len(), 1);
        assert_eq!(parse_jobs(r#"[{"id":"a"},{"id":"b"}]"#).unwrap().len(), 2);
        assert_eq!(
            parse_jobs("{\"id\":\"a\"}\n\n{\"id\":\"b\"}\n")
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            parse_jobs("{\"id\":\"a\"}\nnot json\n"),
            Err(PublishToolError::Input { line: 2, .. })
        ));
    }

    #[test]
    fn the_routing_key_is_the_recipients_digits() {
        let j: serde_json::Value = serde_json::from_str(r#"{"to":"+491701234567"}"#).unwrap();
        assert_eq!(routing_key(&j), "491701234567");
    }
}
