"""Every default in the option tables of docs/analysis.md and docs/similarity.md is the schema's.

The tables are parsed (`| `key` | `default` | meaning |`) and each default is read as YAML
and compared with the dataclass field default, so a changed default cannot drift from the docs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from layerprobe.analysis import AnalysisConfig
from layerprobe.similarity import SimilarityConfig

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROW = re.compile(r"^\|\s*`([a-z_]+)`\s*\|\s*`([^`]*)`\s*\|")


def documented_defaults(doc: str, heading: str) -> dict:
    text = (DOCS / doc).read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    rows = {}
    for line in text[start : end if end > 0 else None].splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = yaml.safe_load(m.group(2))
    return rows


def field_defaults(schema) -> dict:
    out = {}
    for f in dataclasses.fields(schema):
        out[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return out


@pytest.mark.parametrize("doc, heading, schema", [
    ("analysis.md", "## Options", AnalysisConfig),
    ("similarity.md", "## Configuration", SimilarityConfig),
])
def test_documented_defaults_are_the_schema_defaults(doc, heading, schema):
    documented = documented_defaults(doc, heading)
    defaults = field_defaults(schema)
    assert set(documented) == set(defaults), f"{doc}: documented {sorted(set(documented) ^ set(defaults))} differ from the schema"
    for key, value in documented.items():
        assert value == defaults[key], f"{doc}: {key} is documented as {value!r} but defaults to {defaults[key]!r}"


def test_documented_auto_measure_is_what_views_picks():
    from layerprobe.analysis.views import MEASURE_PREFERENCE

    text = (DOCS / "analysis.md").read_text()
    assert f"auto: {MEASURE_PREFERENCE[0]}, then {MEASURE_PREFERENCE[1]}, {MEASURE_PREFERENCE[2]}" in text
