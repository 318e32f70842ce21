-- relay 0008: the outbox is the log. Rows stay where the producer wrote them
-- and are read in place by transaction-snapshot windows (PgQ's batches); the
-- relay writes one small row per window, none per event. docs/design.md §4
-- has the argument; this file takes an installation of 0001..0007 there
-- without losing a pending or a retained event.

-- 1. The inserting transaction of every row (producers never name it). The
--    volatile default rewrites the table once, here: pending rows get this
--    migration's transaction id, so they fall in the first window recorded
--    after it commits.
ALTER TABLE relay_outbox ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
COMMENT ON COLUMN relay_outbox.xid IS
    'The transaction that inserted the row (defaulted): which snapshot window it belongs to.';
-- Partitions were the old claim's unit of work; nothing reads them now.
DROP INDEX relay_outbox_claim_idx;
ALTER TABLE relay_outbox DROP COLUMN partition;
COMMENT ON TABLE relay_outbox IS
    'Domain events written by the order service in its own transaction; the relay reads them '
    'in place by snapshot window and deletes them only at the end of RELAY_RETENTION.';

-- Window reads walk (xid, id): a window is a range of new transaction ids
-- plus the few that were in progress at the previous window. Replays of one
-- restaurant, order or customer walk the same order within their key.
CREATE INDEX relay_outbox_window_idx ON relay_outbox (xid, id);
CREATE INDEX relay_outbox_restaurant_idx ON relay_outbox (restaurant_id, xid, id);
CREATE INDEX relay_outbox_order_idx ON relay_outbox (order_id, xid, id)
WHERE order_id IS NOT NULL;
CREATE INDEX relay_outbox_customer_idx ON relay_outbox (customer_id, xid, id)
WHERE customer_id IS NOT NULL AND order_id IS NOT NULL;

-- 2. The windows. Window n holds the rows whose transaction is visible in
--    snapshot n and not in snapshot n-1. Recorded by one replica at a time,
--    immutable once committed. horizon (the snapshot's xmax: every transaction
--    id from it on had not started) is non-decreasing with
--    window_id, so "the first window that sees transaction x" is one probe.
CREATE TABLE relay_windows (
    window_id   bigint      PRIMARY KEY,
    snapshot    pg_snapshot NOT NULL,
    horizon     xid8        NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    CHECK (horizon = pg_snapshot_xmax(snapshot))
);
CREATE INDEX relay_windows_horizon_idx ON relay_windows (horizon, window_id);
COMMENT ON TABLE relay_windows IS
    'Snapshot windows over relay_outbox: one row per tick with new commits, never one per event.';

-- Window 0 sees exactly the events retained from before this version (moved
-- below with the frozen transaction id 2) and no real transaction; window -1
-- sees nothing, so reading from the very start is reading after it.
INSERT INTO relay_windows (window_id, snapshot, horizon) VALUES (-1, '1:1:', '1'), (0, '3:3:', '3');

-- How far retention has cut: the rows of windows <= pruned_through are gone,
-- so a cursor below it is answered with a reset.
CREATE TABLE relay_log_bounds (
    only_row       boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_through bigint  NOT NULL DEFAULT -1
);
INSERT INTO relay_log_bounds DEFAULT VALUES;

-- 3. Followers of the windows (the dead-letter check, the SLA watcher, each
--    external publisher) keep one durable offset each: (window, xid, id) of
--    the last row done; xid = id = 9223372036854775807 means the whole window.
CREATE TABLE relay_offsets (
    follower   text        PRIMARY KEY,
    window_id  bigint      NOT NULL,
    xid        bigint      NOT NULL,
    id         bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE relay_offsets IS
    'How far each follower of the windows has got: relay.check, relay.sla, publisher:{name}.';

-- 4. Retained events move back into the outbox, in their log order, as
--    window 0. Their payload is the broadcast object the relay rendered,
--    which renders to the same bytes again. A pending row that repeats a
--    published event id is the duplicate the old log's key would have dropped.
DELETE FROM relay_outbox AS o USING relay_events AS e WHERE o.event_id = e.event_id;

CREATE TEMPORARY TABLE relay_moved (
    partition smallint NOT NULL,
    position  bigint   NOT NULL,
    id        bigint   NOT NULL
) ON COMMIT DROP;

WITH moved AS (
    INSERT INTO relay_outbox
        (event_id, event_type, schema_version, restaurant_id, order_id, customer_id, payload,
         occurred_on_utc, enqueued_at, derived, xid)
    SELECT e.event_id, e.event_type, e.schema_version, e.restaurant_id, e.order_id,
           e.customer_id, e.data::jsonb, e.occurred_on_utc, e.enqueued_at,
           e.event_type = 'OrderDelayAlert', '2'
    FROM relay_events AS e
    ORDER BY e.partition, e.position
    RETURNING id, event_id
)
INSERT INTO relay_moved (partition, position, id)
SELECT e.partition, e.position, m.id
FROM moved AS m
JOIN relay_events AS e USING (event_id);

-- A follower that had delivered every retained event resumes after window
-- 0; one still behind in some partition resumes just before the first event
-- it had not delivered (later ones of other partitions come again: at least
-- once, as after any crash).
INSERT INTO relay_offsets (follower, window_id, xid, id)
SELECT follower, 0,
       CASE WHEN first_due IS NULL THEN 9223372036854775807 ELSE 2 END,
       coalesce(first_due - 1, 9223372036854775807)
FROM (
    SELECT 'publisher:' || o.publisher AS follower,
           min(m.id) FILTER (WHERE m.position > o.position) AS first_due
    FROM relay_publisher_offsets AS o
    LEFT JOIN relay_moved AS m ON m.partition = o.partition
    GROUP BY o.publisher
    UNION ALL
    SELECT 'relay.sla', min(m.id) FILTER (WHERE m.position > s.position)
    FROM relay_sla_offsets AS s
    LEFT JOIN relay_moved AS m ON m.partition = s.partition
) AS due;

-- Retained events were validated when they were published.
INSERT INTO relay_offsets (follower, window_id, xid, id)
VALUES ('relay.check', 0, 9223372036854775807, 9223372036854775807);

-- 5. The claim machinery and the copy of every event are gone.
ALTER TABLE relay_publisher_dead_letters DROP COLUMN partition, DROP COLUMN position;
DROP TABLE relay_publisher_offsets;
DROP TABLE relay_sla_offsets;
DROP TABLE relay_events;
DROP TABLE relay_partitions;
