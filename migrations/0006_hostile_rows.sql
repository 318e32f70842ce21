-- relay 0006: rows a careless or hostile producer can write must never stop
-- the relay, and an order id reused by another restaurant must never reach
-- the order's customer.

-- Timestamps the relay can load. PostgreSQL stores ±infinity and years up to
-- 294276; a client library (Python's datetime, .NET's DateTime) stops at
-- 9999-12-31. The claim reads occurred_on_utc only where this holds and
-- dead-letters the row otherwise, instead of failing the whole batch on load.
-- A plain SQL expression: PostgreSQL inlines it into the queries that call it.
CREATE FUNCTION relay_loadable_time(moment timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT moment >= '0001-01-01 00:00:00+00' AND moment < '10000-01-01 00:00:00+00' $$;
COMMENT ON FUNCTION relay_loadable_time(timestamptz) IS
    'Whether a timestamp fits the years 1..9999 in UTC (no ±infinity): what clients can load.';

-- Event types the relay derives itself (OrderDelayAlert, raised by its SLA
-- timers) are refused when a producer writes them; the relay marks its own.
-- A constant default: adding the column rewrites nothing.
ALTER TABLE relay_outbox ADD COLUMN derived boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN relay_outbox.derived IS
    'Set only by the relay for events it derives (SLA alerts); producers never name it.';

-- The order channel names the order's restaurant: order:{restaurant}:{order}.
-- An order stream subscribes to its owner restaurant's channel, so an event
-- of another restaurant that reuses the order id never reaches it, live or
-- on resume. Retained events are renamed here; events whose order_id column
-- was NULL lose their order channel (routing follows the column only).
UPDATE relay_events
SET channels = array_replace(
        channels, 'order:' || order_id::text, 'order:' || restaurant_id::text || ':' || order_id::text)
WHERE order_id IS NOT NULL AND channels @> ARRAY['order:' || order_id::text];

UPDATE relay_events
SET channels = ARRAY(SELECT c FROM unnest(channels) AS c WHERE c !~ '^order:[^:]+$')
WHERE order_id IS NULL AND EXISTS (SELECT FROM unnest(channels) AS c WHERE c ~ '^order:[^:]+$');

