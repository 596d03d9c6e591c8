//! The build queue on RabbitMQ (lapin). Topology, all durable, named from one base name `<q>`:
//! - queue `<q>`: build jobs, persistent messages, consumed with manual acks and a prefetch equal
//!   to the worker's concurrency;
//! - queue `<q>.retry`: jobs waiting out a backoff (per-message TTL), dead-lettered back to `<q>`;
//! - queue `<q>.dead`: jobs that kept failing on infrastructure, kept for an operator;
//! - fanout exchange `<q>.events`: every finished build, for whoever wants to know.
//!
//! Every publish waits for the broker's confirm. Connections are re-made after a broker restart:
//! the publisher on its next publish, the consumer by its own loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::{watch, Mutex};

use crate::error::{Error, Result};
use crate::model::{Build, Job};

/// Longest wait for the broker on any one call.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue's names.
#[derive(Debug, Clone)]
pub struct Topology {
    pub jobs: String,
}

impl Topology {
    pub fn new(base: &str) -> Self {
        Self {
            jobs: base.to_string(),
        }
    }
    pub fn retry(&self) -> String {
        format!("{}.retry", self.jobs)
    }
    pub fn dead(&self) -> String {
        format!("{}.dead", self.jobs)
    }
    pub fn events(&self) -> String {
        format!("{}.events", self.jobs)
    }
}

/// One delivered job, to be acknowledged once its result is stored.
pub struct Incoming {
    /// The job, or why the message is not one.
    pub job: std::result::Result<Job, String>,
    pub redelivered: bool,
    acker: lapin::Acker,
}

impl Incoming {
    /// Done with it: the broker forgets the message.
    pub async fn ack(&self) -> Result<()> {
        within("ack", self.acker.ack(BasicAckOptions::default())).await?;
        Ok(())
    }

    /// Not done: the broker delivers it again (to this or another worker).
    pub async fn requeue(&self) -> Result<()> {
        let options = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        within("nack", self.acker.nack(options)).await?;
        Ok(())
    }
}

