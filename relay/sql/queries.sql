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

-- name: claim
-- Become the only publisher of the partitions with pending rows, least
-- recently published first, and read their oldest pending rows in insert
-- order, in one round trip.
-- * Sizing: a partition's share of the batch is batch / (partitions with
--   pending rows, at most backlog_partitions). Each counts its pending rows up
--   to its share (a few index entries, never a scan), and partitions are taken
--   until the batch is full. Under live load (a few rows in each) one claim
--   takes every partition; in a wide backlog, backlog_partitions of them, so
--   another replica finds the rest free; a backlog in one partition fills the
--   whole batch from it.
-- * SKIP LOCKED: a partition another replica is publishing is skipped, never
--   waited for (the next free ones are taken instead). The rows themselves
--   need no locks: nobody else can publish these partitions until we commit,
--   and producers only ever insert.
-- * Stale partitions: the rows are read in this statement's snapshot, but the
--   lock is taken on the newest version of the counter row. When another
--   replica published the partition in between (its counter row changed:
--   xmin differs), the snapshot's rows are partly gone; the partition then
--   yields one row with no event (id NULL), and the dispatcher claims again at
--   once with a fresh snapshot instead of validating rows already published.
WITH active AS (
    SELECT p.partition, p.published_at, p.xmin AS seen_version
    FROM relay_partitions AS p
    -- One index probe per partition (LIMIT keeps the planner from turning
    -- this into a join that scans the outbox).
    CROSS JOIN LATERAL (
        SELECT FROM relay_outbox AS o WHERE o.partition = p.partition LIMIT 1
    ) AS any_pending
), sizing AS (
    SELECT ceil(%(batch_size)s::numeric
                / least(greatest(count(*), 1), %(backlog_partitions)s))::int AS share
    FROM active
), pending AS (
    SELECT a.partition, n.rows,
           sum(n.rows) OVER (ORDER BY a.published_at NULLS FIRST, a.partition) AS running
    FROM active AS a
    CROSS JOIN LATERAL (
        SELECT count(*) AS rows
        FROM (SELECT FROM relay_outbox AS o WHERE o.partition = a.partition
              LIMIT (SELECT share FROM sizing)) AS r
    ) AS n
), held AS MATERIALIZED (
    SELECT p.partition, p.last_position, p.xmin AS locked_version
    FROM relay_partitions AS p
    WHERE p.partition IN (SELECT partition FROM pending)
    ORDER BY p.published_at NULLS FIRST, p.partition
    LIMIT (SELECT count(*) FROM pending WHERE running - rows < %(batch_size)s)
    FOR UPDATE OF p SKIP LOCKED
)
SELECT h.last_position, o.id, h.partition, o.event_id, o.event_type, o.schema_version,
       o.restaurant_id, o.order_id, o.customer_id, o.payload::text,
       -- A time no client can load (±infinity, year 10000) must not fail the
       -- batch: it travels as text, and the row becomes a dead letter.
       CASE WHEN relay_loadable_time(o.occurred_on_utc) THEN o.occurred_on_utc END,
       CASE WHEN NOT relay_loadable_time(o.occurred_on_utc) THEN o.occurred_on_utc::text END,
       o.derived, o.enqueued_at, (SELECT share FROM sizing) AS share
FROM held AS h
JOIN active AS a ON a.partition = h.partition
LEFT JOIN LATERAL (
    SELECT * FROM relay_outbox
    WHERE partition = h.partition AND h.locked_version = a.seen_version
    ORDER BY id
    LIMIT (SELECT share FROM sizing)
) AS o ON true
ORDER BY h.partition, o.id

-- name: publish_plan_arrays
-- A batch's plan for `publish`, as binary arrays (large batches: the
-- cheapest to encode and decode).
SELECT *
FROM unnest(%(ids)b::bigint[], %(partitions)b::smallint[], %(positions)b::bigint[],
            %(sse_events)b::text[], %(channels)b::text[], %(data)b::text[],
            %(reasons)b::text[])
     AS p(id, partition, position, sse_event, channels, data, reason)

-- name: publish_plan_json
-- A batch's plan for `publish`, as one JSON text of [id, partition,
-- position, sse_event, channels, data, reason] rows (small batches: with a
-- single text parameter the publish and its COMMIT travel in one simple query).
SELECT (r->>0)::bigint AS id, (r->>1)::smallint AS partition, (r->>2)::bigint AS position,
       r->>3 AS sse_event, r->>4 AS channels, r->>5 AS data, r->>6 AS reason
FROM jsonb_array_elements(%(plan)s::jsonb) AS r

