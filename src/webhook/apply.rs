//! What each webhook event changes. Runs on the shard that owns the recipient (status, inbound,
//! preference events come through the recipient's lane, after any job of theirs in flight) or on
//! every shard (account-level changes). Returns what must be published; the caller publishes it
//! with confirms, then records the event as applied, then acks.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::parse::{Event, EventKind};
use crate::cloud_api::classify::class_of_code;
use crate::config::Config;
use crate::consent::flow::{ConsentFlow, InboundMessage};
use crate::consent::wa_id::{How, Resolved};
use crate::job::Cost;
use crate::pipeline::meta_state::MetaState;
use crate::pricing::billed;
use crate::privacy::Masked;
use crate::store::{KvOp, Ledger, LedgerError, LedgerState, Table};

/// A message to publish as a consequence of an event.
#[derive(Debug, PartialEq, Eq)]
pub struct Publication {
    pub exchange: &'static str,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// Store writes that record this publication's effect (a delivery level reached): made
    /// only once the broker confirmed it, so a failed publish leaves the state that makes the
    /// retried callback publish it again.
    pub after_confirm: Vec<KvOp>,
    /// An opt-out repeated under another form of the customer's number (see
    /// [`Applier::forms`]): applied and published like the first, but never answered with a
    /// reply of its own.
    pub derived: bool,
}

/// What applying one event asks of the caller: publish, then (every publication confirmed)
/// write, then count.
#[derive(Debug, Default)]
pub struct Effects {
    pub publications: Vec<Publication>,
    /// Store writes that record the event as applied (a status's delivery row), made once
    /// every publication is confirmed and in the same transaction as their `after_confirm`.
    pub record: Vec<KvOp>,
    /// A first record of a message's row made by a status that reaches no level (`sent`):
    /// written only if the row is still absent, so that it never overwrites a level another
    /// instance recorded meanwhile (a reshard, a failover with the old active still running).
    pub record_if_absent: Option<(Table, Vec<u8>, Vec<u8>)>,
    /// Billing to count once the writes above are done: counted before them, a write that
    /// failed (the broker redelivers the event) would count it again.
    pub billed: Option<BilledCount>,
}

impl From<Vec<Publication>> for Effects {
    fn from(publications: Vec<Publication>) -> Self {
        Effects {
            publications,
            ..Effects::default()
        }
    }
}

/// A message's billed cost, for `sendwell_billed_cost_total`.
#[derive(Debug)]
pub struct BilledCount {
    account: String,
    category: String,
    market: String,
    country: &'static str,
    currency: String,
    micros: i64,
}

impl BilledCount {
    pub fn count(&self) {
        crate::metrics::billed_cost(
            &self.account,
            &self.category,
            &self.market,
            self.country,
            &self.currency,
            self.micros,
        );
    }
}

pub struct Applier {
    pub ledger: Ledger,
    pub meta: Arc<MetaState>,
    /// Shared with the pipeline's spend, so a reloaded table prices both.
    pub prices: Arc<crate::pricing::SharedPrices>,
    /// phone_number_id → account name.
    accounts_by_number: HashMap<String, String>,
    /// WABA id → its accounts.
    accounts_by_waba: HashMap<String, Vec<String>>,
    /// What customers' messages mean for consent (STOP, START, YES/NO).
    pub consent: Option<Arc<ConsentFlow>>,
    /// Where Meta's limit signals go: tier changes, 130429, 131049.
    pub limits: Option<Arc<crate::pipeline::limits::Limits>>,
    /// Which delivery updates are published (`[webhook] delivery_events`).
    publish: Vec<crate::config::DeliveryEventKind>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    S(String),
    N(i64),
}

impl StrOrNum {
    fn secs(&self) -> Option<i64> {
        match self {
            StrOrNum::S(s) => s.parse().ok(),
            StrOrNum::N(n) => Some(*n),
        }
    }
}

fn at_of(ts: &Option<StrOrNum>) -> Timestamp {
    ts.as_ref()
        .and_then(|t| t.secs())
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or_else(Timestamp::now)
}

#[derive(Deserialize)]
struct Status {
    id: String,
    status: String,
    #[serde(default)]
    timestamp: Option<StrOrNum>,
    recipient_id: String,
    #[serde(default)]
    biz_opaque_callback_data: Option<String>,
    #[serde(default)]
    pricing: Option<Pricing>,
    #[serde(default)]
    errors: Vec<MetaError>,
}

#[derive(Deserialize)]
struct Pricing {
    #[serde(default)]
    billable: Option<bool>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    category: Option<String>,
}

#[derive(Deserialize)]
struct MetaError {
    code: i64,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// The parts of a job's stored final outcome a delivery update repeats. Read for every status
/// callback: its strings are borrowed from the stored bytes where they need no unescaping
/// (serde borrows a plain `Cow<str>`; the optional ones come back owned).
#[derive(Deserialize)]
struct StoredOutcome<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    account: Cow<'a, str>,
    #[serde(borrow)]
    to: Cow<'a, str>,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(default)]
    attempts: u32,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    category: Option<Cow<'a, str>>,
    /// The message the send's answer named: statuses of another (the first try of an
    /// ambiguous send that did go through) are kept apart (see `Applier::status`).
    #[serde(borrow, default)]
    wamid: Option<Cow<'a, str>>,
}

