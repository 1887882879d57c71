"""One source per setting: the typed model's defaults are the defaults. ``conf/defaults.yaml``
(the file users read) and the README's configuration table must say the same, key for key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from streamscore.conf.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [name for name, f in Settings.model_fields.items() if isinstance(f.default, BaseModel)]
FREE_FORM = {
    "spark.conf",
    "source.kafka.options",
    "sink.kafka.options",
    "databricks.spark_conf",
    "databricks.env",
}  # maps, not sections


def model_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{name}.")
            else:
                out[prefix + name] = value

    for section in SECTIONS:
        walk(type(Settings.model_fields[section].default)(), f"{section}.")
    return out


def yaml_defaults() -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and prefix + k not in FREE_FORM:
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(yaml.safe_load((ROOT / "conf" / "defaults.yaml").read_text()), "")
    return out


def plain(value: Any) -> Any:
    """A default as YAML and JSON write it (paths and secrets as text, 5.0 as 5)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def as_readme(value: Any) -> str:
    value = plain(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def test_defaults_yaml_holds_every_key_with_the_models_default():
    model, in_yaml = model_defaults(), yaml_defaults()
    assert sorted(set(model) - set(in_yaml)) == [], "keys missing from conf/defaults.yaml"
    assert sorted(set(in_yaml) - set(model)) == [], "keys in conf/defaults.yaml the settings do not have"
    differ = {k: (in_yaml[k], plain(model[k])) for k in model if plain(in_yaml[k]) != plain(model[k])}
    assert differ == {}, "conf/defaults.yaml and the typed settings disagree (yaml, model)"


def _expand(cell: str) -> list[str]:
    """``a.b.c` / `d``: keys of one row; a part without dots is a sibling of the first key."""
    keys: list[str] = []
    for part in re.findall(r"`([^`]+)`", cell):
        brace = re.fullmatch(r"(.*)\{([^}]*)\}", part)
        names = [brace.group(1) + n.strip() for n in brace.group(2).split(",")] if brace else [part]
        for name in names:
            if keys and not name.startswith(tuple(f"{s}." for s in SECTIONS)):
                name = keys[0].rsplit(".", 1)[0] + "." + name
            keys.append(name)
    return keys


def readme_rows() -> list[tuple[list[str], list[str | None]]]:
    """(keys, their defaults as written: the backticked text, None for prose) per table row."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| key | default | meaning |") :].split("\n\n", 1)[0]
    rows = []
    for line in table.splitlines()[2:]:
        key_cell, default_cell = (c.strip() for c in line.strip("|").split(" | ")[:2])
        keys = _expand(key_cell)
        parts = [p.strip() for p in default_cell.split(" / ")]
        values = [p[1:-1] if re.fullmatch(r"`[^`]*`", p) else None for p in parts]
        if len(values) == 1:
            values = values * len(keys)
        assert len(values) == len(keys), f"README row {key_cell}: {len(keys)} keys, {len(values)} defaults"
        rows.append((keys, values))
    return rows


def test_the_readme_table_documents_every_key_with_the_models_default():
    model = model_defaults()
    documented: dict[str, str | None] = {}
    for keys, values in readme_rows():
        for key, value in zip(keys, values, strict=True):
            assert key in model, f"README documents {key}, which is not a setting"
            documented[key] = value
    assert sorted(set(model) - set(documented)) == [], "settings missing from the README's configuration table"
    differ = {k: (v, as_readme(model[k])) for k, v in documented.items() if v is not None and v != as_readme(model[k])}
    assert differ == {}, "README defaults that are not the settings' (readme, model)"
