"""The published contract of each (event type, schema version), generated from the registry.

Other teams consume what relay broadcasts (SSE ``data:`` and the broker message
body are the same JSON object). This module derives, from the registry entry and
its pydantic model alone, everything they need to name and check it:

- the JSON Schema of that object (serialized form: camelCase keys, money as
  decimal strings, times as ISO-8601 strings, plus the envelope fields), never
  written by hand, so a model change is a schema change;
- where it lives: ``{eventType}/{version}.json`` under ``docs/schemas/`` (as
  ``relay schema --json-schema DIR`` writes it) and ``/v1/schemas/…`` (served);
- its stable id (the schema's ``$id``, the default CloudEvents ``dataschema``)
  and its CloudEvents ``type``.

Adding an event type (one ``EventSpec`` plus its model) adds all of these; an
AsyncAPI document can be built from ``contracts()`` the same way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import core_schema

from relay.errors import UnknownEventType, clip
from relay.events import registry
from relay.events.registry import EventSpec

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "SCHEMA_ID_PREFIX",
    "EventContract",
    "cloudevents_type",
    "contract_for",
    "contracts",
    "dataschema",
    "json_schema_files",
    "schema_id",
    "schema_path",
    "write_json_schemas",
]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# A location-free name: the same in every deployment, so a committed schema and
# the dataschema of a message agree without knowing where the relay is reachable.
SCHEMA_ID_PREFIX = "urn:relay:schema:"

# Every broadcast object ends with these (SPEC §1; see ``registry.render``).
_UUID = {"type": "string", "format": "uuid"}
_TIME = {"type": "string", "format": "date-time"}


def schema_path(event_type: str, schema_version: int) -> str:
    """``OrderAccepted/1.json``: the file under a schema directory, and under ``/v1/schemas/``."""
    return f"{event_type}/{schema_version}.json"


def schema_id(event_type: str, schema_version: int) -> str:
    """``urn:relay:schema:OrderAccepted:1``: the schema's ``$id``."""
    return f"{SCHEMA_ID_PREFIX}{event_type}:{schema_version}"


def cloudevents_type(event_type: str, schema_version: int, prefix: str = "") -> str:
    """``OrderAccepted.v1`` (or ``com.example.orders.OrderAccepted.v1`` with a prefix).

    The version is part of the type, as the CloudEvents primer advises for
    incompatible changes: a consumer of v1 never receives a v2 under its type.
    """
    namespace = f"{prefix.rstrip('.')}." if prefix else ""
    return f"{namespace}{event_type}.v{schema_version}"


def dataschema(event_type: str, schema_version: int, base: str | None = None) -> str:
    """Where the schema is: ``{base}/OrderAccepted/1.json`` when the relay's public
    ``/v1/schemas`` URL is known, else the schema's ``$id``."""
    if base:
        return f"{base.rstrip('/')}/{schema_path(event_type, schema_version)}"
    return schema_id(event_type, schema_version)


@dataclass(frozen=True)
class EventContract:
    """One (event type, schema version) as consumers see it."""

    spec: EventSpec

    @property
    def event_type(self) -> str:
        return self.spec.event_type

    @property
    def schema_version(self) -> int:
        return self.spec.schema_version

    @property
    def path(self) -> str:
        return schema_path(self.event_type, self.schema_version)

    @property
    def schema_id(self) -> str:
        return schema_id(self.event_type, self.schema_version)

    @property
    def schema(self) -> dict[str, Any]:
        """The JSON Schema (a fresh copy: callers may annotate it)."""
        copy: dict[str, Any] = json.loads(_schema_text(self.spec))
        return copy

    @property
    def schema_text(self) -> str:
        """The schema as written to files and served: stable key order, trailing newline."""
        return _schema_text(self.spec)

    def cloudevents_type(self, prefix: str = "") -> str:
        return cloudevents_type(self.event_type, self.schema_version, prefix)


def contracts() -> list[EventContract]:
    """Every registered (type, version), sorted: the registry read now, not at import."""
    return [EventContract(registry.REGISTRY[key]) for key in sorted(registry.REGISTRY)]


def contract_for(event_type: str, schema_version: int) -> EventContract:
    """The contract of one (type, version); ``UnknownEventType`` when none is registered."""
    spec = registry.REGISTRY.get((event_type, schema_version))
    if spec is None:
        raise UnknownEventType(f"no event type {clip(repr(event_type))} version {schema_version}")
    return EventContract(spec)


def json_schema_files() -> dict[str, str]:
    """Relative path -> file text, for every registered (type, version)."""
    return {contract.path: contract.schema_text for contract in contracts()}


def write_json_schemas(directory: Path) -> list[str]:
    """Make ``directory`` hold exactly the current schemas; returns the paths it changed.

    A schema file of a (type, version) no longer registered is removed (only
    files whose ``$id`` is one of ours: the directory may hold other things).
    """
    wanted = json_schema_files()
    changed: list[str] = []
    for relative, text in wanted.items():
        target = directory / relative
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        changed.append(relative)
    for relative, target in _our_schema_files(directory).items():
        if relative not in wanted:
            target.unlink()
            changed.append(relative)
            if not any(target.parent.iterdir()):
                target.parent.rmdir()
    return sorted(changed)


def _our_schema_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for candidate in sorted(directory.glob("*/*.json")):
        try:
            identity = json.loads(candidate.read_text(encoding="utf-8")).get("$id", "")
        except (ValueError, AttributeError):
            continue
        if isinstance(identity, str) and identity.startswith(SCHEMA_ID_PREFIX):
            found[candidate.relative_to(directory).as_posix()] = candidate
    return found


class _Broadcast(GenerateJsonSchema):
    """The serialized form exactly: every field is always written (``broadcast_json``
    dumps defaults and nulls too), so none has a default; titles that merely
    repeat a field's name are left out."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        return field.get("serialization_exclude") is not True

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> dict[str, Any]:
        return self.generate_inner(schema["schema"])


@functools.cache
def _schema_text(spec: EventSpec) -> str:
    return json.dumps(_schema(spec), indent=2, ensure_ascii=False) + "\n"


def _schema(spec: EventSpec) -> dict[str, Any]:
    generated = spec.model.model_json_schema(
        mode="serialization", by_alias=True, schema_generator=_Broadcast
    )
    properties: dict[str, Any] = dict(generated.get("properties", {}))
    if spec.expected_status is not None:  # the uniform status DTO: one status per type
        properties["newStatus"] = {"type": "string", "const": spec.expected_status}
    properties.update(
        eventId=_UUID,
        eventType={"type": "string", "const": spec.event_type},
        schemaVersion={"type": "integer", "const": spec.schema_version},
        occurredOnUtc=_TIME,  # always the time the domain event happened, never null
    )
    schema: dict[str, Any] = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": schema_id(spec.event_type, spec.schema_version),
        "title": f"{spec.event_type} v{spec.schema_version}",
        "description": (
            f"The JSON object relay broadcasts for {spec.event_type} schema version "
            f"{spec.schema_version}: the SSE data of event {spec.sse_event!r} and the "
            "message bus body. Generated from the relay's model; do not edit."
        ),
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,  # the whitelist: nothing else is ever broadcast
    }
    definitions: Mapping[str, Any] | None = generated.get("$defs")
    if definitions:
        schema["$defs"] = dict(definitions)
    return schema
