-- SLA / delay alerts (relay/sla.py). One replica at a time: every statement
-- below runs inside a transaction that holds the `relay.sla` offset row
-- (take_offset: FOR UPDATE SKIP LOCKED), so a second replica skips the step.

-- name: sla_apply
-- Apply one page of the log, as the watcher computed it: each order's last
-- deadline-changing event of the page, one row per order, in parallel arrays.
-- kind 'clear' deletes the order's deadline; any other kind replaces it,
-- due at `since` plus the restaurant's threshold (relay_sla_thresholds, a
-- NULL column falling back to RELAY_SLA_*). A deadline that would not change
-- is not rewritten. Returns the deadline rows written (the write cost per
-- event, which the tests measure).
WITH change AS (
    SELECT *
    FROM unnest(%(orders)s::uuid[], %(restaurants)s::uuid[], %(customers)s::uuid[],
                %(numbers)s::text[], %(kinds)s::text[], %(since)s::timestamptz[])
         AS c (order_id, restaurant_id, customer_id, order_number, kind, since)
), cleared AS (
    DELETE FROM relay_sla_deadlines AS d
    USING change AS c
    WHERE d.order_id = c.order_id AND c.kind = 'clear'
    RETURNING d.order_id
), deadlines AS (
    INSERT INTO relay_sla_deadlines AS d
        (order_id, restaurant_id, customer_id, order_number, kind, due_at)
    SELECT c.order_id, c.restaurant_id, c.customer_id, c.order_number, c.kind,
           c.since + coalesce(
               CASE c.kind WHEN 'NotAccepted' THEN t.not_accepted
                           WHEN 'NotReady' THEN t.not_ready
                           ELSE t.delivery_grace END,
               CASE c.kind WHEN 'NotAccepted' THEN %(not_accepted)s::interval
                           WHEN 'NotReady' THEN %(not_ready)s::interval
                           ELSE %(delivery_grace)s::interval END)
    FROM change AS c
    LEFT JOIN relay_sla_thresholds AS t ON t.restaurant_id = c.restaurant_id
    WHERE c.kind <> 'clear'
    ON CONFLICT (order_id) DO UPDATE
    SET kind = EXCLUDED.kind, due_at = EXCLUDED.due_at,
        order_number = coalesce(EXCLUDED.order_number, d.order_number),
        customer_id = coalesce(EXCLUDED.customer_id, d.customer_id)
    WHERE (d.kind, d.due_at, d.order_number, d.customer_id) IS DISTINCT FROM
          (EXCLUDED.kind, EXCLUDED.due_at, coalesce(EXCLUDED.order_number, d.order_number),
           coalesce(EXCLUDED.customer_id, d.customer_id))
    RETURNING d.order_id
)
SELECT (SELECT count(*) FROM cleared) + (SELECT count(*) FROM deadlines)

-- name: sla_raise_due
-- Deadlines that passed become OrderDelayAlert rows in the outbox, exactly once:
-- the deadline row is deleted in the same transaction, and the event id is
-- derived from (order, kind, due time) so a replay could never alert twice.
--
-- An order with a row the watcher has not read yet is left for the next
-- scan: the awaited event may be that row. Not read means not at or before
-- the `relay.sla` offset (window W, xid X, id I): neither visible in window
-- W-1's snapshot nor (visible in W's and at or before (X, I)). That covers
-- rows of later windows and committed rows no window holds yet alike: every
-- row committed before this statement began is seen here, so an alert is
-- never raised for an order whose awaited event had committed. When the
-- offset is a whole window, "read" is just "visible in W's snapshot". If the
-- offset's window is gone (retention passed it), nothing is raised until the
-- watcher has caught up.
WITH sla AS (
    SELECT o.xid AS at_xid, o.id AS at_id, cur.snapshot AS upto,
           CASE WHEN o.xid = 9223372036854775807 THEN cur.snapshot ELSE prev.snapshot END
               AS before
    FROM relay_offsets AS o
    JOIN relay_windows AS cur ON cur.window_id = o.window_id
    LEFT JOIN relay_windows AS prev ON prev.window_id = o.window_id - 1
    WHERE o.follower = 'relay.sla'
), due AS (
    DELETE FROM relay_sla_deadlines AS d
    USING sla
    WHERE d.order_id IN (
        SELECT order_id FROM relay_sla_deadlines
        WHERE due_at <= now()
        ORDER BY due_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    AND NOT EXISTS (
        SELECT FROM relay_outbox AS r
        WHERE r.order_id = d.order_id
          AND NOT coalesce(pg_visible_in_snapshot(r.xid, sla.before), false)
          AND NOT (pg_visible_in_snapshot(r.xid, sla.upto)
                   AND (r.xid::text::bigint, r.id) <= (sla.at_xid, sla.at_id))
    )
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
