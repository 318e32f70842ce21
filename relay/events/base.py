"""The base of every contract model: camelCase or PascalCase in, camelCase out."""

from __future__ import annotations

import functools

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
        """Accepted input name -> field alias: camelCase and PascalCase."""
        return _keys(cls)[0]

    @classmethod
    def canonical_keys(cls) -> frozenset[str]:
        """The camelCase names: a payload using only these needs no renaming."""
        return _keys(cls)[1]

    def broadcast_json(self) -> str:
        """The contract fields as compact JSON (ids and money as strings, times with Z)."""
        # The core serialiser itself, as model_dump_json calls it, without the
        # wrapper's keyword handling: this runs for every event.
        return self.__pydantic_serializer__.to_json(self, by_alias=True).decode()


@functools.cache
def _keys(model: type[Contract]) -> tuple[dict[str, str], frozenset[str]]:
    """Per model, once: its input names, and its camelCase aliases."""
    aliases = [info.alias or name for name, info in model.model_fields.items()]
    keys = {alias: alias for alias in aliases}
    keys.update({alias[0].upper() + alias[1:]: alias for alias in aliases})
    return keys, frozenset(aliases)
