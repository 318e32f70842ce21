"""What a person runs: the `relay` command and everything behind its
subcommands — the demo and its order simulator, the throwaway PostgreSQL
server, development tokens, status, dead letters and the bench.

The pipeline itself (events → outbox → log → gateway / publishers / SLA)
never imports from here.
"""
