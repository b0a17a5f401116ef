-- sendwell's state, schema version 5 (issue 18): frequency-cap logs merged, not overwritten.
-- A cap row (sw_cap_history) is one recipient's sliding log of send times: u32 little-endian
-- seconds, newest first, at most `keep` of them. Several instances may count sends to one
-- recipient at once (a shard added or removed, a failover); a whole-row put by each would keep
-- only the last writer's sends. So a send is written as its change (KvOp::LogSend): this
-- function applies it to the row as it stands, under the row's lock (INSERT ... ON CONFLICT DO
-- UPDATE), exactly as SendLog::record / SendLog::remove do in memory
-- (src/pipeline/limits/caps.rs). OR REPLACE: a database whose tables `state migrate` dropped is
-- migrated again from scratch, and functions survive a DROP TABLE.
CREATE OR REPLACE FUNCTION sw_log_send(log bytea, at bigint, add boolean, keep integer)
RETURNS bytea LANGUAGE plpgsql IMMUTABLE STRICT AS $$
DECLARE
    n integer := length(log) / 4;
    t bigint[] := ARRAY[]::bigint[];
    pos integer;
    out bytea := ''::bytea;
    b bytea;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        t := t || ((get_byte(log, 4 * i)::bigint)
                 | (get_byte(log, 4 * i + 1)::bigint << 8)
                 | (get_byte(log, 4 * i + 2)::bigint << 16)
                 | (get_byte(log, 4 * i + 3)::bigint << 24));
    END LOOP;
    IF add THEN
        -- The first entry not newer than `at` (equal times are interchangeable).
        pos := n + 1;
        FOR i IN 1 .. n LOOP
            IF t[i] <= at THEN
                pos := i;
                EXIT;
            END IF;
        END LOOP;
        -- Older than every entry kept: it can never be the N-th newest of any rule.
        IF pos <= keep THEN
            t := t[1:pos - 1] || at || t[pos:n];
        END IF;
        t := t[1:LEAST(keep, cardinality(t))];
    ELSE
        -- Un-counts one send at exactly `at` (a send that definitely did not happen).
        FOR i IN 1 .. n LOOP
            IF t[i] = at THEN
                t := t[1:i - 1] || t[i + 1:n];
                EXIT;
            END IF;
        END LOOP;
    END IF;
    FOR i IN 1 .. cardinality(t) LOOP
        b := '\x00000000'::bytea;
        b := set_byte(b, 0, (t[i] & 255)::integer);
        b := set_byte(b, 1, ((t[i] >> 8) & 255)::integer);
        b := set_byte(b, 2, ((t[i] >> 16) & 255)::integer);
        b := set_byte(b, 3, ((t[i] >> 24) & 255)::integer);
        out := out || b;
    END LOOP;
    RETURN out;
END
$$;
