//! The baseline: the minimal pipeline the issue measures the machine's limit with, run as a
//! child process of the bench (the bench binary re-executed with `SENDWELL_BENCH_ROLE=baseline`)
//! so its CPU and RSS are its own. Consume (prefetch P, manual acks) → parse the job → optionally
//! POST a Cloud API body to the sandbox (reqwest, keep-alive) → publish an outcome and await its
//! confirm → ack that one delivery. Each delivery in a task of its own. No policy at all.
//!
//! Protocol with the bench: the child prints `ready` once it consumes; it stops when its stdin
//! closes, and then prints one JSON line of counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::AsyncReadExt;

/// Set (to `baseline`) in the child's environment.
pub const ROLE_ENV: &str = "SENDWELL_BENCH_ROLE";
pub const URL_ENV: &str = "SENDWELL_BENCH_BL_URL";
pub const QUEUE_ENV: &str = "SENDWELL_BENCH_BL_QUEUE";
pub const OUTCOMES_ENV: &str = "SENDWELL_BENCH_BL_OUTCOMES";
pub const PREFETCH_ENV: &str = "SENDWELL_BENCH_BL_PREFETCH";
/// `http://127.0.0.1:port/v21.0` of the sandbox; unset: broker only.
pub const API_ENV: &str = "SENDWELL_BENCH_BL_API";
pub const TOKEN_ENV: &str = "SENDWELL_BENCH_BL_TOKEN";
pub const ACCOUNTS_ENV: &str = "SENDWELL_BENCH_BL_ACCOUNTS";

/// What the child reports when it stops.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChildStats {
    pub handled: u64,
    pub peak_in_flight: u64,
    pub errors: u64,
}

#[derive(Deserialize)]
struct BJob<'a> {
    #[serde(borrow)]
    id: &'a str,
    #[serde(borrow)]
    account: &'a str,
    #[serde(borrow)]
    to: &'a str,
    #[serde(default, borrow)]
    template: Option<BTemplate<'a>>,
    #[serde(default, borrow)]
    metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BTemplate<'a> {
    #[serde(borrow)]
    name: &'a str,
    #[serde(borrow)]
    language: &'a str,
    #[serde(default, borrow)]
    components: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct ApiBody<'a> {
    messaging_product: &'static str,
    recipient_type: &'static str,
    to: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    template: ApiTemplate<'a>,
    biz_opaque_callback_data: &'a str,
}

#[derive(Serialize)]
struct ApiTemplate<'a> {
    name: &'a str,
    language: ApiLanguage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    components: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct ApiLanguage<'a> {
    code: &'a str,
}

#[derive(Deserialize)]
struct ApiAnswer {
    #[serde(default)]
    messages: Vec<ApiMessage>,
}

#[derive(Deserialize)]
struct ApiMessage {
    id: String,
}

#[derive(Serialize)]
struct Outcome<'a> {
    id: Option<&'a str>,
    account: Option<&'a str>,
    to: Option<&'a str>,
    status: &'static str,
    reason: Option<&'static str>,
    wamid: Option<String>,
    attempts: u32,
    at: String,
    metadata: Option<&'a RawValue>,
}

struct Ctx {
    publish: Channel,
    outcomes: String,
    /// The sandbox's `{base}/{version}` and its client; None: broker only.
    api: Option<(reqwest::Client, String)>,
    token: String,
    phone_number_ids: HashMap<String, String>,
    active: AtomicUsize,
    peak: AtomicUsize,
    handled: AtomicU64,
    errors: AtomicU64,
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("baseline child: {k} is not set"))
}

pub fn child_main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = rt.block_on(child());
    println!("{}", serde_json::to_string(&stats).unwrap());
}

