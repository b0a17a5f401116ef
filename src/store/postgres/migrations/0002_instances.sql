-- sendwell's state, schema version 2 (issue 18): the registry of running instances. Applied by
-- sendwell itself at start, like 0001; never edit a released migration: add the next one.
--
-- One row per running daemon process (a new id per start). heartbeat_at is the database's own
-- clock (now()), never a host's, so that hosts whose clocks disagree still agree on who is live:
-- live = heartbeat_at within the last 10 s. Each account's messages_per_second is split evenly
-- over the live shards (distinct shard among live rows). active_since: when the broker made this
-- instance its shard's active consumer (NULL: standby). A clean stop deletes the row; rows dead
-- for a day are purged by the others.
CREATE TABLE sw_instances (
    id uuid PRIMARY KEY,
    shard integer NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    active_since timestamptz NULL
);
