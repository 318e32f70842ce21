-- SLA / delay alerts (relay/sla.py). One replica at a time: every statement
-- below runs inside a transaction holding pg_try_advisory_xact_lock.

-- name: sla_lock
SELECT pg_try_advisory_xact_lock(%(key)s)

-- name: sla_read_log
-- The next events after each partition's applied offset (gap-free per partition).
SELECT e.partition, e.position, e.event_type, e.restaurant_id, e.order_id, e.customer_id,
       e.data::text
FROM relay_sla_offsets AS o
CROSS JOIN LATERAL (
    SELECT * FROM relay_events AS e
    WHERE e.partition = o.partition AND e.position > o.position
    ORDER BY e.position
    LIMIT %(per_partition)s
) AS e
ORDER BY e.partition, e.position

-- name: sla_advance
UPDATE relay_sla_offsets AS o
SET position = a.position
FROM unnest(%(partitions)s::smallint[], %(positions)s::bigint[]) AS a(partition, position)
WHERE o.partition = a.partition AND o.position < a.position

-- name: sla_set_deadlines
-- Each order's next deadline replaces the previous one (one row per order per batch).
INSERT INTO relay_sla_deadlines (order_id, restaurant_id, customer_id, order_number, kind, due_at)
SELECT d.order_id, d.restaurant_id, d.customer_id, d.order_number, d.kind,
       d.since + coalesce(
           CASE d.kind WHEN 'NotAccepted' THEN t.not_accepted
                       WHEN 'NotReady' THEN t.not_ready
                       ELSE t.delivery_grace END,
           d.default_after)
FROM unnest(%(order_id)s::uuid[], %(restaurant_id)s::uuid[], %(customer_id)s::uuid[],
            %(order_number)s::text[], %(kind)s::text[], %(since)s::timestamptz[],
            %(default_after)s::interval[])
     AS d(order_id, restaurant_id, customer_id, order_number, kind, since, default_after)
LEFT JOIN relay_sla_thresholds AS t ON t.restaurant_id = d.restaurant_id
ON CONFLICT (order_id) DO UPDATE
SET kind = EXCLUDED.kind, due_at = EXCLUDED.due_at,
    order_number = coalesce(EXCLUDED.order_number, relay_sla_deadlines.order_number),
    customer_id = coalesce(EXCLUDED.customer_id, relay_sla_deadlines.customer_id)

-- name: sla_clear_deadlines
DELETE FROM relay_sla_deadlines WHERE order_id = ANY(%(order_ids)s::uuid[])

-- name: sla_raise_due
-- Deadlines that passed become OrderDelayAlert rows in the outbox, exactly once:
-- the deadline row is deleted in the same transaction, and the event id is
-- derived from (order, kind, due time) so a replay could never alert twice.
-- An order with events still pending in the outbox is left for the next scan:
-- the awaited event may be among them.
WITH due AS (
    DELETE FROM relay_sla_deadlines AS d
    WHERE d.order_id IN (
        SELECT order_id FROM relay_sla_deadlines
        WHERE due_at <= now()
        ORDER BY due_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    AND NOT EXISTS (SELECT FROM relay_outbox AS o WHERE o.order_id = d.order_id)
    RETURNING d.*
)
INSERT INTO relay_outbox
    (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
     occurred_on_utc)
SELECT md5(due.order_id::text || due.kind || due.due_at::text)::uuid, 'OrderDelayAlert', 1,
       due.restaurant_id, due.order_id, due.customer_id,
       jsonb_build_object(
           'orderId', due.order_id, 'restaurantId', due.restaurant_id,
           'orderNumber', due.order_number, 'kind', due.kind,
           'expectedBy', due.due_at, 'detectedAt', now()),
       now()
FROM due
ON CONFLICT (event_id) DO NOTHING
RETURNING order_id, payload->>'kind'
