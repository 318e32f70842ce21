-- relay 0001: the outbox the order service writes, the gap-free event log the
-- relay publishes into, and the relay's bookkeeping tables.
--
-- Flow: the producer INSERTs into relay_outbox (pending set). A dispatcher
-- locks a partition row in relay_partitions (FOR UPDATE SKIP LOCKED), moves the
-- partition's pending rows into relay_events with the next positions, and
-- DELETEs them from relay_outbox, in one short transaction. relay_outbox thus
-- only ever holds pending rows, so the claim never walks published history.

-- The pending set. The producer names exactly the eight contract columns.
CREATE TABLE relay_outbox (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- insert order, NOT commit order
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL DEFAULT 1,
    restaurant_id   uuid        NOT NULL,
    order_id        uuid,
    customer_id     uuid,
    payload         jsonb       NOT NULL,
    occurred_on_utc timestamptz NOT NULL,
    -- relay-owned columns, filled by defaults so producers never name them:
    enqueued_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- 64 partitions keyed by the restaurant (last byte of its uuid): one
    -- restaurant's events always share a partition, hence one ordered log.
    partition       smallint    NOT NULL
                    GENERATED ALWAYS AS (get_byte(uuid_send(restaurant_id), 15) & 63) STORED,
    CONSTRAINT relay_outbox_event_id_key UNIQUE (event_id)
);
COMMENT ON TABLE relay_outbox IS
    'Pending domain events written by the order service in its own transaction; the relay deletes each row when it publishes it.';

-- The claim reads one partition's pending rows in insert order.
CREATE INDEX relay_outbox_claim_idx ON relay_outbox (partition, id);

-- One row per partition: its publication counter. Locking this row is what
-- makes a dispatcher the partition's only publisher for one transaction.
CREATE TABLE relay_partitions (
    partition      smallint    PRIMARY KEY CHECK (partition BETWEEN 0 AND 63),
    last_position  bigint      NOT NULL DEFAULT 0, -- highest position committed in the log
    pruned_through bigint      NOT NULL DEFAULT 0, -- positions <= this were removed by retention
    published_at   timestamptz                     -- last publication (fairness, status)
);
INSERT INTO relay_partitions (partition) SELECT generate_series(0, 63);

-- The event log: published events, replayable by (partition, position) for
-- RELAY_RETENTION. Positions are committed in increasing order per partition.
-- Every index here is paid on each publish: keep them to what replay, order
-- authorisation and dedupe need (retention walks the primary key).
CREATE TABLE relay_events (
    partition       smallint    NOT NULL,
    position        bigint      NOT NULL,
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    sse_event       text        NOT NULL,
    restaurant_id   uuid        NOT NULL,
    order_id        uuid,
    customer_id     uuid,        -- routing/authorisation only, never broadcast
    channels        text[]      NOT NULL,
    data            json        NOT NULL, -- the whitelisted broadcast object, stored verbatim
    occurred_on_utc timestamptz NOT NULL,
    enqueued_at     timestamptz NOT NULL,
    published_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, position),
    CONSTRAINT relay_events_event_id_key UNIQUE (event_id)
);
CREATE INDEX relay_events_restaurant_idx ON relay_events (restaurant_id, position);
CREATE INDEX relay_events_order_idx ON relay_events (order_id, position) WHERE order_id IS NOT NULL;

-- Rows that failed validation: kept with the reason, never blocking later rows.
CREATE TABLE relay_dead_letters (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         uuid        NOT NULL,
    event_type       text        NOT NULL,
    schema_version   integer     NOT NULL,
    restaurant_id    uuid        NOT NULL,
    order_id         uuid,
    customer_id      uuid,
    payload          jsonb       NOT NULL,
    occurred_on_utc  timestamptz NOT NULL,
    enqueued_at      timestamptz NOT NULL,
    reason           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 1
);
CREATE INDEX relay_dead_letters_event_id_idx ON relay_dead_letters (event_id);

-- Live relay processes, for `relay status` (heartbeat every few seconds).
CREATE TABLE relay_replicas (
    replica_id   text        PRIMARY KEY,
    hostname     text        NOT NULL,
    pid          integer     NOT NULL,
    roles        text[]      NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    published    bigint      NOT NULL DEFAULT 0 -- events this replica published since start
);
