"""README's configuration tables, generated from the schema (one source for every default).

    python -m convergent.config.docs            # print the tables
    python -m convergent.config.docs --write    # rewrite them in README.md, between the markers

Each row is a key, its default and the comment written next to the field in the schema's source;
a nested dataclass (``analysis.null``) is flattened into dotted keys. A test fails when README's
tables differ from these.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from convergent.config.schema import GROUP_SCHEMAS, TrainConfig

BEGIN, END = "<!-- config-tables:begin (generated: python -m convergent.config.docs --write) -->", "<!-- config-tables:end -->"
# The sections of README, in order: (title, dataclass, key prefix)
SECTIONS: list[tuple[str, type, str]] = [
    ("Top level (`conf/train.yaml`)", TrainConfig, ""),
    *[(f"`{group}`", next(iter(nodes.values())), f"{group}.") for group, nodes in GROUP_SCHEMAS.items() if group != "data"],
    *[(f"`data` (`{name.removesuffix('_schema')}`)", node, "data.") for name, node in GROUP_SCHEMAS["data"].items()],
]


@cache
def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field of a dataclass's source (`name: type = default  # comment`)."""
    out: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    pending_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in pending_line:
            pending_line[tok.start[0]] = tok.string
        elif tok.type == tokenize.COMMENT and tok.start[0] in pending_line:
            out.setdefault(pending_line[tok.start[0]], tok.string.lstrip("# ").strip())
    return out


def render(value: Any) -> str:
    if value is None:
        return "null"
    if value is MISSING or value == MISSING:
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) of every leaf field of `cls`; nested dataclasses flattened."""
    comments: dict[str, str] = {}
    for base in reversed(cls.__mro__):  # inherited fields keep the comment of the class that declares them
        if dataclasses.is_dataclass(base):
            comments.update({k: v for k, v in field_comments(base).items() if v})
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "_target_":
            continue
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = f.default
        if dataclasses.is_dataclass(value):
            if cls is TrainConfig:
                continue  # the groups have their own sections
            out += rows(type(value), f"{prefix}{f.name}.")
            continue
        if cls is TrainConfig and f.name in GROUP_SCHEMAS:
            continue
        out.append((f"{prefix}{f.name}", render(value), comments.get(f.name, "")))
    return out


def tables() -> str:
    parts = [BEGIN]
    for title, cls, prefix in SECTIONS:
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        parts += ["", f"#### {title}", "", doc, "", "| key | default | meaning |", "|---|---|---|"]
        parts += [f"| `{prefix}{key}` | `{default}` | {meaning.replace('|', '/')} |" for key, default, meaning in rows(cls)]
    parts += ["", END]
    return "\n".join(parts)


def readme_tables(readme: str) -> str | None:
    """The generated block currently in README (None if the markers are missing)."""
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), readme, flags=re.S)
    return match.group(0) if match else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convergent.config.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", nargs="?", const="README.md", default=None, help="rewrite the tables in this README")
    args = parser.parse_args(argv)
    text = tables()
    if args.write is None:
        print(text)
        return
    path = Path(args.write)
    readme = path.read_text()
    current = readme_tables(readme)
    if current is None:
        raise SystemExit(f"error: {path} has no {BEGIN!r} ... {END!r} block; add the two markers where the tables go")
    path.write_text(readme.replace(current, text))


if __name__ == "__main__":
    main()
