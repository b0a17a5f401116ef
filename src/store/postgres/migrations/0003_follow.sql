-- sendwell's state, schema version 3 (issue 18): the follow log. Every instance keeps the
-- consent summaries and WhatsApp IDs in memory (no I/O per job); with several instances on one
-- database, each must learn what the others wrote. A row trigger on the two tables writes the
-- changed key here; every instance polls the rows added since its last poll and reads those
-- keys' current rows (src/store/postgres/follow.rs). Only these two tables have a trigger:
-- they change with consent events and new WhatsApp IDs, never once per job.

-- xid: the writing transaction's id (assigned at its first write, before it commits): a poll
-- reads `xid >= the xmin of its previous snapshot`, so a transaction still running then is read
-- by a later poll whatever order transactions commit in. tbl: 1 sw_consent_summary, 2 sw_wa_ids.
-- key: the changed row's key (for a delete, the deleted key). No primary key: a key changed
-- twice is logged twice, and read once (polls ask for DISTINCT keys).
CREATE TABLE sw_follow (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    tbl smallint NOT NULL,
    key bytea NOT NULL
);
-- Polls read by it, and the purge deletes by it (rows older than an hour).
CREATE INDEX sw_follow_xid ON sw_follow (xid);

-- The table's code comes as the trigger's argument. AFTER ... FOR EACH ROW: a statement that
-- fails leaves no log row (the whole transaction rolls back anyway). OR REPLACE: a database
-- whose tables `state migrate` dropped (DROP TABLE drops the triggers, not the function) is
-- migrated again from scratch.
CREATE OR REPLACE FUNCTION sw_follow_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO sw_follow (tbl, key) VALUES (TG_ARGV[0]::smallint, OLD.key);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.key IS DISTINCT FROM OLD.key) THEN
        INSERT INTO sw_follow (tbl, key) VALUES (TG_ARGV[0]::smallint, NEW.key);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER sw_consent_summary_follow
    AFTER INSERT OR UPDATE OR DELETE ON sw_consent_summary
    FOR EACH ROW EXECUTE FUNCTION sw_follow_log('1');
CREATE TRIGGER sw_wa_ids_follow
    AFTER INSERT OR UPDATE OR DELETE ON sw_wa_ids
    FOR EACH ROW EXECUTE FUNCTION sw_follow_log('2');
