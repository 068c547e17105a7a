"""Command-line parsing for entry points, derived from each stage's parameter dataclass,
so a parameter's name, type and default are written once."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TypeVar, get_type_hints

T = TypeVar("T")

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_int(text: str) -> int:
    """An integer, accepting MLflow's float spelling (``64.0``) of whole numbers."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def parser_for(cls: type[T], description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        convert = {bool: parse_bool, int: parse_int, float: float}.get(kind, str)
        parser.add_argument(
            f"--{field.name}", type=convert, default=field.default, help=f"default: {field.default}"
        )
    return parser


def parse_params(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse ``--name value`` pairs into an instance of the parameter dataclass ``cls``."""
    return cls(**vars(parser_for(cls).parse_args(argv)))


def run_stage(cls: type[T], stage, label: str, argv: list[str] | None = None) -> str:
    """What every entry point does: parse the stage's parameters, run it, print the run ID."""
    run_id = stage(parse_params(cls, argv))
    print(f"{label} run: {run_id}")
    return run_id
