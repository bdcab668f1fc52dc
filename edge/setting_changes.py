"""Where a running edge's settings come from (`Source`, read again by a reload) and what
changed between two readings: the sections a reload applies live, and the rest, which only a
restart can. Pure, no I/O but reading the configuration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from pydantic import BaseModel

from edge.settings import Overrides, Settings, load_settings

# What a reload may change; any other difference refuses the reload.
LIVE = frozenset({"plans", "pricing", "metering", "upstream", "upstreams", "routing"})


def fixed_changes(old: Settings, new: Settings) -> list[str]:
    """The settings outside `LIVE` that differ between `old` and `new` (dotted names): what a
    reload cannot apply without a restart."""
    changed = []
    for section in Settings.model_fields:
        if section in LIVE:
            continue
        before, after = getattr(old, section), getattr(new, section)
        if before == after:
            continue
        if isinstance(before, BaseModel):
            changed += [
                f"{section}.{name}"
                for name in type(before).model_fields
                if getattr(before, name) != getattr(after, name)
            ]
        else:
            changed.append(section)
    return changed


def live_changes(old: Settings, new: Settings) -> list[str]:
    """The `LIVE` sections that differ between `old` and `new`."""
    return [s for s in Settings.model_fields if s in LIVE and getattr(old, s) != getattr(new, s)]


class Source(NamedTuple):
    """Where a running edge's settings come from, so a reload can read them again (picklable:
    workers get it)."""

    path: str | None = None
    overrides: Overrides | None = None

    def load(self, environ: Mapping[str, str] | None = None) -> Settings:
        return load_settings(self.path, environ, self.overrides)
