"""The project's own files agree with each other: one fact, one value."""

import dataclasses
import re
import tomllib

import yaml

import pytest

from mstl.dicom.prepare import PrepareParams
from mstl.evaluation.report import CompareParams
from mstl.experiment import ExperimentParams
from mstl.explain import ExplainParams
from mstl.soft_labels.stage import SoftLabelParams
from mstl.tracking.registry import PromoteParams
from mstl.training.target import TargetParams
from mstl.training.transition import TransitionParams
from tests.conftest import REPO


def pins_from_pyproject() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["dependencies"]


def pins_from_conda() -> list[str]:
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return [p for p in pip if not p.startswith("-e")]


def test_conda_and_pyproject_pin_the_same_versions():
    assert pins_from_conda() == pins_from_pyproject()
    for pin in pins_from_pyproject():
        assert re.search(r"==\d", pin), f"not pinned exactly: {pin}"


def test_conda_env_is_python_311():
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in env["dependencies"]


ENTRY_POINTS = {
    "prepare_transition": PrepareParams,
    "soft_labels": SoftLabelParams,
    "transition": TransitionParams,
    "target": TargetParams,
    "promote": PromoteParams,
    "compare": CompareParams,
    "experiment": ExperimentParams,
    "explain": ExplainParams,
}


def test_every_entry_point_has_a_module():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    assert set(project["entry_points"]) == set(ENTRY_POINTS)
    for name in ENTRY_POINTS:
        assert f"python -m entrypoints.{name}" in project["entry_points"][name]["command"]
        assert (REPO / "entrypoints" / f"{name}.py").is_file()


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mlproject_parameters_match_the_stage_defaults(entry):
    project = yaml.safe_load((REPO / "MLproject").read_text())
    declared = project["entry_points"][entry]["parameters"]
    fields = {f.name: f.default for f in dataclasses.fields(ENTRY_POINTS[entry]) if f.name != "experiment"}
    assert set(declared) == set(fields)
    for name, default in fields.items():
        mlproject_default = declared[name]["default"]
        if isinstance(default, bool):
            assert str(mlproject_default).lower() == str(default).lower(), name
        else:
            assert type(default)(mlproject_default) == default, name
        assert "{" + name + "}" in project["entry_points"][entry]["command"], name


def test_run_outputs_are_ignored():
    ignored = (REPO / ".gitignore").read_text().split()
    for entry in (".venv/", "mlruns/", "mlartifacts/", "mlflow.db", ".cache/"):
        assert entry in ignored
