-- Every query relay runs. Sections follow the pipeline:
-- outbox (producer) → recorder (windows, dead letters) → log (reads) → followers.
-- Parameters are psycopg named placeholders: %(name)s.

------------------------------------------------------------------ producer --

-- name: enqueue
-- The producer's insert: exactly the contract columns; a repeated event_id is a no-op.
INSERT INTO relay_outbox
    (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload, occurred_on_utc)
VALUES
    (CAST(%(event_id)s AS uuid), %(event_type)s, %(schema_version)s,
     CAST(%(restaurant_id)s AS uuid), CAST(%(order_id)s AS uuid), CAST(%(customer_id)s AS uuid),
     CAST(%(payload)s AS jsonb), CAST(%(occurred_on_utc)s AS timestamptz))
ON CONFLICT (event_id) DO NOTHING

------------------------------------------------------------------ recorder --

-- name: recorder_lock
-- One recorder at a time: a session lock that dies with its connection (a
-- killed recorder's role is free at once; any replica takes it at its next
-- tick). Never waits: a replica that does not get it just reads.
SELECT pg_try_advisory_lock(hashtextextended('relay.recorder', 0))

-- name: due_window
-- Not run alone: the two steps every turn of the recorder starts with,
-- spliced into the two statements below. Close the next
-- window at this statement's snapshot if it would hold anything (a
-- committed row of a transaction the newest window's snapshot did not see:
-- one that started since, or was in progress then). Two index probes when
-- nothing is due; then nothing is written and the commit flushes nothing,
-- so an idle relay costs no WAL. When due: the one write per window, and a
-- NOTIFY naming it to every relay process. (The newest committed xid, not
-- EXISTS (xid >= horizon): the planner estimates an unknown bound to match
-- a third of the rows and would scan the table; max() is one step down the
-- (xid, id) index. The in-progress list likewise: max() of an array probe
-- of that index. Asked with EXISTS, the planner expected a match within a
-- few rows of a sequential scan, and scanned the whole outbox whenever none
-- of those transactions had written to it: 270 ms a probe with 10^6 rows.)
newest AS (
    SELECT window_id, snapshot, horizon FROM relay_windows
    ORDER BY window_id DESC
    LIMIT 1
), recorded AS (
    INSERT INTO relay_windows (window_id, snapshot, horizon)
    SELECT n.window_id + 1, pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot())
    FROM newest AS n
    WHERE (SELECT max(o.xid) FROM relay_outbox AS o) >= n.horizon
       OR (SELECT max(o.xid) FROM relay_outbox AS o
           WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(n.snapshot)))) IS NOT NULL
    ON CONFLICT (window_id) DO NOTHING
    RETURNING window_id, snapshot, horizon,
              pg_notify('relay_windows', window_id::text) AS notified
)

-- name: record_window_if_due
-- The recorder's turn while its check is behind: record a window if one is
-- due, and say which window is the newest (one round trip either way).
WITH {due_window}
SELECT n.window_id, r.window_id, r.snapshot::text
FROM newest AS n
LEFT JOIN recorded AS r ON true

-- name: record_window_and_read
-- The recorder's turn while its check is caught up with the newest window
-- it knows (`previous`): record_window_if_due, and the first page of the window it
-- records, in the same statement (a round trip fewer between a producer's
-- commit and the frame). Every part of one statement reads with the same
-- snapshot, the one the window records, so window_rows (spliced with the
-- new window's own bounds) selects exactly what a later read_window of it
-- would. Nothing is read if the newest window is not `previous`.
WITH {due_window}
SELECT n.window_id, r.window_id, r.snapshot::text, page.*
FROM newest AS n
LEFT JOIN recorded AS r ON true
LEFT JOIN LATERAL (
    SELECT r.window_id, {columns}
    FROM ({rows}) AS o
    WHERE r.window_id IS NOT NULL AND n.window_id = %(previous)s
    ORDER BY o.xid, o.id
    LIMIT %(limit)s
) AS page ON true
ORDER BY page.xid, page.id

-- name: record_window
-- Close the next window at this statement's snapshot, whatever it holds
-- (tests and tools; the recorder runs record_window_if_due). The snapshot is
-- taken after the newest window committed, so windows never overlap.
INSERT INTO relay_windows (window_id, snapshot, horizon)
SELECT max(window_id) + 1, pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot())
FROM relay_windows
ON CONFLICT (window_id) DO NOTHING
RETURNING window_id, snapshot::text, pg_notify('relay_windows', window_id::text)

