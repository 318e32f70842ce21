-- relay 0007: a customer's orders in one stream (GET /v1/me/orders/stream).
-- Its replay reads one customer's order events across every partition; only
-- rows with both an order and a customer are indexed, so restaurant-level
-- events (finance, coupons) pay nothing for it.
CREATE INDEX relay_events_customer_idx ON relay_events (customer_id, partition, position)
WHERE customer_id IS NOT NULL AND order_id IS NOT NULL;
