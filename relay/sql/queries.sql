-- Every query relay runs. Sections follow the pipeline:
-- outbox (producer) → dispatcher (claim, publish) → log (replay, retention) → status.
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

---------------------------------------------------------------- dispatcher --

-- name: probe_outbox
-- The idle probe: has any producer inserted since we last looked? Reading the
-- identity sequence costs microseconds and nothing on the producer's side.
SELECT last_value FROM relay_outbox_id_seq

-- name: lock_partitions
-- Become the only publisher of up to N partitions that have pending rows, for
-- this transaction. SKIP LOCKED: a partition another replica is publishing is
-- skipped, never waited for. Least recently published first, for fairness.
-- The scalar subquery is one index probe per partition (never a scan of the outbox).
SELECT p.partition, p.last_position
FROM relay_partitions AS p
WHERE (SELECT o.id FROM relay_outbox AS o WHERE o.partition = p.partition ORDER BY o.id LIMIT 1)
      IS NOT NULL
ORDER BY p.published_at NULLS FIRST, p.partition
LIMIT %(max_partitions)s
FOR UPDATE OF p SKIP LOCKED

-- name: take_pending
-- Remove the oldest pending rows of the partitions we hold and return them.
-- Nobody else can publish these partitions until we commit, and a DELETE
-- keeps relay_outbox down to the pending set (no published history to skip).
DELETE FROM relay_outbox AS o
USING (
    SELECT c.id
    FROM unnest(%(partitions)s::smallint[]) AS p(partition)
    CROSS JOIN LATERAL (
        SELECT id FROM relay_outbox
        WHERE partition = p.partition
        ORDER BY id
        LIMIT %(per_partition)s
    ) AS c
) AS claimed
WHERE o.id = claimed.id
RETURNING o.id, o.partition, o.event_id, o.event_type, o.schema_version, o.restaurant_id,
          o.order_id, o.customer_id, o.payload::text, o.occurred_on_utc, o.enqueued_at

-- name: publish
-- Append the batch to the log, dead-letter the rejects, remember order owners,
-- advance the partition counters and tell every relay process, in one round trip.
-- A producer re-inserting an already published event_id is dropped here (dedupe).
WITH appended AS (
    INSERT INTO relay_events
        (partition, position, event_id, event_type, schema_version, sse_event, restaurant_id,
         order_id, customer_id, channels, data, occurred_on_utc, enqueued_at)
    SELECT e.partition, e.position, e.event_id, e.event_type, e.schema_version, e.sse_event,
           e.restaurant_id, e.order_id, e.customer_id, string_to_array(e.channels, ' '),
           e.data::json, e.occurred_on_utc, e.enqueued_at
    FROM unnest(%(e_partition)s::smallint[], %(e_position)s::bigint[], %(e_event_id)s::uuid[],
                %(e_event_type)s::text[], %(e_schema_version)s::int[], %(e_sse_event)s::text[],
                %(e_restaurant_id)s::uuid[], %(e_order_id)s::uuid[], %(e_customer_id)s::uuid[],
                %(e_channels)s::text[], %(e_data)s::text[], %(e_occurred_on_utc)s::timestamptz[],
                %(e_enqueued_at)s::timestamptz[])
         AS e(partition, position, event_id, event_type, schema_version, sse_event, restaurant_id,
              order_id, customer_id, channels, data, occurred_on_utc, enqueued_at)
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
), dead AS (
    INSERT INTO relay_dead_letters
        (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
         occurred_on_utc, enqueued_at, reason)
    SELECT d.event_id, d.event_type, d.schema_version, d.restaurant_id, d.order_id,
           d.customer_id, d.payload::jsonb, d.occurred_on_utc, d.enqueued_at, d.reason
    FROM unnest(%(d_event_id)s::uuid[], %(d_event_type)s::text[], %(d_schema_version)s::int[],
                %(d_restaurant_id)s::uuid[], %(d_order_id)s::uuid[], %(d_customer_id)s::uuid[],
                %(d_payload)s::text[], %(d_occurred_on_utc)s::timestamptz[],
                %(d_enqueued_at)s::timestamptz[], %(d_reason)s::text[])
         AS d(event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
              occurred_on_utc, enqueued_at, reason)
    RETURNING 1
), owners AS (
    INSERT INTO relay_orders (order_id, restaurant_id, customer_id)
    SELECT DISTINCT ON (o.order_id) o.order_id, o.restaurant_id, o.customer_id
    FROM unnest(%(e_order_id)s::uuid[], %(e_restaurant_id)s::uuid[], %(e_customer_id)s::uuid[])
         AS o(order_id, restaurant_id, customer_id)
    WHERE o.order_id IS NOT NULL
    ORDER BY o.order_id, o.customer_id NULLS LAST
    ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id
        WHERE relay_orders.customer_id IS NULL AND EXCLUDED.customer_id IS NOT NULL
    RETURNING 1
), counters AS (
    UPDATE relay_partitions AS p
    SET last_position = c.last_position, published_at = now()
    FROM unnest(%(c_partition)s::smallint[], %(c_last_position)s::bigint[])
         AS c(partition, last_position)
    WHERE p.partition = c.partition
    RETURNING 1
)
SELECT (SELECT count(*) FROM appended) AS appended,
       (SELECT count(*) FROM dead) AS dead_lettered,
       CASE WHEN %(notice)s <> '' THEN pg_notify('relay_events', %(notice)s) END AS notified

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

