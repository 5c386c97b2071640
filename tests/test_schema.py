"""One source for every default: the schema. The YAML option files only choose and override (no
key restates a schema default, every key exists in the schema), and README's configuration tables
are the ones generated from the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from convergent.config import docs
from convergent.config.schema import GROUP_SCHEMAS

ROOT = Path(__file__).resolve().parent.parent


def schema_defaults(cls) -> dict:
    return {key: default for key, default, _ in docs.rows(cls)}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


OPTION_FILES = [p for group in GROUP_SCHEMAS for p in sorted((ROOT / "conf" / group).glob("*.yaml"))]


@pytest.mark.parametrize("path", OPTION_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in OPTION_FILES])
def test_option_files_only_extend_the_schema_and_override_its_values(path):
    text = yaml.safe_load(path.read_text()) or {}
    defaults = text.pop("defaults", [])
    group = path.parent.name
    schemas = {name: node for name, node in GROUP_SCHEMAS[group].items()}
    extends = [d for d in defaults if isinstance(d, str) and d != "_self_"]
    assert extends, f"{path.name} extends nothing; start it with `defaults: [<schema or option>, _self_]`"
    base = extends[0]
    if base in schemas:
        known = schema_defaults(schemas[base])
    else:  # an option extending another option of the group (trainer/cpu extends trainer/default)
        parent = yaml.safe_load((path.parent / f"{base}.yaml").read_text())
        parent_base = [d for d in parent["defaults"] if d != "_self_"][0]
        known = schema_defaults(schemas[parent_base])
        known.update({k: docs.render(v) for k, v in flat({k: v for k, v in parent.items() if k != "defaults"}).items()})
    for key, value in flat(text).items():
        if value is None and key in ("wandb",):
            continue  # logger: switching W&B off replaces a whole sub-config
        assert key in known, f"{path.name}: {key} is not a key of the schema"
        assert docs.render(value) != known[key], f"{path.name}: {key}={value} restates the default; delete the line"


def test_readme_config_tables_are_generated_from_the_schema():
    readme = (ROOT / "README.md").read_text()
    current = docs.readme_tables(readme)
    assert current is not None, "README.md has no generated configuration tables"
    assert current == docs.tables(), "README's config tables are stale: run `python -m convergent.config.docs --write`"


def test_every_schema_field_has_a_documented_meaning():
    for _title, cls, prefix in docs.SECTIONS:
        for key, _default, meaning in docs.rows(cls):
            assert meaning, f"{prefix}{key} has no comment in the schema (it is README's meaning column)"


def test_config_keys_are_the_names_the_code_uses():
    """The four keys that had two names each have one now (the code reads the config object itself)."""
    from convergent.analysis.config import AnalysisConfig

    names = {f.name for f in dataclasses.fields(AnalysisConfig)}
    assert {"heavy_pairs", "null"} <= names and "permutation_null" not in names and "null_pairs" not in names
    assert {f.name for f in dataclasses.fields(type(AnalysisConfig().null))} >= {"enabled", "pairs", "draws"}
    assert [f.name for f in dataclasses.fields(type(AnalysisConfig().hierarchical))] == ["method"]