async fn child() -> ChildStats {
    let url = env(URL_ENV);
    let prefetch: u16 = env(PREFETCH_ENV).parse().unwrap();
    let accounts: usize = env(ACCOUNTS_ENV).parse().unwrap();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let consume = conn.create_channel().await.unwrap();
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let publish = conn.create_channel().await.unwrap();
    publish.confirm_select(Default::default()).await.unwrap();
    let api = std::env::var(API_ENV).ok().map(|base| {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(4096)
            .tcp_nodelay(true)
            .build()
            .unwrap();
        (client, base)
    });
    let ctx = Arc::new(Ctx {
        publish,
        outcomes: env(OUTCOMES_ENV),
        api,
        token: env(TOKEN_ENV),
        phone_number_ids: (0..accounts)
            .map(|k| (crate::drive::account(k), crate::drive::phone_number_id(k)))
            .collect(),
        active: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        handled: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let mut consumer = consume
        .basic_consume(
            env(QUEUE_ENV).as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    println!("ready");
    let mut stdin_closed = Box::pin(async {
        let mut sink = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    });
    loop {
        tokio::select! {
            _ = &mut stdin_closed => break,
            d = consumer.next() => match d {
                Some(Ok(d)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { handle(&ctx, d).await });
                }
                _ => {
                    eprintln!("baseline child: the consumer ended");
                    break;
                }
            }
        }
    }
    let stats = ChildStats {
        handled: ctx.handled.load(Ordering::Relaxed),
        peak_in_flight: ctx.peak.load(Ordering::Relaxed) as u64,
        errors: ctx.errors.load(Ordering::Relaxed),
    };
    let _ = conn.close(200, "done".into()).await;
    stats
}

async fn handle(ctx: &Ctx, d: lapin::message::Delivery) {
    let now = ctx.active.fetch_add(1, Ordering::Relaxed) + 1;
    ctx.peak.fetch_max(now, Ordering::Relaxed);
    let ok = step(ctx, &d).await;
    match ok {
        Ok(()) => {
            if d.ack(BasicAckOptions::default()).await.is_err() {
                ctx.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            ctx.errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("baseline child: {e}");
        }
    }
    ctx.handled.fetch_add(1, Ordering::Relaxed);
    ctx.active.fetch_sub(1, Ordering::Relaxed);
}

async fn step(ctx: &Ctx, d: &lapin::message::Delivery) -> Result<(), String> {
    let job = serde_json::from_slice::<BJob>(&d.data).ok();
    let (status, reason, wamid) = match (&job, &ctx.api) {
        (None, _) => ("invalid", Some("malformed"), None),
        (Some(_), None) => ("sent", None, None),
        (Some(job), Some((client, base))) => {
            let pnid = ctx
                .phone_number_ids
                .get(job.account)
                .map(String::as_str)
                .unwrap_or("0");
            let template = job.template.as_ref();
            let body = serde_json::to_vec(&ApiBody {
                messaging_product: "whatsapp",
                recipient_type: "individual",
                to: job.to,
                kind: "template",
                template: ApiTemplate {
                    name: template.map_or("", |t| t.name),
                    language: ApiLanguage {
                        code: template.map_or("", |t| t.language),
                    },
                    components: template.and_then(|t| t.components),
                },
                biz_opaque_callback_data: job.id,
            })
            .unwrap();
            let answer = async {
                let resp = client
                    .post(format!("{base}/{pnid}/messages"))
                    .bearer_auth(&ctx.token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                let ok = resp.status().is_success();
                Ok::<_, reqwest::Error>((ok, resp.bytes().await?))
            }
            .await;
            match answer {
                Ok((true, bytes)) => {
                    let wamid = serde_json::from_slice::<ApiAnswer>(&bytes)
                        .ok()
                        .and_then(|a| a.messages.into_iter().next())
                        .map(|m| m.id);
                    ("sent", None, wamid)
                }
                Ok((false, _)) => ("failed", Some("api_error"), None),
                Err(e) => {
                    ctx.errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("baseline child: POST: {e}");
                    ("failed", Some("transport"), None)
                }
            }
        }
    };
    let outcome = Outcome {
        id: job.as_ref().map(|j| j.id),
        account: job.as_ref().map(|j| j.account),
        to: job.as_ref().map(|j| j.to),
        status,
        reason,
        wamid,
        attempts: u32::from(ctx.api.is_some()),
        at: jiff::Timestamp::now().to_string(),
        metadata: job.as_ref().and_then(|j| j.metadata),
    };
    let body = serde_json::to_vec(&outcome).unwrap();
    let key = match reason {
        Some(r) => format!("{status}.{r}"),
        None => status.to_string(),
    };
    ctx.publish
        .basic_publish(
            ctx.outcomes.as_str().into(),
            key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .map_err(|e| format!("publish: {e}"))?
        .await
        .map_err(|e| format!("confirm: {e}"))?;
    Ok(())
}
