"""The base of every contract model: camelCase or PascalCase in, camelCase out."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

__all__ = ["Contract"]


class Contract(BaseModel):
    """A whitelist: only declared fields are read, only they are broadcast."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=False, extra="ignore", frozen=True
    )

    @classmethod
    def input_keys(cls) -> dict[str, str]:
        keys: dict[str, str] | None = cls.__dict__.get("_input_keys")
        if keys is None:
            keys = {}
            for name, info in cls.model_fields.items():
                alias = info.alias or name
                keys[alias] = alias
                keys[alias[0].upper() + alias[1:]] = alias
            cls._input_keys = keys  # type: ignore[attr-defined]
        return keys

    @classmethod
    def canonical_keys(cls) -> frozenset[str]:
        """The camelCase names: a payload using only these needs no renaming."""
        keys: frozenset[str] | None = cls.__dict__.get("_canonical_keys")
        if keys is None:
            keys = frozenset(info.alias or name for name, info in cls.model_fields.items())
            cls._canonical_keys = keys  # type: ignore[attr-defined]
        return keys

    def broadcast_json(self) -> str:
        """The contract fields as compact JSON (ids and money as strings, times with Z)."""
        return self.model_dump_json(by_alias=True)