-- name: record_dead_letters
-- Rows every reader rejects, filed once with their reason (a row filed
-- before, and not retried since, is not filed again).
INSERT INTO relay_dead_letters
    (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
     occurred_on_utc, enqueued_at, reason)
SELECT o.event_id, o.event_type, o.schema_version, o.restaurant_id, o.order_id, o.customer_id,
       o.payload, o.occurred_on_utc, o.enqueued_at, d.reason
FROM unnest(%(ids)s::bigint[], %(reasons)s::text[]) AS d(id, reason)
JOIN relay_outbox AS o ON o.id = d.id
WHERE NOT EXISTS (SELECT FROM relay_dead_letters AS x WHERE x.event_id = o.event_id)

-- name: install_notify_trigger
-- RELAY_WAKEUP=notify: one NOTIFY per inserting statement (PostgreSQL folds
-- repeats within a transaction). Costs the producer's commit; opt-in only.
CREATE OR REPLACE TRIGGER relay_outbox_notify
AFTER INSERT ON relay_outbox
FOR EACH STATEMENT EXECUTE FUNCTION relay_outbox_notify()

-- name: drop_notify_trigger
-- RELAY_WAKEUP=poll: producers' commits must not pay for a NOTIFY.
DROP TRIGGER IF EXISTS relay_outbox_notify ON relay_outbox

-- name: notify_trigger_exists
SELECT EXISTS (
    SELECT FROM pg_trigger
    WHERE tgname = 'relay_outbox_notify' AND tgrelid = 'relay_outbox'::regclass
)

-- name: heartbeat
-- This process is alive; `relay status` lists replicas seen in the last 30 s.
INSERT INTO relay_replicas (replica_id, hostname, pid, roles, published)
VALUES (%(replica_id)s, %(hostname)s, %(pid)s, %(roles)s, %(published)s)
ON CONFLICT (replica_id) DO UPDATE
SET heartbeat_at = now(), published = EXCLUDED.published, roles = EXCLUDED.roles

-- name: leave
DELETE FROM relay_replicas WHERE replica_id = %(replica_id)s

-- name: forget_dead_replicas
DELETE FROM relay_replicas WHERE heartbeat_at < now() - interval '1 hour'

------------------------------------------------------------------------ log --

-- name: log_head
-- The newest window, and how far retention has cut (windows <= pruned_through
-- lost their rows).
SELECT (SELECT max(window_id) FROM relay_windows), pruned_through FROM relay_log_bounds

-- name: window_bounds
-- The snapshots of some windows (immutable once recorded): readers pass them
-- into the reads below as values, so each read is planned for its real range.
SELECT window_id, snapshot::text FROM relay_windows WHERE window_id = ANY (%(ids)s::bigint[])

