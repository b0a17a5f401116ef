//! Confirmed publishing: a publish returns only when the broker has taken responsibility for the
//! message (publisher confirm), which is what lets the consumer ack the job afterwards.
//! Confirms are pipelined: many tasks publish on one channel concurrently and each awaits its own.

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no queue is bound to take the message (returned)")]
    Unroutable,
}

/// One confirm-mode channel of one connection.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// Cancelled when a publish fails at the broker: the session is broken and must reconnect.
    session: CancellationToken,
}

impl Publisher {
    pub fn new(channel: Channel, session: CancellationToken) -> Self {
        Self { channel, session }
    }

    /// Publishes and waits for the confirm. `mandatory`: a message nobody would receive is an
    /// error (used for our own delay and dead-letter queues, never for the outcome fan-out).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let result = async {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..Default::default()
                    },
                    payload,
                    properties,
                )
                .await?
                .await?;
            match confirm {
                Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
                Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable),
                Confirmation::Nack(_) => Err(PublishError::Nacked),
            }
        }
        .await;
        if let Err(PublishError::Broker(_)) = &result {
            self.session.cancel();
        }
        result
    }
}

/// Properties for a JSON message sendwell publishes.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(jiff::Timestamp::now().as_second().max(0) as u64)
}