-- name: partition_heads
-- Where each partition's log ends, and what retention has removed.
SELECT partition, last_position, pruned_through FROM relay_partitions ORDER BY partition

-- name: partition_head
SELECT last_position, pruned_through FROM relay_partitions WHERE partition = %(partition)s

-- name: read_partition
-- Tail one partition's log (the hub, after a notification or a sweep).
SELECT partition, position, sse_event, channels, data::text, event_id, event_type,
       restaurant_id, occurred_on_utc, published_at
FROM relay_events
WHERE partition = %(partition)s AND position > %(after)s AND position <= %(through)s
ORDER BY position
LIMIT %(limit)s

-- name: replay_channel_restaurant
-- Replay one restaurant's kitchen stream after a cursor (resume, polling).
SELECT partition, position, sse_event, channels, data::text
FROM relay_events
WHERE restaurant_id = %(restaurant_id)s AND position > %(after)s
  AND %(channel)s = ANY (channels)
ORDER BY position
LIMIT %(limit)s

-- name: replay_channel_order
-- Replay one order's stream after a cursor.
SELECT partition, position, sse_event, channels, data::text
FROM relay_events
WHERE order_id = %(order_id)s AND position > %(after)s
  AND %(channel)s = ANY (channels)
ORDER BY position
LIMIT %(limit)s

-- name: order_owner
-- Who may follow order:{id}: its restaurant's staff and the customer who placed it.
SELECT restaurant_id, customer_id FROM relay_orders WHERE order_id = %(order_id)s
UNION ALL
SELECT restaurant_id, customer_id FROM relay_outbox WHERE order_id = %(order_id)s
LIMIT 1

-- name: prune_partition
-- Retention: delete one small batch of a partition's oldest expired events and
-- record how far the log was cut, so a resume from below it gets `reset`.
WITH doomed AS (
    SELECT position FROM relay_events
    WHERE partition = %(partition)s AND published_at < now() - %(retention)s::interval
    ORDER BY position
    LIMIT %(limit)s
), deleted AS (
    DELETE FROM relay_events AS e
    USING doomed
    WHERE e.partition = %(partition)s AND e.position = doomed.position
    RETURNING e.position
), mark AS (
    UPDATE relay_partitions
    SET pruned_through = greatest(pruned_through, (SELECT max(position) FROM deleted))
    WHERE partition = %(partition)s AND EXISTS (SELECT FROM deleted)
    RETURNING 1
)
SELECT count(*) FROM deleted
