-- SLA / delay alerts (relay/sla.py). One replica at a time: every statement
-- below runs inside a transaction holding pg_try_advisory_xact_lock.

-- name: sla_lock
SELECT pg_try_advisory_xact_lock(%(key)s)

-- name: sla_apply_log
-- Follow the log one step, all in the database: read the next events after
-- each partition's applied offset (gap-free per partition), keep each order's
-- last deadline-changing event of the step (an order's events share one
-- partition, so position order is its order), then clear or set its deadline
-- and advance the offsets. Returns the most events read from one partition
-- (a full step means there is more to read).
--   paid (OrderPaymentSucceeded)      → NotAccepted, from lastUpdateTimestamp
--   accepted (OrderAccepted)          → NotReady, from lastUpdateTimestamp
--   ready (OrderReadyForDelivery)     → DeliveryLate, from estimatedDeliveryTime
--   delivered, rejected, cancelled, payment failed → cleared
--   anything else (Preparing, alerts) → the current deadline stands
-- Timestamps are read from the published data, which the relay itself
-- rendered and validated (ISO-8601 in UTC), so the casts cannot fail.
WITH step AS (
    -- The few fields a deadline needs are read from the data in one pass
    -- (json_to_record), only for the event types that set one; no payload is
    -- carried further, so the step stays small enough to sort in memory.
    SELECT e.partition, e.position, e.event_type, e.restaurant_id, e.order_id, e.customer_id,
           f."orderNumber" AS order_number,
           coalesce(f."lastUpdateTimestamp", f."occurredOnUtc") AS updated,
           f."estimatedDeliveryTime" AS estimate
    FROM relay_sla_offsets AS o
    CROSS JOIN LATERAL (
        SELECT e.partition, e.position, e.event_type, e.restaurant_id, e.order_id,
               e.customer_id, e.data
        FROM relay_events AS e
        WHERE e.partition = o.partition AND e.position > o.position
        ORDER BY e.position
        LIMIT %(per_partition)s
    ) AS e
    LEFT JOIN LATERAL json_to_record(
        CASE WHEN e.order_id IS NOT NULL
                  AND e.event_type IN ('OrderPaymentSucceeded', 'OrderAccepted',
                                       'OrderReadyForDelivery')
             THEN e.data END
    ) AS f ("orderNumber" text, "lastUpdateTimestamp" timestamptz, "occurredOnUtc" timestamptz,
            "estimatedDeliveryTime" timestamptz) ON true
), changes AS (
    SELECT s.order_id, s.position, s.restaurant_id, s.customer_id, s.order_number,
           CASE
               WHEN s.event_type IN ('OrderDelivered', 'OrderRejected', 'OrderCancelled',
                                     'OrderPaymentFailed') THEN 'clear'
               WHEN s.event_type = 'OrderPaymentSucceeded' AND s.updated IS NOT NULL
                   THEN 'NotAccepted'
               WHEN s.event_type = 'OrderAccepted' AND s.updated IS NOT NULL THEN 'NotReady'
               WHEN s.event_type = 'OrderReadyForDelivery'
                   THEN CASE WHEN s.estimate IS NULL THEN 'clear' ELSE 'DeliveryLate' END
           END AS kind,
           CASE WHEN s.event_type = 'OrderReadyForDelivery' THEN s.estimate ELSE s.updated END
               AS since
    FROM step AS s
    WHERE s.order_id IS NOT NULL
), latest AS (
    SELECT DISTINCT ON (order_id) *
    FROM changes
    WHERE kind IS NOT NULL
    ORDER BY order_id, position DESC
), cleared AS (
    DELETE FROM relay_sla_deadlines AS d
    USING latest AS l
    WHERE d.order_id = l.order_id AND l.kind = 'clear'
), deadlines AS (
    -- Each order's next deadline replaces the previous one.
    INSERT INTO relay_sla_deadlines
        (order_id, restaurant_id, customer_id, order_number, kind, due_at)
    SELECT l.order_id, l.restaurant_id, l.customer_id, l.order_number, l.kind,
           l.since + coalesce(
               CASE l.kind WHEN 'NotAccepted' THEN t.not_accepted
                           WHEN 'NotReady' THEN t.not_ready
                           ELSE t.delivery_grace END,
               CASE l.kind WHEN 'NotAccepted' THEN %(not_accepted)s::interval
                           WHEN 'NotReady' THEN %(not_ready)s::interval
                           ELSE %(delivery_grace)s::interval END)
    FROM latest AS l
    LEFT JOIN relay_sla_thresholds AS t ON t.restaurant_id = l.restaurant_id
    WHERE l.kind <> 'clear'
    ON CONFLICT (order_id) DO UPDATE
    SET kind = EXCLUDED.kind, due_at = EXCLUDED.due_at,
        order_number = coalesce(EXCLUDED.order_number, relay_sla_deadlines.order_number),
        customer_id = coalesce(EXCLUDED.customer_id, relay_sla_deadlines.customer_id)
), heads AS (
    SELECT partition, max(position) AS position, count(*) AS events
    FROM step
    GROUP BY partition
), advanced AS (
    UPDATE relay_sla_offsets AS o
    SET position = h.position
    FROM heads AS h
    WHERE o.partition = h.partition AND o.position < h.position
)
SELECT coalesce(max(events), 0) FROM heads

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
     occurred_on_utc, derived)
SELECT md5(due.order_id::text || due.kind || due.due_at::text)::uuid, 'OrderDelayAlert', 1,
       due.restaurant_id, due.order_id, due.customer_id,
       jsonb_build_object(
           'orderId', due.order_id, 'restaurantId', due.restaurant_id,
           'orderNumber', due.order_number, 'kind', due.kind,
           'expectedBy', due.due_at, 'detectedAt', now()),
       now(), true
FROM due
ON CONFLICT (event_id) DO NOTHING
RETURNING order_id, payload->>'kind'
