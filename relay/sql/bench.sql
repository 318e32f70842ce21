-- `relay bench`: loading data and the bare-SQL ceilings it compares against.

-- name: bench_fill_outbox
-- Pending events as a busy order service leaves them: OrderAccepted rows
-- spread round-robin over the given restaurants, numbered B-1… in id order.
INSERT INTO relay_outbox (event_id, event_type, schema_version, restaurant_id, order_id,
                          payload, occurred_on_utc)
SELECT gen_random_uuid(), 'OrderAccepted', 1, r.id, o.id,
       jsonb_build_object(
           'orderId', o.id, 'restaurantId', r.id, 'orderNumber', 'B-' || n,
           'newStatus', 'Accepted',
           'lastUpdateTimestamp', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'estimatedDeliveryTime', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
           'customerName', 'Ada Lovelace'),
       now()
FROM generate_series(%(first)s::int, %(last)s::int) AS n
CROSS JOIN LATERAL (
    SELECT (%(restaurants)s::uuid[])[1 + n %% cardinality(%(restaurants)s::uuid[])] AS id
) AS r
-- One order per event: the lateral names n so that it runs per row (left
-- uncorrelated, PostgreSQL ran it once and every event shared one order).
CROSS JOIN LATERAL (SELECT gen_random_uuid() AS id, n AS per_row) AS o
ORDER BY n

-- name: bench_history_seen
-- Published history behind the live events, as a relay that has been running
-- leaves it: the rows just inserted are closed into a window of their own
-- (the recorder's one write per window), and the relay's own followers (the
-- dead-letter check, the SLA watcher) are already past it.
WITH recorded AS (
    INSERT INTO relay_windows (window_id, snapshot, horizon)
    SELECT max(window_id) + 1, pg_current_snapshot(), pg_snapshot_xmax(pg_current_snapshot())
    FROM relay_windows
    RETURNING window_id
), seen AS (
    INSERT INTO relay_offsets (follower, window_id, xid, id)
    SELECT f.follower, recorded.window_id, 9223372036854775807, 9223372036854775807
    FROM recorded CROSS JOIN unnest(%(followers)s::text[]) AS f(follower)
    ON CONFLICT (follower) DO UPDATE
    SET window_id = EXCLUDED.window_id, xid = EXCLUDED.xid, id = EXCLUDED.id
)
SELECT window_id FROM recorded

-- name: bench_relay_behind
-- Has the relay not yet done everything the outbox holds? True while a
-- committed row is in no recorded window, or one of `followers` has no offset
-- yet or one short of the end of the newest window.
SELECT EXISTS (SELECT FROM relay_outbox AS o WHERE o.xid >= w.horizon)
       OR EXISTS (SELECT FROM relay_outbox AS o
                  WHERE o.xid = ANY (ARRAY(SELECT pg_snapshot_xip(w.snapshot))))
       OR (SELECT count(*) FROM relay_offsets AS f
           WHERE f.follower = ANY (%(followers)s::text[])
             AND (f.window_id, f.xid, f.id)
                 >= (w.window_id, 9223372036854775807, 9223372036854775807))
          < cardinality(%(followers)s::text[])
FROM relay_windows AS w
ORDER BY w.window_id DESC
LIMIT 1

-- name: bench_ceiling_claim
-- The bare-SQL ceiling: claim and remove 500 pending rows, nothing else.
DELETE FROM relay_outbox
WHERE id IN (SELECT id FROM relay_outbox ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
RETURNING id, event_id, event_type, restaurant_id, order_id, payload

--------------------------------------------------------- the snapshot floor --
-- The floor of the relay's own design with no relay process: one session
-- takes the outbox's rows in place by snapshot windows (relay/tools/bench/snapshot.py)
-- and does nothing else. A window is the transactions visible in one snapshot
-- and not in the previous one; the only write is one row per window. It reads
-- the outbox's own `xid` column and (xid, id) index, as the relay does, but
-- keeps its windows in a table of its own so that no relay ever reads them.

-- name: bench_snapshot_install
CREATE TABLE bench_windows (
    window_id  bigint      PRIMARY KEY,
    snapshot   pg_snapshot NOT NULL,
    taken_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- name: bench_snapshot_open_window
-- Close the next window at this moment's snapshot (durable: the one write).
INSERT INTO bench_windows (window_id, snapshot)
VALUES (%(window_id)s, pg_current_snapshot())
RETURNING snapshot::text

-- name: bench_snapshot_read
-- A page of one window, in (transaction, insert) order after a cursor: rows
-- whose transaction is visible in the window's snapshot and was not in the
-- previous one. The xid range bounds the index scan; the visibility tests
-- decide membership.
SELECT xid::text AS xid_text, id, event_id, event_type, restaurant_id, order_id, payload
FROM relay_outbox
WHERE xid >= pg_snapshot_xmin(%(previous)s::pg_snapshot)
  AND xid < pg_snapshot_xmax(%(current)s::pg_snapshot)
  AND pg_visible_in_snapshot(xid, %(current)s::pg_snapshot)
  AND NOT pg_visible_in_snapshot(xid, %(previous)s::pg_snapshot)
  AND (xid, id) > (%(after_xid)s::xid8, %(after_id)s::bigint)
ORDER BY xid, id
LIMIT %(limit)s

------------------------------------------------------------- the peers (job queues) --
-- pgqueuer and procrastinate drain the same backlog in databases of their own
-- (relay/tools/bench/peers.py); their schemas are their own, installed by them.

-- name: bench_outbox_payloads
-- The first pending events' payloads in id order: the peers' jobs carry the same JSON.
SELECT payload::text FROM relay_outbox ORDER BY id LIMIT %(count)s

-- name: bench_pgqueuer_pending
-- Is any job queued or running? (pgqueuer deletes a job once done.) Each
-- half walks one of its partial indexes (the bench's poll session turns
-- sequential scans off), so polling costs little while 10⁵ jobs wait.
SELECT EXISTS (SELECT FROM pgqueuer WHERE status = 'queued')
    OR EXISTS (SELECT FROM pgqueuer WHERE status = 'picked')

-- name: bench_procrastinate_pending
-- Is any job to do or doing? (Done jobs may stay, as succeeded.) On its
-- partial index of the jobs in those two states, as above.
SELECT EXISTS (SELECT FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))