/// CONTRACT §3 for delivery updates (`delivered`, `read`, `undelivered`); `billed_cost` is an
/// addition: what Meta's `pricing` says this message costs, from the price table.
#[derive(Serialize, schemars::JsonSchema)]
#[schemars(
    title = "Delivery update",
    description = "What a webhook said about a sent job, later: routing key `delivery.<status>`. Each status at most once per job and never backwards; nothing follows `undelivered`."
)]
pub(crate) struct DeliveryEvent<'a> {
    /// The job's id.
    id: &'a str,
    account: &'a str,
    /// The job's `to`.
    to: &'a str,
    #[schemars(extend("enum" = ["delivered", "read", "undelivered"]))]
    status: &'static str,
    /// On `undelivered`: as for a `failed` outcome (`undeliverable`, `opted_out`, `api_error`, …).
    reason: Option<&'static str>,
    /// On `undelivered`: Meta's error message.
    detail: Option<String>,
    /// The Cloud API's message id the webhook named.
    wamid: &'a str,
    /// The attempts of the job's final outcome.
    attempts: u32,
    /// Always null here: the estimate is on the `sent` outcome.
    estimated_cost: Option<Cost>,
    /// The webhook's time.
    #[schemars(with = "String", extend("format" = "date-time"))]
    at: Timestamp,
    /// The job's `metadata`.
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    metadata: Option<&'a RawValue>,
    /// On `undelivered`: Meta's error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<i64>,
    /// The job's category.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::job::Category>")]
    category: Option<&'a str>,
    /// What the price table says the message costs, when the webhook's `pricing` says Meta
    /// bills it.
    #[serde(skip_serializing_if = "Option::is_none")]
    billed_cost: Option<Cost>,
}

/// CONTRACT §4, for opt-outs learned from Meta.
#[derive(Serialize)]
struct ConsentEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    account: &'a str,
    to: String,
    purposes: [&'a str; 0],
    source: &'static str,
    at: Timestamp,
    evidence: String,
}

/// Delivery levels, monotonic: a later webhook never moves a job backwards.
const DELIVERED: u8 = 1;
const READ: u8 = 2;
const UNDELIVERED: u8 = 3;

/// Flags of a delivery row: which statuses were applied, and whether billing was counted.
const SENT_APPLIED: u8 = 1;
const DELIVERED_APPLIED: u8 = 2;
const READ_APPLIED: u8 = 4;
const BILLED: u8 = 16;

/// The flag of a status; 0 for one whose repeats the caller recognises by its bytes instead
/// (`failed`: see [`Applier::records_itself`]) or that changes nothing twice (`played`).
fn status_bit(status: &str) -> u8 {
    match status {
        "sent" => SENT_APPLIED,
        "delivered" => DELIVERED_APPLIED,
        "read" => READ_APPLIED,
        _ => 0,
    }
}

/// A job's row in [`Table::Delivery`]: `[level, flags]`. Older builds wrote `[level]` only
/// once a level was reached, and kept the statuses applied in `WebhookSeen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DeliveryRow {
    level: u8,
    flags: u8,
    form: RowForm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowForm {
    Absent,
    /// `[level]`, from an older build.
    Legacy,
    Current,
}

impl DeliveryRow {
    fn decode(v: Option<&[u8]>) -> Self {
        let (level, flags, form) = match v {
            Some([level, flags, ..]) => (*level, *flags, RowForm::Current),
            Some([level]) => (*level, 0, RowForm::Legacy),
            _ => (0, 0, RowForm::Absent),
        };
        DeliveryRow { level, flags, form }
    }

    /// Adds the write that stores this row to `effects`, if it changed since `before`: an
    /// insert if absent when there was no row and no level is reached (see
    /// [`Effects::record_if_absent`]), else a put after the confirms.
    fn record(&self, before: &DeliveryRow, job_id: &str, effects: &mut Effects) {
        if (self.level, self.flags) == (before.level, before.flags) {
            return;
        }
        let value = vec![self.level, self.flags];
        if before.form == RowForm::Absent && self.level == 0 {
            effects.record_if_absent = Some((Table::Delivery, job_id.as_bytes().to_vec(), value));
        } else {
            effects.record.push(KvOp::Put {
                table: Table::Delivery,
                key: job_id.as_bytes().to_vec(),
                value,
            });
        }
    }
}

impl Applier {
    pub fn new(config: &Config, ledger: Ledger, meta: Arc<MetaState>) -> Self {
        let mut accounts_by_waba: HashMap<String, Vec<String>> = HashMap::new();
        for a in &config.accounts {
            if let Some(w) = &a.waba_id {
                accounts_by_waba
                    .entry(w.clone())
                    .or_default()
                    .push(a.name.to_string());
            }
        }
        Self {
            ledger,
            meta,
            prices: Arc::new(crate::pricing::SharedPrices::new(config.prices.clone())),
            accounts_by_number: config
                .accounts
                .iter()
                .map(|a| (a.phone_number_id.clone(), a.name.to_string()))
                .collect(),
            accounts_by_waba,
            consent: None,
            limits: None,
            publish: config.webhook.delivery_events.clone(),
        }
    }

    fn account_of(&self, ev: &Event) -> Option<&str> {
        ev.phone_number_id
            .as_deref()
            .and_then(|p| self.accounts_by_number.get(p))
            .map(String::as_str)
    }