-- name: window_rows
-- Not run alone: the rows of the windows after one snapshot and up to
-- another, after (xid, id), spliced into the two reads below as {rows}
-- (PgQ's batch query): the transactions that started since the earlier
-- snapshot, plus those in progress then, each kept if the later snapshot
-- sees it. The bounds are values, not joined in: planned with them, a big
-- window is an ordered range of the (xid, id) index that stops at the
-- limit, a small one a few probes (joined, the planner guessed a range's
-- size, and a bitmap scan that sorted a whole backlog for every page won).
-- The transactions in progress then are probed one by one, each an ordered
-- range of the index that stops at the limit (one ordered scan over all of
-- them would walk the key's whole history to filter them; one unordered
-- probe fetched every remaining row of a big transaction for every page).
-- The range starts at one row bound, `from`: the earlier snapshot's horizon
-- (from_id -1), or the reader's position when that is later. A btree starts
-- a scan at a row comparison rather than at a plain `xid >= horizon` beside
-- it, so a row bound of (0, -1) there walked the index from its first entry:
-- the whole retained outbox, for every window read from its start.
-- {selector} narrows the rows by the producer's columns.
    (SELECT * FROM relay_outbox AS o
     WHERE (o.xid, o.id) > (%(from_xid)s::xid8, %(from_id)s::bigint)
       AND o.xid < %(horizon)s::xid8
       AND pg_visible_in_snapshot(o.xid, %(snapshot)s::pg_snapshot) AND {selector}
     ORDER BY o.xid, o.id
     LIMIT %(limit)s)
    UNION ALL
    (SELECT o.* FROM unnest(%(since_xip)s::xid8[]) AS p(xid)
     CROSS JOIN LATERAL (
         SELECT * FROM relay_outbox AS o
         WHERE o.xid = p.xid
           AND (o.xid, o.id) > (%(after_xid)s::xid8, %(after_id)s::bigint)
           AND pg_visible_in_snapshot(o.xid, %(snapshot)s::pg_snapshot) AND {selector}
         ORDER BY o.xid, o.id
         LIMIT %(limit)s) AS o)

-- name: read_window
-- One window's rows after (xid, id), in that order.
SELECT %(window)s::bigint, {columns}
FROM ({rows}) AS o
ORDER BY o.xid, o.id
LIMIT %(limit)s

-- name: read_span
-- The rows of several windows, first `limit` in (xid, id) order, each with
-- the window it belongs to: the first window whose snapshot sees its
-- transaction (one probe of relay_windows_horizon_idx). Transaction ids below
-- the limit's last are complete, so the caller keeps the windows whose
-- horizon is at or below it (see span_complete_through).
SELECT w.window_id, {columns}
FROM ({rows}) AS o
CROSS JOIN LATERAL (
    SELECT w.window_id FROM relay_windows AS w
    WHERE w.horizon > o.xid AND pg_visible_in_snapshot(o.xid, w.snapshot)
    ORDER BY w.horizon, w.window_id
    LIMIT 1
) AS w
ORDER BY o.xid, o.id
LIMIT %(limit)s

-- name: span_complete_through
-- The newest window whose every transaction id is below `xid`.
SELECT max(window_id) FROM relay_windows WHERE horizon <= %(xid)s::text::xid8

-- name: order_owner
-- Who may follow order:{id}: its restaurant's staff and the customer who placed
-- it. Deterministic whatever a producer writes later: the restaurant of the
-- order's first event (by insert time, then event id), and the first customer id among that restaurant's events of the order.
-- Another restaurant's row that reuses the order id changes neither.
WITH candidates AS (
    SELECT restaurant_id, customer_id, enqueued_at, event_id
    FROM relay_outbox WHERE order_id = %(order_id)s
), owner AS (
    SELECT restaurant_id FROM candidates ORDER BY enqueued_at, event_id LIMIT 1
)
SELECT owner.restaurant_id,
       (SELECT c.customer_id FROM candidates AS c
        WHERE c.restaurant_id = owner.restaurant_id AND c.customer_id IS NOT NULL
        ORDER BY c.enqueued_at, c.event_id LIMIT 1)
FROM owner

-------------------------------------------------------------------- offsets --

-- name: offset_init
-- A new follower starts at the oldest retained event (it delivers the whole
-- retained history once), unless told where.
INSERT INTO relay_offsets (follower, window_id, xid, id)
SELECT %(follower)s, coalesce(%(window)s, b.pruned_through), %(xid)s, %(id)s
FROM relay_log_bounds AS b
ON CONFLICT (follower) DO NOTHING

-- name: offset_take
-- A follower's offset, locked for this transaction; another replica running
-- the same follower skips it (never waits) and tries again later.
SELECT window_id, xid, id FROM relay_offsets
WHERE follower = %(follower)s
FOR UPDATE SKIP LOCKED

-- name: offset_read
SELECT window_id, xid, id FROM relay_offsets WHERE follower = %(follower)s

-- name: offset_advance
-- Only forward: a late writer (a deposed follower) never moves an offset back.
UPDATE relay_offsets
SET window_id = %(window)s, xid = %(xid)s, id = %(id)s, updated_at = now()
WHERE follower = %(follower)s AND (window_id, xid, id) < (%(window)s, %(xid)s, %(id)s)
