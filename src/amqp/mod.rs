//! The broker edge: [`topology`] declares the queues, [`consumer`] takes and settles jobs,
//! [`publisher`] publishes with confirms. This file keeps one connection alive: it connects,
//! declares, consumes, and on any loss reconnects with jittered backoff while `/readyz` says
//! not ready. Unacked jobs of a lost connection are redelivered by the broker; the ledger keeps
//! them from being sent twice.
//!
//! It also tells [`crate::instances::Instance`] its role: the first delivery from the shard's
//! jobs queue in a session makes this instance the active one (the queue is
//! single-active-consumer), and the session's end makes it a standby again. That first delivery
//! starts the takeover: its hooks run while the jobs delivered meanwhile are held, and only then
//! are they processed. Until it has had a delivery, the session publishes a probe to its own
//! jobs queue every 2 s ([`probe`]), so that an active instance with no job flowing learns it
//! is active; whoever receives a probe acks it and processes nothing.

pub mod acks;
pub mod consumer;
pub mod provenance;
pub mod publisher;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::instances::Instance;
use consumer::{Session, Worker};
use publisher::Publisher;
use topology::TopologyError;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The session was consuming when it ended: the next connect starts a fresh backoff.
    #[error("{0}")]
    LostAfterConsuming(String),
}