    /// Whether an event keeps its own record of being applied, so the caller needs no
    /// `WebhookSeen` row for it: a `sent`, `delivered` or `read` status, whose message's
    /// delivery row says which of them it had (one read the status needs anyway, and no row
    /// per callback). A `failed` status keeps the row of its exact bytes: two different
    /// failures of one message (131049, then 131050) are two events, and the second's opt-out
    /// must not be taken for a repeat.
    pub fn records_itself(ev: &Event) -> bool {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            status: std::borrow::Cow<'a, str>,
        }
        ev.kind == EventKind::Status
            && serde_json::from_str::<Head>(ev.item.get()).is_ok_and(|h| status_bit(&h.status) != 0)
    }

    /// Applies `ev`. `seen_key`: the event's identity in `WebhookSeen` (its bytes' hash), for
    /// the statuses that keep a row there after all (see [`Applier::status`]).
    pub async fn apply(&self, ev: &Event, seen_key: &[u8]) -> Result<Effects, LedgerError> {
        crate::metrics::webhook_event(ev.kind, &ev.field);
        match ev.kind {
            EventKind::Status => self.status(ev, seen_key).await,
            EventKind::Message => self.message(ev).await.map(Effects::from),
            EventKind::UserPreference => self.preference(ev).map(Effects::from),
            EventKind::Error => {
                if let Ok(e) = serde_json::from_str::<MetaError>(ev.item.get()) {
                    crate::metrics::webhook_error(e.code);
                    if e.code == 130429
                        && let Some(limits) = &self.limits
                    {
                        // The number's own account when the event names it, else every
                        // account of the WABA.
                        match self.account_of(ev) {
                            Some(a) => limits.throttled(a),
                            None => limits.throttled_waba(&ev.waba_id),
                        }
                    }
                    if let Some(unlogged) =
                        crate::metrics::log_hourly(("webhook_error", e.code, &ev.waba_id))
                    {
                        tracing::warn!(code = e.code, title = e.title.as_deref().unwrap_or(""), waba = %ev.waba_id, unlogged, "The Cloud API reported an error by webhook (logged once an hour per code and WABA; sendwell_webhook_errors_total counts each).");
                    }
                }
                Ok(Effects::default())
            }
            EventKind::Change => self.change(ev).await.map(Effects::from),
        }
    }

    async fn status(&self, ev: &Event, seen_key: &[u8]) -> Result<Effects, LedgerError> {
        let Ok(s) = serde_json::from_str::<Status>(ev.item.get()) else {
            crate::metrics::webhook_unmatched("unreadable_status");
            return Ok(Effects::default());
        };
        // The job: our id rides in biz_opaque_callback_data (before the shard, see
        // `opaque::callback_data`); otherwise, or when that names no job (data mangled on the
        // way), look the wamid up.
        // With the entry, the delivery row under the same id (see below), in one read.
        let mut found = match &s.biz_opaque_callback_data {
            Some(data) => {
                let id = super::opaque::read_callback_data(data).0;
                let (entry, row) = self.ledger.get_with(id, Table::Delivery).await?;
                entry.map(|e| (e, id.to_string(), row))
            }
            None => None,
        };
        if found.is_none()
            && let Some(id) = self
                .ledger
                .kv_get(Table::Wamids, s.id.as_bytes())
                .await?
                .and_then(|v| String::from_utf8(v).ok())
        {
            let (entry, row) = self.ledger.get_with(&id, Table::Delivery).await?;
            found = entry.map(|e| (e, id, row));
        }
        let Some((entry, entry_id, row_of_id)) =
            found.filter(|(e, _, _)| e.state == LedgerState::Final)
        else {
            crate::metrics::webhook_unmatched("unknown_message");
            if let Some(unlogged) = crate::metrics::log_hourly("unknown_message") {
                tracing::info!(status = %s.status, unlogged, "A status callback for a message sendwell does not know was ignored (logged once an hour; sendwell_webhook_unmatched_total{{why=\"unknown_message\"}} counts each).");
            }
            return Ok(Effects::default());
        };
        let Ok(job) = serde_json::from_slice::<StoredOutcome>(&entry.event) else {
            crate::metrics::webhook_unmatched("unreadable_job");
            return Ok(Effects::default());
        };
        if job.status != "sent" {
            crate::metrics::webhook_unmatched("job_not_sent");
            return Ok(Effects::default());
        }
        let mut effects = Effects::default();
        // The job's delivery row: the level reached and, for the message the job's answer
        // named, the statuses applied and whether billing was counted. A status already
        // applied (Meta's retry, the broker's redelivery after a crash before the ack) changes
        // nothing more. A status of another message of the job (an ambiguous send tried again
        // when the first try did go through: two messages, both billed) is recognised by its
        // bytes in `WebhookSeen` and billed under its own wamid, as every status once was.
        let stored = if *job.id == *entry_id {
            row_of_id
        } else {
            self.ledger
                .kv_get(Table::Delivery, job.id.as_bytes())
                .await?
        };
        let before = DeliveryRow::decode(stored.as_deref());
        let mut row = before;
        let bit = status_bit(&s.status);
        // `records_itself`, from the status already read (not parsed again).
        let records_itself = bit != 0;
        let own = records_itself && job.wamid.as_deref().is_none_or(|w| w == s.id);
        if own {
            if row.flags & bit != 0 {
                crate::metrics::webhook_duplicate();
                return Ok(effects);
            }
            row.flags |= bit;
        } else if records_itself {
            // The caller left this status's `WebhookSeen` row to us.
            if self
                .ledger
                .kv_get(Table::WebhookSeen, seen_key)
                .await?
                .is_some()
            {
                crate::metrics::webhook_duplicate();
                return Ok(effects);
            }
            effects.record.push(KvOp::Put {
                table: Table::WebhookSeen,
                key: seen_key.to_vec(),
                value: Timestamp::now().as_millisecond().to_le_bytes().to_vec(),
            });
        }
        crate::metrics::delivery_status(&job.account, &s.status);
        // The status names the job's number by WhatsApp ID: one more place to learn the ID from
        // (a send answered without `contacts`, or sent before the map existed).
        if let Some(flow) = &self.consent
            && flow
                .store
                .learn_wa_id(
                    job.to.trim_start_matches('+'),
                    s.recipient_id.trim_start_matches('+'),
                )
                .await?
        {
            crate::metrics::wa_id_learned();
        }

        // Billing: Meta may repeat `pricing` on sent and delivered/read; count a message once.
        let mut billed_cost = None;
        if let Some(p) = &s.pricing
            && billed(p.billable, p.kind.as_deref())
        {
            let category = p
                .category
                .clone()
                .or_else(|| job.category.as_deref().map(String::from))
                .unwrap_or_default();
            // The job's number: `recipient_id` is a WhatsApp ID, which for Mexico carries an
            // extra digit.
            let digits = job.to.trim_start_matches('+');
            let prices = self.prices.get();
            if let Some(price) = prices.price(&category, digits) {
                // Billing counted once a message: by the row's flag for the job's own message,
                // by `billed|<wamid>` for another. An older build kept every message's under
                // `billed|<wamid>`: looked up while the row has no flags, except for a `sent`
                // on no row at all (the first status: only its own repeat across the upgrade
                // could have been counted), which spares the bulk of callbacks a read.
                let billed_key = format!("billed|{}", s.id).into_bytes();
                let look_up = !own
                    || before.form == RowForm::Legacy
                    || (before.form == RowForm::Absent && bit != SENT_APPLIED);
                let counted_before = (own && row.flags & BILLED != 0)
                    || (look_up
                        && self
                            .ledger
                            .kv_get(Table::WebhookSeen, &billed_key)
                            .await?
                            .is_some());
                if own {
                    row.flags |= BILLED;
                } else if !counted_before {
                    effects.record.push(KvOp::Put {
                        table: Table::WebhookSeen,
                        key: billed_key,
                        value: Vec::new(),
                    });
                }
                if !counted_before {
                    effects.billed = Some(BilledCount {
                        account: job.account.to_string(),
                        category: category.clone(),
                        market: prices.market(digits).to_string(),
                        country: crate::phone::parse_e164(&job.to)
                            .map(|r| r.region())
                            .unwrap_or("ZZ"),
                        currency: prices.currency().to_string(),
                        micros: price.0,
                    });
                }
                billed_cost = Some(Cost {
                    amount: price.to_decimal_string(),
                    currency: prices.currency().to_string(),
                });
            } else {
                crate::metrics::price_missing(&category, prices.market(digits));
            }
        }

        let at = at_of(&s.timestamp);
        let mut out = Vec::new();
        // 131050: the customer stopped marketing from this business in WhatsApp. An opt-out
        // counts whatever the job's delivery state is, and is the job's number's: the
        // `recipient_id` is their WhatsApp ID, which for some countries (BR, MX) differs.
        if s.status == "failed"
            && let Some(e) = s.errors.iter().find(|e| e.code == 131050)
        {
            out.extend(self.opt_out(
                &job.account,
                &job.to,
                "whatsapp_131050",
                at,
                e.message.clone().or(e.title.clone()).unwrap_or_default(),
            ));
        }
        // 131049: Meta's per-user marketing limit (all businesses together): resending sooner
        // than a day extends it, so the number gets no marketing for a while.
        if s.status == "failed"
            && s.errors.iter().any(|e| e.code == 131049)
            && let Some(limits) = &self.limits
            // The job's own number: `recipient_id` is the WhatsApp ID, which for some
            // countries (BR, MX) differs from the E.164 number jobs use.
            && let Some(op) = limits.per_user_limited(job.to.trim_start_matches('+'), at)
        {
            self.ledger.kv_many(vec![op]).await?;
        }
        let level = match s.status.as_str() {
            "delivered" => DELIVERED,
            "read" => READ,
            "failed" => UNDELIVERED,
            _ => 0,
        };
        let current = row.level;
        if level == 0 || current >= level || current == UNDELIVERED {
            effects.publications = out;
            row.record(&before, &job.id, &mut effects);
            return Ok(effects);
        }
        let publish = &self.publish;
        let mut event = |status: &'static str, reason, detail, code, cost: Option<Cost>| {
            use crate::config::DeliveryEventKind as K;
            let kind = match status {
                "delivered" => K::Delivered,
                "read" => K::Read,
                _ => K::Undelivered,
            };
            // Not wanted as an event: the level is still recorded below, and counted.
            if !publish.contains(&kind) {
                return;
            }
            let e = DeliveryEvent {
                id: &job.id,
                account: &job.account,
                to: &job.to,
                status,
                reason,
                detail,
                wamid: &s.id,
                attempts: job.attempts,
                estimated_cost: None,
                at,
                metadata: job.metadata,
                error_code: code,
                category: job.category.as_deref(),
                billed_cost: cost,
            };
            out.push(Publication {
                exchange: crate::amqp::topology::OUTCOMES_EXCHANGE,
                routing_key: format!("delivery.{status}"),
                body: serde_json::to_vec(&e).unwrap_or_default(),
                after_confirm: Vec::new(),
                derived: false,
            });
        };
        match level {
            // "A status is considered read only if it has been delivered": when both happen at
            // once Meta sends only `read`, but the funnel still counts the delivery.
            // The billed cost rides on the first event published (`delivered` may be left
            // out by `delivery_events`).
            READ if current < DELIVERED
                && self
                    .publish
                    .contains(&crate::config::DeliveryEventKind::Delivered) =>
            {
                event("delivered", None, None, None, billed_cost.clone());
                event("read", None, None, None, None);
            }
            READ => event("read", None, None, None, billed_cost),
            DELIVERED => event("delivered", None, None, None, billed_cost),
            _ => {
                let err = s.errors.first();
                let code = err.map(|e| e.code);
                let reason = code.map(|c| class_of_code(c).1).unwrap_or("api_error");
                let detail = err.map(|e| e.message.clone().or(e.title.clone()).unwrap_or_default());
                event("undelivered", Some(reason), detail, code, None);
            }
        }
        // The level counts as reached only once its event is confirmed: `record` is written
        // after every publication's confirm.
        row.level = level;
        effects.publications = out;
        row.record(&before, &job.id, &mut effects);
        Ok(effects)
    }

    /// The forms of a customer's number that an opt-out learned from WhatsApp must cover (the
    /// number first): the same person's number may be written with or without Brazil's ninth
    /// digit or Mexico's 1, and their WhatsApp ID may be either. An opt-out kept under one form
    /// only would let a job to another form through, or an opt-in to another form that arrives
    /// later but is dated earlier win; under every form, the consent rule sees it whichever
    /// form a job or an opt-in names.
    fn forms(&self, digits: &str) -> Vec<String> {
        let digits = digits.trim_start_matches('+');
        match &self.consent {
            Some(flow) => flow.store.forms_of(digits),
            None => {
                let mut f = vec![digits.to_string()];
                f.extend(crate::consent::wa_id::equivalents(digits));
                f
            }
        }
    }

    /// An opt-out of every purpose of `account`, under every form of the number.
    fn opt_out(
        &self,
        account: &str,
        digits: &str,
        source: &'static str,
        at: Timestamp,
        evidence: String,
    ) -> Vec<Publication> {
        crate::metrics::opt_out_learned(account, source);
        self.forms(digits)
            .into_iter()
            .enumerate()
            .map(|(i, form)| {
                let e = ConsentEvent {
                    kind: "opt_out",
                    account,
                    to: format!("+{form}"),
                    purposes: [],
                    source,
                    at,
                    evidence: evidence.clone(),
                };
                Publication {
                    exchange: crate::amqp::topology::CONSENT_EXCHANGE,
                    routing_key: String::new(),
                    body: serde_json::to_vec(&e).unwrap_or_default(),
                    after_confirm: Vec::new(),
                    derived: i > 0,
                }
            })
            .collect()
    }

    async fn message(&self, ev: &Event) -> Result<Vec<Publication>, LedgerError> {
        #[derive(Deserialize)]
        struct Msg {
            from: String,
            id: String,
            #[serde(default)]
            timestamp: Option<StrOrNum>,
            #[serde(default, rename = "type")]
            kind: Option<String>,
            #[serde(default)]
            text: Option<TextBody>,
            #[serde(default)]
            button: Option<Button>,
            #[serde(default)]
            interactive: Option<Interactive>,
        }
        #[derive(Deserialize)]
        struct TextBody {
            body: String,
        }
        #[derive(Deserialize)]
        struct Button {
            #[serde(default)]
            payload: Option<String>,
            #[serde(default)]
            text: Option<String>,
        }
        #[derive(Deserialize)]
        struct Interactive {
            #[serde(default)]
            button_reply: Option<Reply>,
            #[serde(default)]
            list_reply: Option<Reply>,
        }
        #[derive(Deserialize)]
        struct Reply {
            id: String,
            #[serde(default)]
            title: Option<String>,
        }
        let Ok(m) = serde_json::from_str::<Msg>(ev.item.get()) else {
            crate::metrics::webhook_unmatched("unreadable_message");
            return Ok(Vec::new());
        };
        let account = self.account_of(ev).map(str::to_string);
        let at = at_of(&m.timestamp);
        let kind = m.kind.unwrap_or_else(|| "unknown".into());
        let (text, payload) = match (m.text, m.button, m.interactive) {
            (Some(t), _, _) => (Some(t.body), None),
            (_, Some(b), _) => (b.text, b.payload),
            (_, _, Some(i)) => match i.button_reply.or(i.list_reply) {
                Some(r) => (r.title, Some(r.id)),
                None => (None, None),
            },
            _ => (None, None),
        };
        let number = self.number_of(ev, &m.from);
        let inbound = InboundMessage {
            account: account.clone(),
            from: format!("+{}", number.digits),
            wamid: m.id,
            at,
            kind,
            text,
            payload,
        };
        if let Some(a) = &account {
            // The customer wrote: their 24-hour customer-service window opens (or restarts).
            self.meta
                .record_inbound(a, inbound.from.trim_start_matches('+'), at.as_millisecond())
                .await?;
        }
        self.inbound(&inbound, number.how).await
    }

    /// The number a WhatsApp ID of this event stands for (see [`crate::consent::wa_id`]): this
    /// instance's map of send answers, else the listener's answer (its process may have sent to
    /// the number), else a known number equivalent to the ID, else the ID's digits.
    fn number_of(&self, ev: &Event, id: &str) -> Resolved {
        let id = id.trim_start_matches('+');
        let mut r = match &self.consent {
            Some(flow) => flow.store.resolve_wa_id(id),
            None => Resolved {
                digits: id.to_string(),
                how: How::Unknown,
            },
        };
        if r.how != How::Mapped
            && let Some(routed) = ev.recipient.as_deref()
            && routed != id
        {
            r = Resolved {
                digits: routed.to_string(),
                how: How::Mapped,
            };
        }
        crate::metrics::wa_id_resolved(r.how.as_str());
        r
    }

    /// The one place inbound messages are handed over: consent handling turns STOP, START and
    /// answers to a double opt-in question into consent events, published to every instance.
    /// `how`: how the sender's WhatsApp ID became `m.from`.
    async fn inbound(&self, m: &InboundMessage, how: How) -> Result<Vec<Publication>, LedgerError> {
        crate::metrics::inbound_message(m.account.as_deref().unwrap_or("unknown"), &m.kind);
        if let Some(unlogged) =
            crate::metrics::log_hourly(("inbound", m.account.as_deref(), &m.kind))
        {
            tracing::info!(from = %Masked(&m.from), kind = %m.kind, unlogged, "Inbound message received (logged once an hour per account and type; sendwell_inbound_messages_total counts each).");
        }
        let Some(flow) = &self.consent else {
            return Ok(Vec::new());
        };
        let events = flow.on_inbound(m).await?;
        let publication = |body: Vec<u8>, derived: bool| Publication {
            exchange: crate::amqp::topology::CONSENT_EXCHANGE,
            routing_key: String::new(),
            body,
            after_confirm: Vec::new(),
            derived,
        };
        let mut out = Vec::new();
        for ev in &events {
            out.push(publication(ev.to_json(), false));
            if ev.kind != crate::consent::Kind::OptOut {
                continue;
            }
            let source = match ev.source.as_deref() {
                Some(crate::consent::flow::SOURCE_BUTTON) => "whatsapp_opt_out_button",
                _ => "whatsapp_keyword",
            };
            crate::metrics::opt_out_learned(&ev.account, source);
            if how == How::Unknown {
                crate::metrics::wa_id_unresolved_opt_out(source, m.from.as_str());
            }
            // The same opt-out under the number's other forms (see `forms`).
            for form in self.forms(ev.to.digits()).into_iter().skip(1) {
                if let Ok(to) = crate::phone::parse_e164(&format!("+{form}")) {
                    let copy = crate::consent::ConsentEvent { to, ..ev.clone() };
                    out.push(publication(copy.to_json(), true));
                }
            }
        }
        Ok(out)
    }

    fn preference(&self, ev: &Event) -> Result<Vec<Publication>, LedgerError> {
        #[derive(Deserialize)]
        struct Pref {
            wa_id: String,
            #[serde(default)]
            detail: Option<String>,
            #[serde(default)]
            category: Option<String>,
            value: String,
            #[serde(default)]
            timestamp: Option<StrOrNum>,
        }
        let Ok(p) = serde_json::from_str::<Pref>(ev.item.get()) else {
            crate::metrics::webhook_unmatched("unreadable_preference");
            return Ok(Vec::new());
        };
        let accounts: Vec<String> = match self.account_of(ev) {
            Some(a) => vec![a.to_string()],
            None => self
                .accounts_by_waba
                .get(&ev.waba_id)
                .cloned()
                .unwrap_or_default(),
        };
        if p.value != "stop"
            || p.category
                .as_deref()
                .is_some_and(|c| c != "marketing_messages")
        {
            crate::metrics::webhook_unmatched("preference_not_stop");
            if let Some(unlogged) = crate::metrics::log_hourly(("preference", &p.value)) {
                tracing::info!(value = %p.value, unlogged, "A user preference change other than a marketing stop was noted (logged once an hour per value; sendwell_webhook_unmatched_total{{why=\"preference_not_stop\"}} counts each).");
            }
            return Ok(Vec::new());
        }
        let at = at_of(&p.timestamp);
        let number = self.number_of(ev, &p.wa_id);
        if number.how == How::Unknown {
            crate::metrics::wa_id_unresolved_opt_out("whatsapp_user_preferences", &number.digits);
        }
        Ok(accounts
            .iter()
            .flat_map(|a| {
                self.opt_out(
                    a,
                    &number.digits,
                    "whatsapp_user_preferences",
                    at,
                    p.detail.clone().unwrap_or_default(),
                )
            })
            .collect())
    }

    async fn change(&self, ev: &Event) -> Result<Vec<Publication>, LedgerError> {
        let v: serde_json::Value = serde_json::from_str(ev.item.get()).unwrap_or_default();
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let accounts = self
            .accounts_by_waba
            .get(&ev.waba_id)
            .cloned()
            .unwrap_or_default();
        let now = Timestamp::now().as_millisecond();
        match ev.field.as_str() {
            "message_template_status_update" => {
                let (Some(event), Some(name)) = (s("event"), s("message_template_name")) else {
                    return Ok(Vec::new());
                };
                let language = s("message_template_language").unwrap_or_default();
                self.meta
                    .set_template(&ev.waba_id, &name, &language, &event, now)
                    .await?;
                crate::metrics::template_status(&name, &language, &event);
                tracing::warn!(template = %name, language = %language, event = %event, "Template status changed.");
            }
            "message_template_quality_update" => {
                let score = s("new_quality_score").unwrap_or_default();
                crate::metrics::template_quality(&score);
                tracing::info!(template = s("message_template_name").unwrap_or_default(), score = %score, "Template quality changed.");
            }
            "business_capability_update" | "phone_number_quality_update" => {
                let limit = v
                    .get("max_daily_conversations_per_business")
                    .or(v.get("max_daily_conversation_per_phone"))
                    .or(v.get("current_limit"))
                    .and_then(tier_limit);
                if let Some(l) = limit {
                    crate::metrics::messaging_limit(&ev.waba_id, l);
                    if let Some(limits) = &self.limits {
                        let ops = limits.tier_learned(&ev.waba_id, l);
                        if !ops.is_empty() {
                            self.ledger.kv_many(ops).await?;
                        }
                    }
                }
                if s("event").as_deref() == Some("THROUGHPUT_UPGRADE") {
                    for a in &accounts {
                        crate::metrics::account_throughput(a, 1000.0);
                    }
                }
                tracing::info!(field = %ev.field, waba = %ev.waba_id, limit, "Messaging capability changed.");
            }
            "account_update" => {
                if s("event").as_deref() == Some("ACCOUNT_RESTRICTION") {
                    let infos = v
                        .get("restriction_info")
                        .and_then(|r| r.as_array())
                        .cloned()
                        .unwrap_or_default();
                    for r in infos {
                        let kind = r.get("restriction_type").and_then(|x| x.as_str());
                        let until = r.get("expiration").and_then(|x| x.as_i64());
                        if kind == Some("RESTRICTED_BIZ_INITIATED_MESSAGING")
                            && let Some(until) = until
                        {
                            for a in &accounts {
                                self.meta.restrict(a, until * 1000).await?;
                                tracing::error!(account = %a, until, "Business-initiated messaging is restricted by Meta; template jobs wait until the restriction ends.");
                            }
                        }
                    }
                }
                crate::metrics::account_update(s("event").as_deref().unwrap_or("unknown"));
            }
            _ => {}
        }
        Ok(Vec::new())
    }
}

