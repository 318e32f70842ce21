-- relay 0004: replay for streams that span partitions (the admin stream and
-- coupon:{id}). Their events (coupons, finance entries) never go to the
-- restaurant's kitchen channel, so a partial index on exactly those rows stays
-- tiny and costs the ordinary order events nothing but the predicate check.
CREATE INDEX relay_events_off_kitchen_idx ON relay_events (partition, position)
WHERE NOT (channels @> ARRAY['restaurant:' || restaurant_id::text]);