/// How long each closing step may take before shutdown stops waiting for the broker.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an instance with no delivery in its session probes its shard queue (decision 1).
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Runs until `shutdown`, reconnecting as needed. Returns an error only for problems a
/// reconnect cannot fix (a missing plugin, a queue declared with other arguments).
pub async fn run(
    worker: Arc<Worker>,
    instance: Arc<Instance>,
    cfg: BrokerConfig,
    connected: Arc<AtomicBool>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), TopologyError> {
    let mut failures: u32 = 0;
    let mut ever_connected = false;
    loop {
        let result = session(
            &worker,
            &instance,
            &cfg,
            &connected,
            &shutdown,
            grace,
            &mut ever_connected,
        )
        .await;
        instance.session_ended();
        connected.store(false, Ordering::SeqCst);
        crate::metrics::broker_connected(false);
        let e = match result {
            Ok(()) => return Ok(()),
            Err(SessionError::Topology(e)) if e.is_fatal() => {
                tracing::error!(error = %e, "Broker topology cannot be set up.");
                return Err(e);
            }
            Err(e) => e,
        };
        if matches!(e, SessionError::LostAfterConsuming(_)) {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let cap = Duration::from_millis(200)
            .saturating_mul(1 << failures.min(10))
            .min(cfg.reconnect_max_delay);
        let wait = Duration::from_millis(
            rand::rng().random_range(cap.as_millis() as u64 / 2..=cap.as_millis() as u64),
        );
        tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "Broker connection lost or refused; reconnecting.");
        tokio::select! {
            _ = shutdown.cancelled() => {
                drain(&worker, grace).await;
                return Ok(());
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn session(
    worker: &Arc<Worker>,
    instance: &Arc<Instance>,
    cfg: &BrokerConfig,
    connected: &AtomicBool,
    shutdown: &CancellationToken,
    grace: Duration,
    ever_connected: &mut bool,
) -> Result<(), SessionError> {
    let names = &worker.names;
    let props = ConnectionProperties::default()
        .with_connection_name(format!("sendwell shard {}", names.shard).into());
    // Connecting can hang (an unreachable host); shutdown must not wait for it.
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        c = Connection::connect(cfg.url.expose(), props) => c?,
    };
    let set_up = tokio::select! {
        _ = shutdown.cancelled() => None,
        s = setup(&conn, worker, cfg) => Some(s),
    };
    let Some(set_up) = set_up else {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "sendwell closing".into())).await;
        return Ok(());
    };
    let (session, consume_channel, tag, mut consumer, mut webhooks, mut consent) = set_up?;
    let token = session.token.clone();
    tokio::spawn(probe(
        conn.create_channel().await?,
        names.jobs_queue.clone(),
        worker.identity().clone(),
        instance.clone(),
        token.clone(),
    ));
    // The takeover: started by the session's first delivery from the jobs queue; the jobs that
    // arrive while its hooks run wait in `held`, in order, and are handed on when it is done.
    let mut taking_over: Option<tokio::task::JoinHandle<()>> = None;
    let mut held: Vec<Delivery> = Vec::new();
    let (took_over, mut took_over_rx) = tokio::sync::mpsc::channel::<()>(1);

    connected.store(true, Ordering::SeqCst);
    crate::metrics::broker_connected(true);
    if *ever_connected {
        crate::metrics::broker_reconnected();
        tracing::info!(broker = %cfg.redacted_url, "Reconnected to the broker.");
    } else {
        tracing::info!(broker = %cfg.redacted_url, queue = %names.jobs_queue, prefetch = cfg.prefetch, "Connected to the broker; consuming.");
    }
    *ever_connected = true;

    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = token.cancelled() => break Err(SessionError::LostAfterConsuming(
                "a job could not be settled on this connection".into(),
            )),
            Some(()) = took_over_rx.recv() => {
                taking_over = None;
                // In arrival order (probes were acked as they came, never held).
                for delivery in held.drain(..) {
                    worker.handle(delivery, &session);
                }
            }
            d = consumer.next() => match d {
                Some(Ok(delivery)) => {
                    session.acks.delivered(delivery.delivery_tag);
                    if !instance.role().is_active() {
                        // The broker delivers this queue to us alone: we are the active one.
                        instance.became_active();
                        let (instance, done) = (instance.clone(), took_over.clone());
                        taking_over = Some(tokio::spawn(async move {
                            instance.run_takeover_hooks().await;
                            let _ = done.send(()).await;
                        }));
                    }
                    if worker.is_probe(&delivery) {
                        worker.ack_probe(delivery, &session);
                    } else if taking_over.is_some() {
                        held.push(delivery);
                    } else {
                        worker.handle(delivery, &session);
                    }
                }
                Some(Err(e)) => break Err(SessionError::LostAfterConsuming(e.to_string())),
                None => break Err(SessionError::LostAfterConsuming(
                    "the broker cancelled the consumer".into(),
                )),
            },
            d = webhooks.next() => match d {
                Some(Ok(delivery)) => {
                    session.acks.delivered(delivery.delivery_tag);
                    worker.handle(delivery, &session)
                }
                Some(Err(e)) => break Err(SessionError::LostAfterConsuming(e.to_string())),
                None => break Err(SessionError::LostAfterConsuming(
                    "the broker cancelled the webhook consumer".into(),
                )),
            },
            d = consent.next() => match d {
                Some(Ok(delivery)) => {
                    session.acks.delivered(delivery.delivery_tag);
                    worker.handle_consent(delivery, &session, false)
                }
                Some(Err(e)) => break Err(SessionError::LostAfterConsuming(e.to_string())),
                None => break Err(SessionError::LostAfterConsuming(
                    "the broker cancelled the consent consumer".into(),
                )),
            },
        }
    };
    connected.store(false, Ordering::SeqCst);
    // From here the broker may give the queue to another instance.
    instance.session_ended();
    if let Some(t) = taking_over.take() {
        // The next session's takeover runs them again.
        t.abort();
    }
    for delivery in held.drain(..) {
        // Never processed here: back to the queue now rather than when the connection closes
        // after the drain (the next active instance takes them).
        session.acks.forget(delivery.delivery_tag);
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await;
    }
    if end.is_ok() {
        // Stop taking new jobs, finish the ones in flight, leave the rest unacked.
        for t in [
            tag.as_str(),
            &format!("{tag}-webhooks"),
            &format!("{tag}-consent"),
        ] {
            let _ = tokio::time::timeout(
                CLOSE_TIMEOUT,
                consume_channel.basic_cancel(t.into(), BasicCancelOptions::default()),
            )
            .await;
        }
        drain(worker, grace).await;
        // The last acks of the finished jobs, before the connection goes.
        if let Err(e) = session.acks.flush(Duration::ZERO).await {
            tracing::warn!(error = %e, "Could not ack the last settled jobs; the broker will redeliver them (they are recorded as done).");
        }
    }
    token.cancel();
    // The close handshake is what makes the broker take every ack written before it; a close
    // that does not finish drops the connection, and acks still in its buffers are lost (their
    // jobs come back, and the ledger keeps them from being sent twice). Said, so that a
    // redelivery after a clean stop has its cause in the log.
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "sendwell closing".into())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if end.is_ok() => {
            tracing::warn!(error = %e, "The broker connection did not close cleanly; jobs acked last may be redelivered (they are recorded as done).");
        }
        Err(_) if end.is_ok() => {
            tracing::warn!(
                after_s = CLOSE_TIMEOUT.as_secs(),
                "The broker connection did not close in time; jobs acked last may be redelivered (they are recorded as done)."
            );
        }
        _ => {}
    }
    end
}

