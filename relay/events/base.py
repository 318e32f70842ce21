"""The base of every contract model: camelCase or PascalCase in, camelCase out."""

from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any, Literal, get_args, get_origin

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

    @classmethod
    def takes_numbers(cls) -> bool:
        """Whether any field accepts a JSON number (money, counts): such a
        payload must be decoded with exact decimals."""
        return any(_numeric(info.annotation) for info in cls.model_fields.values())

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


def _numeric(annotation: Any) -> bool:
    """Whether a field of this type can take a number, however it is wrapped
    (``Annotated``, ``Optional``, ``Literal[1]``, a nested model)."""
    if get_origin(annotation) is Literal:
        return any(isinstance(value, int | float | Decimal) for value in get_args(annotation))
    if isinstance(annotation, type):
        if issubclass(annotation, int | float | Decimal):
            return True
        if issubclass(annotation, Contract):
            return annotation.takes_numbers()
    return any(_numeric(arg) for arg in get_args(annotation))
