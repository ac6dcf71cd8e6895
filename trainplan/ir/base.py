"""Shared pydantic configuration for every schema in the IR."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Frozen, unknown keys forbidden, populated by field name or alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
