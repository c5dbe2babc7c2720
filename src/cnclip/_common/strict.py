"""The base of every recipe and config schema: unknown keys are errors, values are frozen.

A typo in a YAML key (`min_char: 3`) must stop a build or a training run with the key's path, not
be ignored; and settings that fingerprint a stage must not change after they were read.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
