-- sendwell's state, schema version 6 (issue 18): how far the follow log (sw_follow, version 3)
-- has been purged. Every instance purges rows below the xmin of one of its own polls an hour
-- old; a follower that has not polled since (a process stopped for an hour, a host suspended:
-- its own clock may not have counted the time) would otherwise miss the purged rows without
-- knowing it. Each purge raises `below` before deleting, and every poll reads it in its
-- snapshot: a watermark under it means rows may be gone, and the follower stops (the daemon
-- exits 75 and its restart loads the cache whole). One row.
CREATE TABLE sw_follow_purged (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    below bigint NOT NULL
);
INSERT INTO sw_follow_purged (below) VALUES (0);