async fn within<T>(op: &str, call: impl Future<Output = lapin::Result<T>>) -> Result<T> {
    match tokio::time::timeout(BROKER_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| Error::Broker(format!("AMQP {op} failed: {e}"))),
        Err(_) => Err(Error::Broker(format!("AMQP {op} timed out"))),
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

/// The build queue's client: publishes with confirms, consumes with manual acks.
pub struct Broker {
    url: String,
    pub topology: Topology,
    publisher: Mutex<Option<(Connection, Channel)>>,
}

impl Broker {
    pub fn new(url: &str, topology: Topology) -> Self {
        Self {
            url: url.to_string(),
            topology,
            publisher: Mutex::new(None),
        }
    }

    /// A new connection and a channel in confirm mode, with the topology declared.
    async fn connect(&self) -> Result<(Connection, Channel)> {
        let connection = within(
            "connect",
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await?;
        let channel = within("open channel", connection.create_channel()).await?;
        within(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        self.declare(&channel).await?;
        Ok((connection, channel))
    }

    async fn declare(&self, channel: &Channel) -> Result<()> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let t = &self.topology;
        within(
            "declare",
            channel.queue_declare(t.jobs.as_str().into(), durable, FieldTable::default()),
        )
        .await?;
        let mut retry_args = FieldTable::default();
        retry_args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        retry_args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(t.jobs.as_str())),
        );
        within(
            "declare",
            channel.queue_declare(t.retry().as_str().into(), durable, retry_args),
        )
        .await?;
        within(
            "declare",
            channel.queue_declare(t.dead().as_str().into(), durable, FieldTable::default()),
        )
        .await?;
        let exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        within(
            "declare",
            channel.exchange_declare(
                t.events().as_str().into(),
                ExchangeKind::Fanout,
                exchange,
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(())
    }

    /// Publishes and waits for the broker's confirm; on a broken connection, connects again once.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let mut publisher = self.publisher.lock().await;
        let mut last_error = None;
        for _ in 0..2 {
            if publisher
                .as_ref()
                .is_none_or(|(c, _)| !c.status().connected())
            {
                match self.connect().await {
                    Ok(pair) => *publisher = Some(pair),
                    Err(err) => {
                        last_error = Some(err);
                        continue;
                    }
                }
            }
            let Some((_, channel)) = publisher.as_ref() else {
                continue;
            };
            let sent = within(
                "publish",
                channel.basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    payload,
                    properties.clone(),
                ),
            )
            .await;
            let confirm = match sent {
                Ok(confirm) => within("publish confirm", confirm).await,
                Err(err) => Err(err),
            };
            match confirm {
                Ok(Confirmation::Ack(_)) | Ok(Confirmation::NotRequested) => return Ok(()),
                Ok(Confirmation::Nack(_)) => {
                    last_error = Some(Error::Broker(
                        "the broker refused the message (nack)".into(),
                    ))
                }
                Err(err) => last_error = Some(err),
            }
            *publisher = None;
        }
        Err(last_error.unwrap_or_else(|| Error::Broker("publish failed".into())))
    }

    fn encode(job: &Job) -> Result<Vec<u8>> {
        serde_json::to_vec(job).map_err(|e| Error::Broker(format!("failed to encode job: {e}")))
    }

    /// Queues a build job.
    pub async fn publish_job(&self, job: &Job) -> Result<()> {
        self.publish("", &self.topology.jobs, &Self::encode(job)?, persistent())
            .await
    }

    /// Queues a job again after `delay` (through the retry queue's TTL).
    pub async fn publish_retry(&self, job: &Job, delay: Duration) -> Result<()> {
        let properties =
            persistent().with_expiration(ShortString::from(delay.as_millis().to_string()));
        self.publish("", &self.topology.retry(), &Self::encode(job)?, properties)
            .await
    }

    /// Parks a job that keeps failing on the dead-letter queue, with the reason in a header.
    pub async fn publish_dead(&self, payload: &[u8], reason: &str) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-hearth-reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        self.publish(
            "",
            &self.topology.dead(),
            payload,
            persistent().with_headers(headers),
        )
        .await
    }

    /// Tells subscribers a build finished (the record as the API shows it).
    pub async fn publish_event(&self, build: &Build) -> Result<()> {
        let payload = build.to_json().to_string();
        self.publish(
            &self.topology.events(),
            "",
            payload.as_bytes(),
            persistent(),
        )
        .await
    }

    /// Consumes jobs until `shutdown` turns true, running `handler` for each delivery (at most
    /// `concurrency` at once), re-connecting after the broker goes away. On shutdown it stops
    /// taking jobs and waits for the handlers in flight.
    pub async fn consume<H, F>(
        self: Arc<Self>,
        concurrency: u16,
        handler: H,
        mut shutdown: watch::Receiver<bool>,
    ) where
        H: Fn(Incoming) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let mut tasks = tokio::task::JoinSet::new();
        let mut backoff = Duration::from_millis(200);
        'connect: while !*shutdown.borrow() {
            let consumer = async {
                let (connection, channel) = self.connect().await?;
                within(
                    "basic.qos",
                    channel.basic_qos(concurrency, BasicQosOptions::default()),
                )
                .await?;
                let consumer = within(
                    "basic.consume",
                    channel.basic_consume(
                        self.topology.jobs.as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await?;
                Ok::<_, Error>((connection, channel, consumer))
            };
            let (connection, _channel, mut consumer) = match consumer.await {
                Ok(parts) => parts,
                Err(err) => {
                    tracing::warn!(error = %err, retry_in = ?backoff, "build queue unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(queue = %self.topology.jobs, concurrency, "consuming build jobs");
            loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        if *shutdown.borrow() {
                            break 'connect;
                        }
                    }
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let incoming = Incoming {
                                job: serde_json::from_slice(&delivery.data).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&delivery.data))),
                                redelivered: delivery.redelivered,
                                acker: delivery.acker,
                            };
                            tasks.spawn(handler(incoming));
                        }
                        Some(Err(err)) => {
                            tracing::warn!(error = %err, "build queue connection lost");
                            break;
                        }
                        None => {
                            tracing::warn!("build queue consumer cancelled");
                            break;
                        }
                    }
                }
            }
            drop(connection);
        }
        // Drain: builds in flight finish and store their result; their acks still go out.
        while tasks.join_next().await.is_some() {}
    }

    /// Deletes the queues and exchange (tests and `hearth-builds --purge` use it).
    pub async fn delete_topology(&self) -> Result<()> {
        let (connection, channel) = self.connect().await?;
        let t = &self.topology;
        for queue in [t.jobs.clone(), t.retry(), t.dead()] {
            within(
                "queue.delete",
                channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
            )
            .await?;
        }
        within(
            "exchange.delete",
            channel.exchange_delete(t.events().as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await?;
        let _ = connection.close(200, "bye".into()).await;
        Ok(())
    }
}
