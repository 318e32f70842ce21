-- relay 0005: external publishers (RELAY_PUBLISHERS) follow the event log from
-- their own durable offsets, one row per (publisher, partition). A publisher
-- advances its row only after the broker confirmed every event up to it, so a
-- crash republishes (at-least-once; message id = event_id) and never skips.
CREATE TABLE relay_publisher_offsets (
    publisher  text        NOT NULL,  -- the publisher's name (URL without credentials, or ?name=)
    partition  smallint    NOT NULL CHECK (partition BETWEEN 0 AND 63),
    position   bigint      NOT NULL,  -- every event of the partition up to here is confirmed
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (publisher, partition)
);
COMMENT ON TABLE relay_publisher_offsets IS
    'How far each external publisher has delivered each partition of relay_events (broker-confirmed).';

-- Events a broker refused for good (too large, invalid subject): kept with the
-- reason for that publisher only; the publisher moves past them.
CREATE TABLE relay_publisher_dead_letters (
    publisher        text        NOT NULL,
    event_id         uuid        NOT NULL,
    partition        smallint    NOT NULL,
    position         bigint      NOT NULL,
    event_type       text        NOT NULL,
    reason           text        NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (publisher, event_id)
);
