"""The base of every settings model (recipes, and plugins' ``Params``): a number is a number.

pydantic's lax mode reads ``true`` as 1 for an ``int`` field and 1.0 for a ``float`` one, so
``batch_size: true`` or ``beta: yes`` would pass as a setting nobody meant. A field whose type
holds numbers but not ``bool`` refuses a boolean here, at that field's own location.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationInfo, field_validator


def annotation_members(annotation: Any) -> list[Any]:
    """The types an annotation allows: inside ``Annotated[...]``, ``X | Y`` and ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return annotation_members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [member for arg in typing.get_args(annotation) for member in annotation_members(arg)]
    return [annotation]


def _leaves(annotation: Any) -> set[Any]:
    """The plain types an annotation allows, a ``Literal`` counted as the types of its values."""
    leaves: set[Any] = set()
    for member in annotation_members(annotation):
        if typing.get_origin(member) is typing.Literal:
            leaves.update(type(value) for value in typing.get_args(member))
        else:
            leaves.add(member)
    return leaves


def numbers_only(annotation: Any) -> bool:
    """Whether a field annotated so takes numbers (int or float) and not booleans."""
    leaves = _leaves(annotation)
    return bool(leaves & {int, float}) and bool not in leaves and Any not in leaves


class NumbersAreNumbers(BaseModel):
    """Refuse ``true``/``false`` for a field that takes numbers and not booleans."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and numbers_only(field.annotation):
                raise ValueError(f"{str(value).lower()} is not a number; give a number")
        return value
