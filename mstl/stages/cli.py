"""Command-line parsing for entry points, derived from each stage's parameter dataclass,
so a parameter's name, type and default are written once.

An entry point started by the experiment grid (one process per cell) learns two more things from
its environment: the run tags its stage run carries (``MSTL_RUN_TAGS``, a JSON object: the grid's
cell tags and ``mlflow.parentRunId``, the grid run), and a file to write its run ID to
(``MSTL_RUN_ID_FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TypeVar, get_type_hints

import tensorflow as tf

from mstl import unused_gpu_warning
from mstl.tracking import format_param, run_tags

T = TypeVar("T")

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
RUN_TAGS_ENV = "MSTL_RUN_TAGS"
RUN_ID_FILE_ENV = "MSTL_RUN_ID_FILE"


def comma_items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma list such as ``"imagenet, hard,soft"``."""
    return [item.strip() for item in text.split(",") if item.strip()]


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


def argv_for(params) -> list[str]:
    """The ``--name value`` pairs that ``parse_params`` reads back into ``params``, every field."""
    argv = []
    for field in dataclasses.fields(params):
        argv += [f"--{field.name}", format_param(getattr(params, field.name))]
    return argv


def tags_from_environment() -> dict[str, str]:
    """The run tags a launching process (the experiment grid) asks this stage run to carry."""
    text = os.environ.get(RUN_TAGS_ENV, "").strip()
    tags = json.loads(text) if text else {}
    if not isinstance(tags, dict):
        raise ValueError(f"{RUN_TAGS_ENV} must be a JSON object of run tags, got {text!r}")
    return {str(k): str(v) for k, v in tags.items()}


def run_stage(cls: type[T], stage, label: str, argv: list[str] | None = None) -> str:
    """What every entry point does: parse the stage's parameters, run it, print the run ID (and
    write it to ``MSTL_RUN_ID_FILE`` when that is set)."""
    params = parse_params(cls, argv)
    warning = unused_gpu_warning(tf.config.list_physical_devices("GPU"))
    if warning:
        print(warning, file=sys.stderr, flush=True)
    with run_tags(tags_from_environment()):
        run_id = stage(params)
    print(f"{label} run: {run_id}", flush=True)
    if os.environ.get(RUN_ID_FILE_ENV):
        Path(os.environ[RUN_ID_FILE_ENV]).write_text(run_id + "\n")
    return run_id
