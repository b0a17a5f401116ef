-- sendwell's state, schema version 4 (issue 18): daily tiers and budgets counted across every
-- instance on the database (docs/design/instances.md, decision 7). Applied by sendwell itself
-- at start, like 0001; never edit a released migration: add the next one.
--
-- Global use of a quota = what is durably counted (tier rows of the portfolio in the window,
-- spend rows of the account in the trailing day, of every instance) + the leases of the live
-- instances: what each may still count on its own, without a round trip per job. An instance
-- takes or renews its lease in one short transaction under an advisory lock per quota
-- (src/store/postgres/quota.rs), so the sum of the leases never passes what is left.

-- One row per (quota, instance). quota: `tier|<portfolio>` or `budget|<account>`. granted: what
-- the instance may count beyond what is durable (recipients, or millionths of the currency),
-- its use not yet durable included. A lease counts only while its instance is live in
-- sw_instances (heartbeat within 10 s): a dead instance's lease returns to the others by itself,
-- nobody waits for it. updated_at: the database's clock, for operators.
CREATE TABLE sw_quota_leases (
    quota text NOT NULL,
    instance uuid NOT NULL,
    granted bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (quota, instance)
);

-- The tier's durable count is "recipients of the portfolio counted in the last 24 hours": the
-- portfolio (the key's tail after its NUL: `digits NUL portfolio`) and the count time (8 bytes,
-- little-endian unix ms) as columns, indexed, so a renewal counts without reading every row.
ALTER TABLE sw_tier_usage
    ADD COLUMN portfolio bytea GENERATED ALWAYS AS (
        CASE WHEN position('\x00'::bytea IN key) > 0
        THEN substring(key FROM position('\x00'::bytea IN key) + 1) END) STORED,
    ADD COLUMN at_ms bigint GENERATED ALWAYS AS (
        CASE WHEN length(value) = 8 THEN
        get_byte(value, 0)::bigint |
        (get_byte(value, 1)::bigint << 8) |
        (get_byte(value, 2)::bigint << 16) |
        (get_byte(value, 3)::bigint << 24) |
        (get_byte(value, 4)::bigint << 32) |
        (get_byte(value, 5)::bigint << 40) |
        (get_byte(value, 6)::bigint << 48) |
        (get_byte(value, 7)::bigint << 56)
        END) STORED;
CREATE INDEX sw_tier_usage_portfolio_at ON sw_tier_usage (portfolio, at_ms);
