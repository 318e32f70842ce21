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

-- name: bench_fill_history
-- Published history behind the live events, as if retention kept a busy past:
-- positions 1..per_partition in every partition, for restaurants nobody follows.
INSERT INTO relay_events (partition, position, event_id, event_type, schema_version, sse_event,
                          restaurant_id, channels, data, occurred_on_utc, enqueued_at)
SELECT p, pos, gen_random_uuid(), 'OrderAccepted', 1, 'OrderStatusChanged', r.id,
       ARRAY['restaurant:' || r.id], '{"orderNumber":"H"}'::json, now(), now()
FROM generate_series(0, 63) AS p
CROSS JOIN generate_series(1, %(per_partition)s::int) AS pos
CROSS JOIN LATERAL (
    SELECT overlay(uuid_send(gen_random_uuid()) PLACING set_byte('\x00'::bytea, 0, p)
                   FROM 16 FOR 1) AS raw
) AS b
CROSS JOIN LATERAL (SELECT encode(b.raw, 'hex')::uuid AS id) AS r

-- name: bench_history_heads
-- The history counts as already seen by the relay's own followers (as it
-- would be on a relay that has been running): the SLA watcher starts at the head.
WITH heads AS (UPDATE relay_partitions SET last_position = %(per_partition)s)
UPDATE relay_sla_offsets SET position = %(per_partition)s

-- name: bench_ceiling_claim
-- The bare-SQL ceiling: claim and remove 500 pending rows, nothing else.
DELETE FROM relay_outbox
WHERE id IN (SELECT id FROM relay_outbox ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
RETURNING id, event_id, event_type, restaurant_id, order_id, payload

-- name: bench_move_floor
-- This design's own floor: the cheapest publish it allows. One statement
-- moves the 500 oldest pending rows into the log (every index the log has),
-- with no validation, no partitions, no counters and no notification. What
-- the relay adds on top of this is its overhead; what this costs producers
-- and what it loses to the ceiling above is the price of moving rows at all.
WITH moved AS (
    DELETE FROM relay_outbox
    WHERE id IN (SELECT id FROM relay_outbox ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
    RETURNING *
)
INSERT INTO relay_events (partition, position, event_id, event_type, schema_version, sse_event,
                          restaurant_id, order_id, customer_id, channels, data,
                          occurred_on_utc, enqueued_at)
SELECT partition, id, event_id, event_type, schema_version, 'OrderStatusChanged', restaurant_id,
       order_id, customer_id, ARRAY['restaurant:' || restaurant_id], payload::json,
       occurred_on_utc, enqueued_at
FROM moved
RETURNING event_id, data

------------------------------------------------- publishing without moving rows --
-- The floor of the read-in-place design (docs/performance.md, "What would reach the targets"):
-- rows stay in the outbox, and a reader takes them in *windows*. A window is
-- the transactions visible in one snapshot and not in the previous one; that
-- set is fixed once the snapshot is taken, so a cursor (window, xid, id) is
-- gap-free by construction, and a transaction that commits after a later one
-- simply falls in a later window. The only write is one row per window.

-- name: bench_snapshot_install
-- Every row records its inserting transaction (a default: the producer's
-- INSERT does not change), indexed for the window reads.
ALTER TABLE relay_outbox ADD COLUMN bench_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX relay_outbox_bench_window_idx ON relay_outbox (bench_xid, id);
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
SELECT bench_xid::text AS xid_text, id, event_id, event_type, restaurant_id, order_id, payload
FROM relay_outbox
WHERE bench_xid >= pg_snapshot_xmin(%(previous)s::pg_snapshot)
  AND bench_xid < pg_snapshot_xmax(%(current)s::pg_snapshot)
  AND pg_visible_in_snapshot(bench_xid, %(current)s::pg_snapshot)
  AND NOT pg_visible_in_snapshot(bench_xid, %(previous)s::pg_snapshot)
  AND (bench_xid, id) > (%(after_xid)s::xid8, %(after_id)s::bigint)
ORDER BY bench_xid, id
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
