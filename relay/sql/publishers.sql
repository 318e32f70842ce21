-- External publishers: leadership, dead letters, lag. Each publisher's offset
-- is its relay_offsets row 'publisher:{name}' (see the offset_* queries).

-- name: publisher_dead_letter
-- A message the broker refused for good: kept with the reason, for this
-- publisher only; the publisher moves past it.
INSERT INTO relay_publisher_dead_letters (publisher, event_id, event_type, reason)
VALUES (%(publisher)s, %(event_id)s, %(event_type)s, %(reason)s)
ON CONFLICT (publisher, event_id) DO UPDATE SET reason = excluded.reason,
                                                dead_lettered_at = now()

-- name: publisher_lag
-- Snapshot windows each publisher has still to deliver, whole or in part
-- (status and readiness): a window holds every commit of one tick, so this
-- is 0 exactly when the publisher has delivered everything recorded. An
-- offset older than retention counts from the oldest retained window, where
-- the publisher resumes. Reads one row per publisher, never the outbox.
SELECT substr(o.follower, length('publisher:') + 1) AS publisher,
       greatest(h.window_id - greatest(CASE WHEN o.xid = 9223372036854775807
                                            THEN o.window_id ELSE o.window_id - 1 END,
                                       b.pruned_through), 0)::bigint AS lag
FROM relay_offsets AS o
CROSS JOIN relay_log_bounds AS b
CROSS JOIN (SELECT max(window_id) AS window_id FROM relay_windows) AS h
WHERE starts_with(o.follower, 'publisher:')
ORDER BY o.follower

-- name: publisher_lock
-- One publishing process per publisher name: a session lock that dies with its
-- connection (a crashed leader frees it at once; a standby takes over).
SELECT pg_try_advisory_lock(hashtextextended('relay.publisher:' || %(publisher)s, 0))
