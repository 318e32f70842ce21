-- External publishers: offsets, reading the log, dead letters.

-- name: publisher_offsets_init
-- A new publisher starts at the oldest retained event of each partition, so it
-- delivers the whole retained history once (at-least-once, nothing skipped).
INSERT INTO relay_publisher_offsets (publisher, partition, position)
SELECT %(publisher)s, partition, pruned_through
FROM relay_partitions
ON CONFLICT (publisher, partition) DO NOTHING

-- name: publisher_work
-- Partitions whose log head is past this publisher's offset (64 rows at most).
-- An offset older than retention resumes at the oldest retained event.
SELECT p.partition, greatest(o.position, p.pruned_through) AS after, p.last_position
FROM relay_partitions AS p
JOIN relay_publisher_offsets AS o ON o.partition = p.partition AND o.publisher = %(publisher)s
WHERE p.last_position > o.position
ORDER BY p.published_at NULLS FIRST

-- name: publisher_read
-- The next events of one partition for a publisher, in position order.
SELECT partition, position, event_id, event_type, schema_version, restaurant_id,
       occurred_on_utc, data::text
FROM relay_events
WHERE partition = %(partition)s AND position > %(after)s
ORDER BY position
LIMIT %(limit)s

-- name: publisher_advance
-- Only forward: a late writer (a deposed leader) can never move an offset back.
UPDATE relay_publisher_offsets
SET position = %(position)s, updated_at = now()
WHERE publisher = %(publisher)s AND partition = %(partition)s AND position < %(position)s

-- name: publisher_dead_letter
INSERT INTO relay_publisher_dead_letters
    (publisher, event_id, partition, position, event_type, reason)
VALUES (%(publisher)s, %(event_id)s, %(partition)s, %(position)s, %(event_type)s, %(reason)s)
ON CONFLICT (publisher, event_id) DO UPDATE SET reason = excluded.reason,
                                                dead_lettered_at = now()

-- name: publisher_lag
-- Events each publisher still has to deliver (status and readiness).
SELECT o.publisher, sum(greatest(p.last_position - o.position, 0))::bigint AS lag
FROM relay_publisher_offsets AS o
JOIN relay_partitions AS p USING (partition)
GROUP BY o.publisher
ORDER BY o.publisher

-- name: publisher_lock
-- One publishing process per publisher name: a session lock that dies with its
-- connection (a crashed leader frees it at once; a standby takes over).
SELECT pg_try_advisory_lock(hashtextextended('relay.publisher:' || %(publisher)s, 0))
