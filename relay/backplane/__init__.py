"""The live backplane: rendered events over NATS JetStream, for gateway replicas.

Without it every gateway replica reads each event it serves from PostgreSQL
(after a NOTIFY or its sweep): 50 gateways read each event 50 times. With
``RELAY_BACKPLANE=nats://…`` the leading recorder's process publishes each
page it checked once (``Writer``), and every gateway takes its live tail from
JetStream (``Reader``).

The backplane carries data, but correctness never rests on it: every message
says which stretch of the log it covers (``after``, ``reached``), so a
gateway that misses one sees the next begin beyond what it delivered and
reads that stretch from PostgreSQL, exactly as it does without a backplane.
A lost NATS, a dead publisher or a dropped message costs reads, never events.

- ``codec``: a page as JetStream messages and back;
- ``writer``: the publishing side, beside the leading recorder;
- ``reader``: the gateway's live tail, with its health for ``/readyz``.

Only the codec is imported here: the NATS client is an optional extra
(``relay[brokers]``), loaded when a backplane is configured.
"""

from __future__ import annotations

from relay.backplane.codec import BackplaneConfig, parse_backplane_url

__all__ = ["BackplaneConfig", "parse_backplane_url"]
