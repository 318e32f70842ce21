-- relay 0002: the opt-in NOTIFY wake-up (RELAY_WAKEUP=notify).
-- Only the function is created here; the relay attaches or removes the
-- statement-level trigger at start-up to match its configured mode, because a
-- NOTIFY in every producer commit serialises the order service's commits.
CREATE FUNCTION relay_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('relay_outbox', '');
    RETURN NULL;
END;
$$;