/// Declares the topology and opens the publishing and consuming channels of one connection.
async fn setup(
    conn: &Connection,
    worker: &Worker,
    cfg: &BrokerConfig,
) -> Result<(Arc<Session>, Channel, String, Consumer, Consumer, Consumer), SessionError> {
    let names = &worker.names;
    let topo = conn.create_channel().await?;
    topology::declare(&topo, names).await?;

    let token = CancellationToken::new();
    // The topology channel stays open to read queue depths for the alerts ("jobs waiting but
    // nothing sent", "dead letters growing"), until the session ends.
    tokio::spawn(poll_queue_depths(
        topo,
        names.jobs_queue.clone(),
        token.clone(),
    ));
    let publish_channel = conn.create_channel().await?;
    publish_channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let session = Arc::new(Session::new(
        Publisher::new(publish_channel, token.clone()),
        Arc::new(acks::AckBatcher::default()),
        token,
        worker.shutdown(),
    ));
    tokio::spawn(session.acks.clone().run(session.token.clone()));

    let consume_channel = conn.create_channel().await?;
    consume_channel
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("sendwell-{}-{}", names.shard, uuid::Uuid::new_v4().simple());
    let consumer = consume_channel
        .basic_consume(
            names.jobs_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Account-level webhook events, for every shard.
    let webhooks = consume_channel
        .basic_consume(
            names.webhooks_queue.as_str().into(),
            format!("{tag}-webhooks").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Consent events, for every instance.
    let consent = consume_channel
        .basic_consume(
            names.consent_queue.as_str().into(),
            format!("{tag}-consent").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((session, consume_channel, tag, consumer, webhooks, consent))
}

/// Publishes a probe to this instance's own shard queue every [`PROBE_EVERY`] while the
/// instance has had no delivery in this session (its role is standby), until `stop` (the
/// session's end). The active consumer of the queue gets it: if that is us, we learn we are
/// active with no job flowing; if it is another instance, it acks it and nothing happens.
///
/// A probe carries header `x-sendwell-probe` (our instance id) and our broker user as
/// `user_id`, which the broker validates; nothing else (an empty body). No probe goes out while
/// the queue has messages ready: the active instance will get them (if that is us, they make us
/// active), and a probe would only queue up behind them. So at most one of ours waits in the
/// queue at a time, and none piles up behind a backlog. No per-message TTL either: an expired
/// message of this queue is dead-lettered to `sendwell.dead` (and would set off the
/// dead-letter alert), while a probe left over in a queue nobody consumes is acked by whichever
/// instance starts on it next (and rightly makes it active).
async fn probe(
    ch: Channel,
    queue: String,
    identity: provenance::Identity,
    instance: Arc<Instance>,
    stop: CancellationToken,
) {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(consumer::HEADER_PROBE),
        AMQPValue::LongString(LongString::from(instance.id.to_string())),
    );
    let props = identity.stamp(BasicProperties::default().with_headers(headers));
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if instance.role().is_active() {
            break;
        }
        let ready = match ch
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(q) => q.message_count(),
            // The channel went with its connection: the session is ending.
            Err(_) => return,
        };
        if ready > 0 {
            continue;
        }
        let published = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &[],
                props.clone(),
            )
            .await;
        match published {
            Ok(_) => crate::metrics::probe_sent(),
            Err(e) => {
                // Once per session at most: the loop ends with the channel.
                tracing::warn!(error = %e, "Could not publish a probe to the shard queue; this instance learns its role from deliveries only until the next broker session.");
                return;
            }
        }
    }
    let _ = ch.close(200, "sendwell closing".into()).await;
}

/// Every 15 s: ready messages in the shard queue and in `sendwell.dead`, by passive declare.
async fn poll_queue_depths(ch: Channel, jobs_queue: String, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for (label, queue) in [("jobs", jobs_queue.as_str()), ("dead", topology::DEAD)] {
            match ch
                .queue_declare(queue.into(), passive, FieldTable::default())
                .await
            {
                Ok(q) => crate::metrics::queue_messages(label, q.message_count()),
                // The channel is gone with its connection; the next session polls again.
                Err(_) => return,
            }
        }
    }
    let _ = ch.close(200, "sendwell closing".into()).await;
}

/// Waits for in-flight jobs, at most `grace`.
async fn drain(worker: &Worker, grace: Duration) {
    worker.tracker.close();
    if tokio::time::timeout(grace, worker.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "Grace period over with jobs still in flight; they stay unacked and will be redelivered."
        );
    } else {
        tracing::info!("In-flight jobs finished.");
    }
}
