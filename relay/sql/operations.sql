-- Operations: `relay status` and `relay dead-letters`. Read-only except retry.

-- name: status_outbox
-- Backlog and the age of the oldest pending row.
SELECT count(*) AS backlog,
       extract(epoch FROM now() - min(enqueued_at)) AS oldest_pending_s
FROM relay_outbox

-- name: status_log
-- Publication over the last minute: rate and enqueue -> publish lag.
SELECT count(*) AS published_last_minute,
       extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY published_at - enqueued_at))
           AS lag_p50_s,
       extract(epoch FROM max(published_at - enqueued_at)) AS lag_max_s,
       extract(epoch FROM now() - max(published_at)) AS last_publish_age_s
FROM relay_events
WHERE published_at > now() - interval '1 minute'

-- name: status_heads
SELECT coalesce(sum(last_position), 0) AS positions, max(published_at) AS last_published_at
FROM relay_partitions

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

-- name: dead_letters_list
SELECT id, event_id, event_type, schema_version, restaurant_id, reason, dead_lettered_at, attempts
FROM relay_dead_letters
ORDER BY id
LIMIT %(limit)s

-- name: dead_letters_take
-- The dead letters to retry, locked so two operators cannot retry one twice.
SELECT id, event_id, event_type, schema_version, restaurant_id, order_id, customer_id,
       payload::text,
       CASE WHEN relay_loadable_time(occurred_on_utc) THEN occurred_on_utc END,
       CASE WHEN NOT relay_loadable_time(occurred_on_utc) THEN occurred_on_utc::text END
FROM relay_dead_letters
WHERE %(all)s OR id = ANY(%(ids)s::bigint[])
ORDER BY id
FOR UPDATE SKIP LOCKED

-- name: dead_letters_requeue
-- A dead letter that now validates goes back to the outbox (same event id:
-- it stays idempotent) and leaves the dead-letter table, atomically.
WITH back AS (
    INSERT INTO relay_outbox
        (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
         occurred_on_utc)
    SELECT event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
           occurred_on_utc
    FROM relay_dead_letters WHERE id = %(id)s
    ON CONFLICT (event_id) DO NOTHING
)
DELETE FROM relay_dead_letters WHERE id = %(id)s

-- name: dead_letters_still_bad
UPDATE relay_dead_letters
SET reason = %(reason)s, attempts = attempts + 1, dead_lettered_at = now()
WHERE id = %(id)s