/// Meta's tier names and numbers as a daily unique-recipient limit (infinite when unlimited).
fn tier_limit(v: &serde_json::Value) -> Option<f64> {
    if let Some(n) = v.as_f64() {
        return Some(n);
    }
    let s = v.as_str()?.to_ascii_uppercase();
    let s = s.trim_start_matches("TIER_");
    match s {
        "UNLIMITED" => Some(f64::INFINITY),
        "NOT_SET" => None,
        _ => {
            let (num, mult) = match s.strip_suffix('K') {
                Some(n) => (n, 1000.0),
                None => (s, 1.0),
            };
            num.parse::<f64>().ok().map(|n| n * mult)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_read_as_numbers() {
        let t = |s: &str| tier_limit(&serde_json::Value::String(s.into()));
        assert_eq!(t("TIER_250"), Some(250.0));
        assert_eq!(t("TIER_2K"), Some(2000.0));
        assert_eq!(t("TIER_100K"), Some(100000.0));
        assert_eq!(t("10000"), Some(10000.0));
        assert_eq!(t("UNLIMITED"), Some(f64::INFINITY));
        assert_eq!(t("TIER_UNLIMITED"), Some(f64::INFINITY));
        assert_eq!(t("TIER_NOT_SET"), None);
    }
}

#[cfg(test)]
mod delivery_rows {
    //! The delivery row's rules against the sequences an attacker/SRE review found (billing
    //! counted before the write, an upgrade, two instances at once, an ambiguous resend).
    use super::*;
    use crate::store::ledger::{LedgerEntry, LedgerState};

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/webhooks/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn setup() -> (tempfile::TempDir, Applier, Ledger, tokio::runtime::Runtime) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("token"), "tok").unwrap();
        let toml = r#"
            [[purposes]]
            name = "newsletter"
            [[accounts]]
            name = "acme-de"
            phone_number_id = "106540352242922"
            token_file = "token"
            [prices]
            currency = "EUR"
            effective = "2026-10-01"
            source = "t"
            [prices.markets.germany]
            calling_codes = ["49"]
            marketing = "0.1131"
        "#;
        let p = d.path().join("sendwell.toml");
        std::fs::write(&p, toml).unwrap();
        let c = Config::load(&p).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ledger = Ledger::open_in_memory().unwrap();
        let (applier, ledger) = rt.block_on(async {
            ledger
                .put(
                    "job-1",
                    LedgerEntry {
                        state: LedgerState::Final,
                        attempts: 1,
                        updated_ms: jiff::Timestamp::now().as_millisecond(),
                        published: true,
                        event: format!(r#"{{"id":"job-1","account":"acme-de","to":"+491701234567","status":"sent","category":"marketing","wamid":"{WAMID}"}}"#).into_bytes(),
                    },
                )
                .await
                .unwrap();
            let meta = crate::pipeline::meta_state::MetaState::load(ledger.clone()).await.unwrap();
            (Applier::new(&c, ledger.clone(), meta), ledger)
        });
        (d, applier, ledger, rt)
    }

    fn billed(rec: &metrics_exporter_prometheus::PrometheusRecorder) -> f64 {
        rec.handle()
            .render()
            .lines()
            .filter(|l| l.starts_with("sendwell_billed_cost_microunits_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The message the job's answer named (the fixtures' wamid).
    const WAMID: &str = "wamid.HBgMNDkxNzAxMjM0NTY3FQIAERgSQTFCMkMzRDRFNUY2QTdCOEM5AA==";

    fn event(body: &[u8]) -> Event {
        crate::webhook::parse::split(body).unwrap().remove(0)
    }

    fn seen_key(ev: &Event) -> Vec<u8> {
        use sha2::Digest;
        sha2::Sha256::digest(serde_json::to_vec(ev).unwrap()).to_vec()
    }

    /// As the consumer settles: apply, write, then count.
    async fn settle(applier: &Applier, ledger: &Ledger, ev: &Event) -> Effects {
        let mut e = applier.apply(ev, &seen_key(ev)).await.unwrap();
        ledger.kv_many(std::mem::take(&mut e.record)).await.unwrap();
        if let Some((t, k, v)) = e.record_if_absent.take() {
            ledger.kv_insert_if_absent(t, k, v).await.unwrap();
        }
        if let Some(b) = e.billed.take() {
            b.count();
        }
        e
    }

    /// `apply` never counts billing itself: a settle whose write fails (the broker then
    /// redelivers the status) must not have counted it.
    #[test]
    fn billing_is_counted_only_after_the_record_is_written() {
        let (_d, applier, ledger, rt) = setup();
        let rec = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let ev = &event(&fixture("status_delivered.json"));
        metrics::with_local_recorder(&rec, || {
            // First try: applied and published, then the write failed: nothing kept.
            let first = rt.block_on(applier.apply(ev, &seen_key(ev))).unwrap();
            assert_eq!(first.publications.len(), 1);
            assert!(first.billed.is_some());
            // The redelivery, settled.
            let again = rt.block_on(settle(&applier, &ledger, ev));
            assert_eq!(again.publications.len(), 1);
            // And a third copy: a repeat now.
            let third = rt.block_on(settle(&applier, &ledger, ev));
            assert!(third.publications.is_empty());
        });
        assert_eq!(billed(&rec), 113100.0, "billing counted once per message");
    }

    /// Upgrade: the previous build applied `delivered` (row `[1]`, `billed|<wamid>`); Meta's
    /// retry of the earlier `sent` (pricing on it too) comes after the upgrade.
    #[test]
    fn a_late_sent_after_an_older_builds_delivered_is_not_billed_again() {
        let (_d, applier, ledger, rt) = setup();
        rt.block_on(async {
            ledger
                .kv_put(Table::Delivery, b"job-1".to_vec(), vec![DELIVERED])
                .await
                .unwrap();
            ledger
                .kv_put(
                    Table::WebhookSeen,
                    format!("billed|{WAMID}").into_bytes(),
                    Vec::new(),
                )
                .await
                .unwrap();
        });
        let rec = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let ev = &event(&fixture("status_sent.json"));
        metrics::with_local_recorder(&rec, || {
            rt.block_on(settle(&applier, &ledger, ev));
        });
        assert_eq!(
            billed(&rec),
            0.0,
            "the older build counted this message already"
        );
    }

    /// Two instances at once (a reshard, a failover with the old active still running): a
    /// `sent` that read no row is recorded after a `delivered` recorded its level; the level
    /// must stay.
    #[test]
    fn a_sent_recorded_after_a_concurrent_delivered_leaves_its_level() {
        let (_d, applier, ledger, rt) = setup();
        let sent = event(&fixture("status_sent.json"));
        let delivered = event(&fixture("status_delivered.json"));
        let read = event(&fixture("status_read.json"));
        rt.block_on(async {
            let s = applier.apply(&sent, &seen_key(&sent)).await.unwrap();
            let d = settle(&applier, &ledger, &delivered).await;
            assert_eq!(d.publications.len(), 1);
            // The `sent`'s write, late.
            ledger.kv_many(s.record).await.unwrap();
            if let Some((t, k, v)) = s.record_if_absent {
                ledger.kv_insert_if_absent(t, k, v).await.unwrap();
            }
            let r = settle(&applier, &ledger, &read).await;
            let keys: Vec<_> = r
                .publications
                .iter()
                .map(|p| p.routing_key.clone())
                .collect();
            assert_eq!(keys, vec!["delivery.read"], "no delivered again");
        });
    }

    /// A utility job sent again after an ambiguous timeout whose first request did go
    /// through: two messages, two wamids, both naming the job, both billed by Meta.
    #[test]
    fn both_messages_of_an_ambiguous_resend_are_billed_and_each_once() {
        let (_d, applier, ledger, rt) = setup();
        let rec = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let first = event(&fixture("status_sent.json"));
        let other = String::from_utf8(fixture("status_sent.json"))
            .unwrap()
            .replace("wamid.HBgM", "wamid.SECOND");
        let second = event(other.as_bytes());
        metrics::with_local_recorder(&rec, || {
            rt.block_on(async {
                for ev in [&first, &second, &second, &first] {
                    settle(&applier, &ledger, ev).await;
                }
            })
        });
        assert_eq!(billed(&rec), 2.0 * 113100.0, "two messages, two charges");
    }

    /// A job id with characters JSON escapes: its stored outcome's strings cannot be borrowed
    /// (serde unescapes them into owned ones), and the status still finds its job and row.
    #[test]
    fn a_job_id_with_escapes_is_found_and_its_row_kept() {
        let (_d, applier, ledger, rt) = setup();
        let id = r#"job"\1"#;
        let escaped = serde_json::to_string(id).unwrap();
        rt.block_on(async {
            let event = format!(
                r#"{{"id":{escaped},"account":"acme-de","to":"+491701234567","status":"sent","category":"marketing","wamid":"{WAMID}"}}"#
            );
            let entry = LedgerEntry {
                state: LedgerState::Final,
                attempts: 1,
                updated_ms: jiff::Timestamp::now().as_millisecond(),
                published: true,
                event: event.into_bytes(),
            };
            ledger.put(id, entry).await.unwrap();
        });
        let body = String::from_utf8(fixture("status_delivered.json"))
            .unwrap()
            .replace(r#""job-1""#, &escaped);
        let ev = event(body.as_bytes());
        let first = rt.block_on(settle(&applier, &ledger, &ev));
        assert_eq!(first.publications.len(), 1, "the job is found");
        let row = rt.block_on(ledger.kv_get(Table::Delivery, id.as_bytes()));
        assert_eq!(row.unwrap().map(|r| r[0]), Some(DELIVERED));
        let again = rt.block_on(settle(&applier, &ledger, &ev));
        assert!(again.publications.is_empty(), "a repeat, by the row");
    }

    /// The row is read under the stored outcome's own id: an entry found under another key
    /// (never written so by sendwell) does not make the status read another job's row, or none.
    #[test]
    fn a_stored_outcome_under_another_key_reads_the_row_of_its_own_id() {
        let (_d, applier, ledger, rt) = setup();
        rt.block_on(async {
            let entry = ledger.get("job-1").await.unwrap().unwrap();
            ledger.put("alias", entry).await.unwrap();
            ledger
                .kv_put(
                    Table::Delivery,
                    b"job-1".to_vec(),
                    vec![DELIVERED, DELIVERED_APPLIED],
                )
                .await
                .unwrap();
        });
        let body = String::from_utf8(fixture("status_delivered.json"))
            .unwrap()
            .replace(r#""job-1""#, r#""alias""#);
        let e = rt.block_on(settle(&applier, &ledger, &event(body.as_bytes())));
        assert!(
            e.publications.is_empty(),
            "job-1's row says delivered was applied"
        );
    }

    /// Meta sends only `read` when delivery and reading come together, with the pricing: with
    /// `delivered` left out of `delivery_events`, the billed cost rides on `read`.
    #[test]
    fn the_billed_cost_rides_on_read_when_delivered_is_not_published() {
        let (_d, mut applier, ledger, rt) = setup();
        applier.publish = vec![
            crate::config::DeliveryEventKind::Read,
            crate::config::DeliveryEventKind::Undelivered,
        ];
        // `delivered`'s fixture, as a `read`: the pricing with it.
        let body = String::from_utf8(fixture("status_delivered.json"))
            .unwrap()
            .replace("\"delivered\"", "\"read\"");
        let ev = event(body.as_bytes());
        let e = rt.block_on(settle(&applier, &ledger, &ev));
        let keys: Vec<_> = e
            .publications
            .iter()
            .map(|p| p.routing_key.as_str())
            .collect();
        assert_eq!(keys, vec!["delivery.read"]);
        let read: serde_json::Value = serde_json::from_slice(&e.publications[0].body).unwrap();
        assert_eq!(read["billed_cost"]["amount"], "0.1131", "{read}");
    }
}
