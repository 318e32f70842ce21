-- Operations: retention, `relay status` and `relay dead-letters`.
-- Status and the dead-letter listing only read; retention and retry write.

------------------------------------------------------------------ retention --

-- name: retention_cut
-- The newest window recorded before now() - retention, among the next
-- `scan` windows after the last cut (walks the primary key forward from
-- there, never the whole table; a backlog of windows takes a few runs).
-- Windows are recorded one at a time, so recorded_at grows with window_id.
SELECT max(next.window_id)
FROM (
    SELECT w.window_id, w.recorded_at
    FROM relay_windows AS w
    WHERE w.window_id > (SELECT pruned_through FROM relay_log_bounds)
    ORDER BY w.window_id
    LIMIT %(scan)s
) AS next
WHERE next.recorded_at < now() - %(retention)s::interval

-- name: retention_mark
-- First say how far the log is cut: readers from now on answer a cursor at
-- or below it with a reset (and followers resume after it) instead of
-- reading windows whose rows are being deleted.
UPDATE relay_log_bounds SET pruned_through = %(cut)s WHERE pruned_through < %(cut)s

-- name: retention_delete_rows
-- One short batch of the rows the cut window's snapshot sees (every window
-- up to it), in (xid, id) order after the previous batch: the window index
-- from its start, no scan of what is kept. Rows no window holds yet are
-- never visible in it. Returns the rows found and deleted, and the last key
-- for the next batch (a full batch means there may be more).
-- The cut's horizon is a scalar, so it bounds the index range (a join
-- would only filter it, and walk the whole index when little is left).
WITH doomed AS (
    SELECT o.id, o.xid
    FROM relay_outbox AS o
    WHERE o.xid < (SELECT horizon FROM relay_windows WHERE window_id = %(cut)s)
      AND (o.xid, o.id) > (%(after_xid)s::text::xid8, %(after_id)s)
      AND pg_visible_in_snapshot(
          o.xid, (SELECT snapshot FROM relay_windows WHERE window_id = %(cut)s))
    ORDER BY o.xid, o.id
    LIMIT %(limit)s
), gone AS (
    DELETE FROM relay_outbox AS o USING doomed WHERE o.id = doomed.id RETURNING o.id
)
SELECT (SELECT count(*) FROM doomed), (SELECT count(*) FROM gone),
       last.xid::text::bigint, last.id
FROM (SELECT 1) AS one
LEFT JOIN (SELECT xid, id FROM doomed ORDER BY xid DESC, id DESC LIMIT 1) AS last ON true

-- name: retention_delete_windows
-- Windows before the cut: their rows are gone. The cut window stays, as the
-- previous snapshot of the first window readers still read.
DELETE FROM relay_windows WHERE window_id < %(cut)s

-- name: backlog_unrecorded
-- Committed rows no window holds yet, and the age of the oldest: what the
-- recorder still has to cut (grows while no recorder runs), counted up to
-- `cap` (NULL: all). The newest window's horizon and in-progress list come
-- as values (newest_snapshot): planned with them, this is a range of the
-- (xid, id) index past the horizon plus one probe per listed transaction.
-- Joined in, the planner guessed a third of the outbox and scanned all of
-- it; counted whole, a backlog of a sixth of the outbox was scanned too.
-- The gauge, every 5 s per replica, stops at its cap in index order.
SELECT count(*), extract(epoch FROM now() - min(o.enqueued_at))
FROM (
    (SELECT o.enqueued_at FROM relay_outbox AS o WHERE o.xid >= %(horizon)s::xid8
     ORDER BY o.xid, o.id LIMIT %(cap)s)
    UNION ALL
    (SELECT o.enqueued_at FROM relay_outbox AS o WHERE o.xid = ANY (%(xip)s::xid8[])
     ORDER BY o.xid, o.id LIMIT %(cap)s)
) AS o

-- name: newest_snapshot
SELECT snapshot::text FROM relay_windows ORDER BY window_id DESC LIMIT 1

-- name: live_replicas
SELECT count(*) FROM relay_replicas WHERE heartbeat_at > now() - interval '30 seconds'

--------------------------------------------------------------------- status --

-- name: status_windows
-- The newest window and how old it is (an idle relay records none: its age
-- is the time since the last event), and the windows the recorder's check
-- (relay.check) has not passed with their rows: recorded, not yet handed to
-- the recording replica's gateway nor checked for dead letters.
WITH head AS (
    SELECT window_id, recorded_at FROM relay_windows ORDER BY window_id DESC LIMIT 1
), passed AS (
    -- The last window the check finished (or the cut, if retention passed it).
    SELECT greatest(
        (SELECT CASE WHEN xid = 9223372036854775807 THEN window_id ELSE window_id - 1 END
         FROM relay_offsets WHERE follower = 'relay.check'),
        (SELECT pruned_through FROM relay_log_bounds)) AS window_id
), unchecked AS (
    SELECT cur.window_id, rows.n
    FROM relay_windows AS cur
    JOIN relay_windows AS prev ON prev.window_id = cur.window_id - 1
    CROSS JOIN LATERAL (
        SELECT (SELECT count(*) FROM relay_outbox AS o
                WHERE o.xid >= prev.horizon AND o.xid < cur.horizon
                  AND pg_visible_in_snapshot(o.xid, cur.snapshot))
             + (SELECT count(*) FROM relay_outbox AS o
                WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(prev.snapshot)))
                  AND pg_visible_in_snapshot(o.xid, cur.snapshot)) AS n
    ) AS rows
    WHERE cur.window_id > (SELECT window_id FROM passed)
)
SELECT head.window_id, head.recorded_at, extract(epoch FROM now() - head.recorded_at),
       (SELECT count(*) FROM unchecked), (SELECT coalesce(sum(n), 0) FROM unchecked)