-- name: publish
-- Move the batch out of the outbox into the log in one statement: valid rows
-- get their positions (computed by the dispatcher in insert order), invalid
-- ones become dead letters with their reason; then advance the partition
-- counters and tell every relay process. Only the relay-computed columns
-- travel, as one of the two plans above (spliced in as the plan CTE); the
-- rest is copied server-side from the outbox row. DELETE keeps relay_outbox
-- down to the pending set, so the claim never walks published history. A
-- producer re-inserting an already published event_id is dropped by the
-- log's unique key (dedupe).
WITH plan AS (
    {plan}
), moved AS (
    DELETE FROM relay_outbox AS o
    USING plan
    WHERE o.id = plan.id
    RETURNING o.*, plan.position, plan.sse_event, plan.channels, plan.data, plan.reason
), appended AS (
    INSERT INTO relay_events
        (partition, position, event_id, event_type, schema_version, sse_event, restaurant_id,
         order_id, customer_id, channels, data, occurred_on_utc, enqueued_at)
    SELECT m.partition, m.position, m.event_id, m.event_type, m.schema_version, m.sse_event,
           m.restaurant_id, m.order_id, m.customer_id, string_to_array(m.channels, ' '),
           m.data::json, m.occurred_on_utc, m.enqueued_at
    FROM moved AS m
    WHERE m.reason IS NULL
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
), dead AS (
    INSERT INTO relay_dead_letters
        (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
         occurred_on_utc, enqueued_at, reason)
    SELECT m.event_id, m.event_type, m.schema_version, m.restaurant_id, m.order_id,
           m.customer_id, m.payload, m.occurred_on_utc, m.enqueued_at, m.reason
    FROM moved AS m
    WHERE m.reason IS NOT NULL
    RETURNING 1
), counters AS (
    -- Every partition of the batch, also one that only dead-lettered: its
    -- counter row's new version tells a concurrent claim that rows are gone.
    UPDATE relay_partitions AS p
    SET last_position = coalesce(c.last_position, p.last_position), published_at = now()
    -- From the plan, not from the rows moved: the counters must say exactly
    -- what the NOTIFY and the dispatcher's in-memory hand-over say (a planned
    -- row already gone leaves a hole, never a position handed out twice).
    FROM (SELECT pl.partition, max(pl.position) AS last_position
          FROM plan AS pl
          GROUP BY pl.partition) AS c
    WHERE p.partition = c.partition
    RETURNING 1
)
SELECT (SELECT count(*) FROM appended) AS appended,
       (SELECT count(*) FROM dead) AS dead_lettered,
       (SELECT max(enqueued_at) FROM moved) AS newest_enqueued,
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
-- Tail one partition's log (the hub, after a notification or a sweep): only
-- what a frame needs, since every column read back is decoded (this halves
-- the hub's cost per event another replica published).
SELECT partition, position, sse_event, channels, data::text
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
-- Replay one order's stream after a cursor (its channel names the order's
-- restaurant, so another restaurant's event reusing the order id is not read).
SELECT partition, position, sse_event, channels, data::text
FROM relay_events
WHERE order_id = %(order_id)s AND position > %(after)s
  AND %(channel)s = ANY (channels)
ORDER BY position
LIMIT %(limit)s

-- name: replay_channel_restaurants
-- Replay the kitchen streams of several restaurants (one multi-restaurant
-- stream) after a vector cursor: each restaurant comes with its channel and
-- the position its partition's entry says was already sent. One index range
-- scan per restaurant on relay_events_restaurant_idx (restaurant_id,
-- position), each stopping after `limit` rows; the merge keeps the first
-- `limit` in (partition, position) order, which is each restaurant's order.
SELECT e.partition, e.position, e.sse_event, e.channels, e.data::text
FROM unnest(%(restaurant_ids)s::uuid[], %(channels)s::text[], %(after)s::bigint[])
     AS r(restaurant_id, channel, after)
CROSS JOIN LATERAL (
    SELECT partition, position, sse_event, channels, data
    FROM relay_events
    WHERE restaurant_id = r.restaurant_id AND position > r.after
      AND r.channel = ANY (channels)
    ORDER BY position
    LIMIT %(limit)s
) AS e
ORDER BY e.partition, e.position
LIMIT %(limit)s

-- name: replay_channel_customer
-- Replay one customer's order events after a vector cursor {partition:
-- position}: the events routed to customer:{id}, which are exactly the
-- events with an order channel and this customer_id (so events retained from
-- before the customer channel existed are found too). One range scan of
-- relay_events_customer_idx (customer_id, partition, position).
SELECT partition, position, sse_event, channels, data::text
FROM relay_events
WHERE customer_id = %(customer_id)s AND order_id IS NOT NULL
  AND 'order:' || restaurant_id::text || ':' || order_id::text = ANY (channels)
  AND position > coalesce((%(after)s::jsonb ->> partition::text)::bigint, 0)
ORDER BY partition, position
LIMIT %(limit)s

-- name: order_owner
-- Who may follow order:{id}: its restaurant's staff and the customer who placed
-- it. Deterministic whatever a producer writes later: the restaurant of the
-- order's first event (published, else pending; by insert time, then event
-- id), and the first customer id among that restaurant's events of the order.
-- Another restaurant's row that reuses the order id changes neither.
WITH candidates AS (
    SELECT restaurant_id, customer_id, enqueued_at, event_id
    FROM relay_events WHERE order_id = %(order_id)s
    UNION ALL
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

-- name: prune_partition
-- Retention: delete one small batch of a partition's oldest expired events and
-- record how far the log was cut, so a resume from below it gets `reset`.
-- The oldest positions are the oldest events, so this reads only the head of
-- the partition's primary key.
WITH oldest AS (
    SELECT position, published_at FROM relay_events
    WHERE partition = %(partition)s
    ORDER BY position
    LIMIT %(limit)s
), doomed AS (
    SELECT position FROM oldest WHERE published_at < now() - %(retention)s::interval
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

-- name: replay_channel_global
-- Replay a stream that spans partitions (admin, coupon:{id}) after a vector
-- cursor {partition: position}. Only off-kitchen events can be on such
-- channels; the predicate matches relay_events_off_kitchen_idx.
SELECT partition, position, sse_event, channels, data::text
FROM relay_events
WHERE NOT (channels @> ARRAY['restaurant:' || restaurant_id::text])
  AND %(channel)s = ANY (channels)
  AND position > coalesce((%(after)s::jsonb ->> partition::text)::bigint, 0)
ORDER BY partition, position
LIMIT %(limit)s
