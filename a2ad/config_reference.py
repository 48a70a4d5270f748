"""The configuration reference, generated from the Settings model so it cannot drift.

`python -m a2ad.config_reference` prints it as Markdown; `--write README.md` puts it
between the README's config-reference markers."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .settings import ENV_DELIMITER, ENV_PREFIX, Settings

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = ".venv/bin/python -m a2ad.config_reference --write README.md"

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: a row of the reference."""

    key: str  # TOML dotted form; `[]` marks a table in an array of tables
    type: str
    default: str
    env: str  # the A2AD_* variable, or "" for keys read from the file only
    description: str


@dataclass(frozen=True, slots=True)
class Table:
    """One TOML table ([server]) or array of tables ([[workspaces]]) and its keys."""

    header: str
    description: str
    keys: list[Key]


def _model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The model a field holds, and whether it holds a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _type(field: FieldInfo) -> str:
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(f"`{json.dumps(v)}`" for v in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return f"array of {_SCALARS.get(item, getattr(item, '__name__', str(item)))}s"
    if typing.get_origin(annotation) is dict:
        _, item = typing.get_args(annotation)
        return f"table of {_SCALARS.get(item, getattr(item, '__name__', str(item)))}s"
    text = _SCALARS.get(annotation, str(annotation)) if isinstance(annotation, type) else "?"
    # pydantic keeps Field(ge=..., max_length=..., pattern=...) as metadata objects
    # (annotated_types.Ge and the like), each with an attribute of the same name.
    found = {
        name: value
        for meta in field.metadata
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length", "pattern")
        if (value := getattr(meta, name, None)) is not None
    }
    low = [f"{op} {_number(found[k])}" for k, op in (("ge", "≥"), ("gt", ">")) if k in found]
    high = [f"{op} {_number(found[k])}" for k, op in (("le", "≤"), ("lt", "<")) if k in found]
    if "ge" in found and "le" in found:
        text += f" {_number(found['ge'])}–{_number(found['le'])}"
    elif low or high:
        text += " " + ", ".join(low + high)
    if "min_length" in found or "max_length" in found:
        text += f", {found.get('min_length', 0)}–{found.get('max_length', '…')} characters"
    if "pattern" in found:
        text += f" matching `{found['pattern']}`"
    return text


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | float):
        text = _number(value)
    else:
        text = json.dumps(value)  # TOML writes strings and arrays of strings the same way
    return f"`{text}`"


def tables(model: type[BaseModel] = Settings) -> list[Table]:
    """Every table of the configuration file, in the order the model declares them."""
    out: list[Table] = []

    def walk(
        model: type[BaseModel], path: list[str], in_list: bool, header: str, description: str
    ) -> None:
        table = Table(header, description, [])
        out.append(table)
        for attribute, field in model.model_fields.items():
            name = field.alias or attribute  # what the file and the environment say
            nested = _model(field.annotation)
            if nested is not None:
                sub, is_list = nested
                dotted = ".".join([*path, name])
                sub_header = f"[[{dotted}]]" if is_list else f"[{dotted}]"
                sub_path = [*path, name + ("[]" if is_list else "")]
                walk(sub, sub_path, in_list or is_list, sub_header, field.description or "")
                continue
            env = "" if in_list else ENV_PREFIX + ENV_DELIMITER.join([*path, name]).upper()
            table.keys.append(
                Key(
                    key=".".join([*path, name]),
                    type=_type(field),
                    default=_default(field),
                    env=env,
                    description=field.description or "",
                )
            )

    walk(model, [], False, "", "")
    return [t for t in out if t.keys]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(model: type[BaseModel] = Settings) -> str:
    """The reference as Markdown: one table per TOML table."""
    lines = [
        f"<!-- generated by `python -m a2ad.config_reference`; regenerate with `{REGENERATE}` -->",
    ]
    for table in tables(model):
        intro = f"`{table.header}`" + (f": {table.description}" if table.description else "")
        lines += ["", intro, ""]
        lines.append("| key | type | default | environment | description |")
        lines.append("| --- | --- | --- | --- | --- |")
        for key in table.keys:
            env = f"`{key.env}`" if key.env else "file only"
            cells = [f"`{key.key}`", key.type, key.default, env, key.description]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def undocumented(model: type[BaseModel] = Settings) -> Iterator[str]:
    """Keys whose field has no description."""
    for table in tables(model):
        for key in table.keys:
            if not key.description:
                yield key.key


class MarkersMissing(Exception):
    """The file has no config-reference markers, in order."""


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the markers replaced by `block`."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise MarkersMissing(f"no {START} … {END} block")
    return text[: start + len(START)] + "\n" + block + text[end:]


def read_block(text: str) -> str:
    """What stands between the markers."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise MarkersMissing(f"no {START} … {END} block")
    return text[start + len(START) : end].removeprefix("\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m a2ad.config_reference",
        description="Print the configuration reference (Markdown), generated from Settings.",
    )
    parser.add_argument(
        "--write",
        metavar="FILE",
        help=f"replace the block between {START} and {END} in FILE instead of printing",
    )
    args = parser.parse_args(argv)
    block = render()
    if args.write is None:
        sys.stdout.write(block)
        return 0
    path = Path(args.write)
    try:
        text = path.read_text(encoding="utf-8")
        updated = replace_block(text, block)
    except (OSError, MarkersMissing) as exc:
        print(f"config_reference: {path}: {exc}", file=sys.stderr)
        return 1
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: configuration reference updated")
    else:
        print(f"{path}: configuration reference already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
