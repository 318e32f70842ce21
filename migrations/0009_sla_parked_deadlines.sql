-- relay 0009: SLA deadlines leave the database. The watcher keeps open
-- deadlines in memory and rebuilds them from the log after a restart, reading
-- again from `relay.sla.replay` in relay_offsets (the oldest open deadline's
-- event); it writes nothing per event. relay_sla_deadlines keeps only the
-- deadlines due further ahead than RELAY_RETENTION / 2 after their event,
-- whose events retention may delete before they are due. Rows a previous
-- relay wrote there stay valid: they are raised (or cleared) as before.
COMMENT ON TABLE relay_sla_deadlines IS
    'Parked SLA deadlines (due more than RELAY_RETENTION / 2 after their event), and those '
    'left by a relay before 0009; open deadlines otherwise live in the SLA watcher''s memory.';
