-- SLA / delay alerts (relay/sla.py). One replica at a time: every statement
-- below runs inside a transaction that holds the `relay.sla` offset row
-- (take_offset: FOR UPDATE SKIP LOCKED), so a second replica skips the step.
-- Open deadlines live in the watcher's memory, rebuilt from the log; only
-- deadlines due far ahead (parked) are kept in relay_sla_deadlines. Ids are
-- read as text, as the log's reads give them.

-- name: sla_thresholds
-- Per-restaurant overrides; a NULL column falls back to RELAY_SLA_*.
SELECT restaurant_id::text, not_accepted, not_ready, delivery_grace FROM relay_sla_thresholds

-- name: sla_parked
SELECT order_id::text, restaurant_id::text, customer_id::text, order_number, kind, due_at
FROM relay_sla_deadlines

-- name: sla_park
-- Store or clear parked deadlines, one row per order in parallel arrays:
-- kind 'clear' deletes the order's row, any other kind replaces it. A row
-- that would not change is not rewritten (a rebuild re-applies the same
-- events). Returns the rows written.
WITH change AS (
    SELECT *
    FROM unnest(%(orders)s::uuid[], %(restaurants)s::uuid[], %(customers)s::uuid[],
                %(numbers)s::text[], %(kinds)s::text[], %(due)s::timestamptz[])
         AS c (order_id, restaurant_id, customer_id, order_number, kind, due_at)
), cleared AS (
    DELETE FROM relay_sla_deadlines AS d
    USING change AS c
    WHERE d.order_id = c.order_id AND c.kind = 'clear'
    RETURNING d.order_id
), parked AS (
    INSERT INTO relay_sla_deadlines AS d
        (order_id, restaurant_id, customer_id, order_number, kind, due_at)
    SELECT order_id, restaurant_id, customer_id, order_number, kind, due_at
    FROM change
    WHERE kind <> 'clear'
    ON CONFLICT (order_id) DO UPDATE
    SET kind = EXCLUDED.kind, due_at = EXCLUDED.due_at,
        order_number = EXCLUDED.order_number, customer_id = EXCLUDED.customer_id,
        restaurant_id = EXCLUDED.restaurant_id
    WHERE (d.kind, d.due_at, d.order_number, d.customer_id, d.restaurant_id) IS DISTINCT FROM
          (EXCLUDED.kind, EXCLUDED.due_at, EXCLUDED.order_number, EXCLUDED.customer_id,
           EXCLUDED.restaurant_id)
    RETURNING d.order_id
)
SELECT (SELECT count(*) FROM cleared) + (SELECT count(*) FROM parked)

-- name: sla_raise
-- Deadlines that passed (by the database's clock) become OrderDelayAlert rows
-- in the outbox. The event id is derived from (order, kind, due time), so a
-- deadline raised again (a rebuilt watcher that had not yet read its alert)
-- adds nothing. A parked deadline's row goes in the same transaction.
--
-- An order with a row the watcher has not read yet is left for a later
-- step: the awaited event may be that row. Not read means not at or before
-- the `relay.sla` offset (window W, xid X, id I): neither visible in window
-- W-1's snapshot nor (visible in W's and at or before (X, I)). That covers
-- rows of later windows and committed rows no window holds yet alike: every
-- row committed before this statement began is seen here, so an alert is
-- never raised for an order whose awaited event had committed. When the
-- offset is a whole window, "read" is just "visible in W's snapshot". If the
-- offset's window is gone (retention passed it), nothing is raised until the
-- watcher has caught up. Returns the orders dealt with (alerted now or before).
WITH sla AS (
    SELECT o.xid AS at_xid, o.id AS at_id, cur.snapshot AS upto,
           CASE WHEN o.xid = 9223372036854775807 THEN cur.snapshot ELSE prev.snapshot END
               AS before
    FROM relay_offsets AS o
    JOIN relay_windows AS cur ON cur.window_id = o.window_id
    LEFT JOIN relay_windows AS prev ON prev.window_id = o.window_id - 1
    WHERE o.follower = 'relay.sla'
), due AS (
    SELECT c.*
    FROM unnest(%(orders)s::uuid[], %(restaurants)s::uuid[], %(customers)s::uuid[],
                %(numbers)s::text[], %(kinds)s::text[], %(due)s::timestamptz[])
         AS c (order_id, restaurant_id, customer_id, order_number, kind, due_at),
         sla
    WHERE c.due_at <= now()
      AND NOT EXISTS (
        SELECT FROM relay_outbox AS r
        WHERE r.order_id = c.order_id
          AND NOT coalesce(pg_visible_in_snapshot(r.xid, sla.before), false)
          AND NOT (pg_visible_in_snapshot(r.xid, sla.upto)
                   AND (r.xid::text::bigint, r.id) <= (sla.at_xid, sla.at_id))
      )
), unparked AS (
    DELETE FROM relay_sla_deadlines AS d
    USING due
    WHERE d.order_id = due.order_id AND d.kind = due.kind AND d.due_at = due.due_at
), alerts AS (
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
    RETURNING order_id
)
SELECT due.order_id::text, due.kind, due.order_id IN (SELECT order_id FROM alerts)
FROM due