FROM head

-- name: status_last_minute
-- Rows recorded into windows over the last minute, and how long each waited
-- from its insert to its window (the relay's own latency; delivery follows
-- at once). One index range per window, as a window read.
WITH recent AS (
    SELECT cur.recorded_at, cur.snapshot, cur.horizon,
           prev.snapshot AS prev_snapshot, prev.horizon AS prev_horizon
    FROM relay_windows AS cur
    JOIN relay_windows AS prev ON prev.window_id = cur.window_id - 1
    -- The primary key's last stretch, not the whole table: no recorder
    -- cuts 100 000 windows a minute.
    WHERE cur.window_id > (SELECT max(window_id) FROM relay_windows) - 100000
      AND cur.recorded_at > now() - interval '1 minute'
), waits AS (
    SELECT r.recorded_at - o.enqueued_at AS wait
    FROM recent AS r
    CROSS JOIN LATERAL (
        SELECT o.enqueued_at FROM relay_outbox AS o
        WHERE o.xid >= r.prev_horizon AND o.xid < r.horizon
          AND pg_visible_in_snapshot(o.xid, r.snapshot)
        UNION ALL
        SELECT o.enqueued_at FROM relay_outbox AS o
        WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(r.prev_snapshot)))
          AND pg_visible_in_snapshot(o.xid, r.snapshot)
    ) AS o
)
SELECT count(*),
       extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY wait)),
       extract(epoch FROM max(wait))
FROM waits

-- name: status_dead_letters
SELECT count(*) FROM relay_dead_letters

-- name: status_replicas
-- Processes that sent a heartbeat in the last 30 seconds.
SELECT replica_id, hostname, pid, roles, published,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s,
       extract(epoch FROM now() - started_at) AS uptime_s
FROM relay_replicas
WHERE heartbeat_at > now() - interval '30 seconds'
ORDER BY replica_id

--------------------------------------------------------------- dead letters --

-- name: dead_letters_list
SELECT id, event_id, event_type, schema_version, restaurant_id, reason, dead_lettered_at, attempts
FROM relay_dead_letters
ORDER BY id
LIMIT %(limit)s

-- name: dead_letters_take
-- The dead letters to retry, locked so two operators cannot retry one twice,
-- with the columns a reader validates. `derived` comes from the outbox row
-- when it is still there (an alert the relay raised stays the relay's).
SELECT d.id, d.event_id::text, d.event_type, d.schema_version, d.restaurant_id::text,
       d.order_id::text, d.customer_id::text, d.payload::text,
       CASE WHEN relay_loadable_time(d.occurred_on_utc) THEN d.occurred_on_utc END,
       CASE WHEN NOT relay_loadable_time(d.occurred_on_utc) THEN d.occurred_on_utc::text END,
       coalesce(o.derived, false)
FROM relay_dead_letters AS d
LEFT JOIN relay_outbox AS o ON o.event_id = d.event_id
WHERE %(all)s OR d.id = ANY(%(ids)s::bigint[])
ORDER BY d.id
FOR UPDATE OF d SKIP LOCKED

-- name: dead_letters_unqueue
-- The rejected original leaves the log: every reader skips it today, but a
-- newer model could accept it, and a replay must not show the event twice.
DELETE FROM relay_outbox
WHERE event_id = (SELECT event_id FROM relay_dead_letters WHERE id = %(id)s)

-- name: dead_letters_requeue
-- A dead letter that now validates goes back into the outbox as a new row
-- (same event id, so it stays idempotent; a new id and transaction, so it
-- falls in a later window and every reader sees it once) from the dead
-- letter's columns, which are what was validated and what an operator may
-- have fixed; and leaves the dead-letter table. The caller's transaction
-- holds both with dead_letters_unqueue.
WITH back AS (
    INSERT INTO relay_outbox
        (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
         occurred_on_utc, derived)
    SELECT event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
           occurred_on_utc, %(derived)s
    FROM relay_dead_letters WHERE id = %(id)s
    ON CONFLICT (event_id) DO NOTHING
)
DELETE FROM relay_dead_letters WHERE id = %(id)s

-- name: dead_letters_still_bad
UPDATE relay_dead_letters
SET reason = %(reason)s, attempts = attempts + 1, dead_lettered_at = now()
WHERE id = %(id)s
