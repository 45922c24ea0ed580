"""Every plugin's `example` (shown by `collector plugins`) is a valid config entry."""

from __future__ import annotations

import pytest
import yaml

from collector import registry

MINE = {
    "sources": ["simulated", "replay", "python"],
    "transforms": ["filter", "derive", "window", "deadband", "sql", "python"],
    "sinks": ["lake", "console"],
}


@pytest.mark.parametrize("kind,name", [(k, n) for k, names in MINE.items() for n in names])
def test_example_validates(kind: str, name: str) -> None:
    cls = registry.load(kind, name)  # type: ignore[arg-type]
    (entry,) = yaml.safe_load(cls.example)
    assert entry["type"] == name
    cls.Config.model_validate(entry)
    assert cls.description and "\n" not in cls.description
    for field_name, field in cls.Config.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
