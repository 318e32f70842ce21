-- relay 0003: SLA / delay alerts derived from the event log (never written by
-- the order service). One replica at a time follows the log from
-- relay_sla_offsets and keeps, per open order, the next deadline it must meet.
-- A due deadline is deleted and its OrderDelayAlert inserted into relay_outbox
-- in one transaction, so each breach alerts exactly once, whatever crashes.

CREATE TABLE relay_sla_offsets (
    partition smallint PRIMARY KEY,
    position  bigint   NOT NULL DEFAULT 0 -- log position already applied
);
INSERT INTO relay_sla_offsets (partition)
SELECT partition FROM relay_partitions;

CREATE TABLE relay_sla_deadlines (
    order_id      uuid        PRIMARY KEY,
    restaurant_id uuid        NOT NULL,
    customer_id   uuid,
    order_number  text,
    kind          text        NOT NULL CHECK (kind IN ('NotAccepted', 'NotReady', 'DeliveryLate')),
    due_at        timestamptz NOT NULL
);
CREATE INDEX relay_sla_deadlines_due_idx ON relay_sla_deadlines (due_at);

-- Optional per-restaurant thresholds; a NULL column falls back to RELAY_SLA_*.
CREATE TABLE relay_sla_thresholds (
    restaurant_id  uuid PRIMARY KEY,
    not_accepted   interval, -- payment -> accepted
    not_ready      interval, -- accepted -> ready for delivery
    delivery_grace interval  -- past estimatedDeliveryTime before "late"
);
