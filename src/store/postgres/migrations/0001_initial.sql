-- sendwell's state, schema version 1 (issue 17). Applied by sendwell itself at start, in one
-- transaction, under an advisory lock (src/store/postgres/schema.rs); never edit a released
-- migration: add the next one.
--
-- Byte tables keep redb's keys and values byte for byte, so every KvOp maps to one statement and
-- a migration from redb is a copy. bytea compares bytewise, so a prefix is a key range.

-- The idempotency ledger, in typed columns: purge and the claim are plain SQL. COLLATE "C":
-- bytewise order and comparison of job ids, as redb's.
CREATE TABLE sw_ledger (
    id text COLLATE "C" PRIMARY KEY,
    state smallint NOT NULL,          -- 1 pending, 2 sending, 3 final
    attempts integer NOT NULL,
    updated_ms bigint NOT NULL,       -- unix ms, process clock; retention counts from here
    published boolean NOT NULL,
    event bytea NOT NULL,
    claimed_by text NULL              -- the instance that claimed the job (issue 18)
);
-- Purge deletes by age without a scan.
CREATE INDEX sw_ledger_updated_ms ON sw_ledger (updated_ms);

-- Applied webhook events; ts_ms is the row's value when it is a time (8 bytes, little-endian
-- unix ms), so purge finds old marks by index. "billed|<wamid>" rows hold other values: NULL.
CREATE TABLE sw_webhook_seen (
    key bytea PRIMARY KEY,
    value bytea NOT NULL,
    ts_ms bigint GENERATED ALWAYS AS (
        CASE WHEN length(value) = 8 THEN
        get_byte(value, 0)::bigint |
        (get_byte(value, 1)::bigint << 8) |
        (get_byte(value, 2)::bigint << 16) |
        (get_byte(value, 3)::bigint << 24) |
        (get_byte(value, 4)::bigint << 32) |
        (get_byte(value, 5)::bigint << 40) |
        (get_byte(value, 6)::bigint << 48) |
        (get_byte(value, 7)::bigint << 56)
        END) STORED
);
CREATE INDEX sw_webhook_seen_ts_ms ON sw_webhook_seen (ts_ms);

-- wamid -> job id: purge deletes a purged job's wamids by value.
CREATE TABLE sw_wamids (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE INDEX sw_wamids_value ON sw_wamids (value);

-- job id -> last delivery status published.
CREATE TABLE sw_delivery (key bytea PRIMARY KEY, value bytea NOT NULL);

-- digits NUL job id -> wamid; job_id is the key's tail after the first NUL, for purge.
CREATE TABLE sw_jobs_by_number (
    key bytea PRIMARY KEY,
    value bytea NOT NULL,
    job_id bytea GENERATED ALWAYS AS (
        CASE WHEN position('\x00'::bytea IN key) > 0
        THEN substring(key FROM position('\x00'::bytea IN key) + 1) END) STORED
);
CREATE INDEX sw_jobs_by_number_job_id ON sw_jobs_by_number (job_id);

CREATE TABLE sw_templates (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_inbound (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_restrictions (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_consent_history (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_consent_summary (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_consent_pending (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_consent_erased (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_store_meta (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_cap_history (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_tier_usage (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_user_limit (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE sw_wa_ids (key bytea PRIMARY KEY, value bytea NOT NULL);
