"""The project's own files agree with each other: one fact, one value."""

import dataclasses
import re
import tomllib

import pytest
import yaml

from mstl.stages.compare import CompareParams
from mstl.stages.doctor import DoctorParams
from mstl.stages.ensemble import EnsembleParams
from mstl.stages.evaluate import EvaluateParams
from mstl.stages.experiment import ExperimentParams
from mstl.stages.explain import ExplainParams
from mstl.stages.prepare import PrepareParams
from mstl.stages.promote import PromoteParams
from mstl.stages.soft_labels import SoftLabelParams
from mstl.stages.target import TargetParams
from mstl.stages.transition import TransitionParams
from tests.conftest import REPO


def pins_from_pyproject() -> list[str]:
    """The base dependencies and the CPU extra: what the conda environment (a CPU one) installs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return (
        project["dependencies"][:1]
        + project["optional-dependencies"]["cpu"]
        + project["dependencies"][1:]
    )


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
    "evaluate": EvaluateParams,
    "doctor": DoctorParams,
    "ensemble": EnsembleParams,
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
    fields = {
        f.name: f.default for f in dataclasses.fields(ENTRY_POINTS[entry]) if f.name != "experiment"
    }
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


def test_one_tensorflow_build_is_required():
    from mstl import tensorflow_build

    assert tensorflow_build() in (
        "tensorflow",
        "tensorflow-cpu",
    )  # this environment has exactly one
    assert tensorflow_build(lambda name: name == "tensorflow") == "tensorflow"
    with pytest.raises(ImportError, match="both tensorflow and tensorflow-cpu"):
        tensorflow_build(lambda name: True)
    with pytest.raises(ImportError, match=r"\.\[cpu\]"):
        tensorflow_build(lambda name: False)


def test_python_311_to_313_and_the_gpu_extra_replaces_the_cpu_build():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11,<3.14"
    extras = project["optional-dependencies"]
    assert [p.split(";")[0] for p in extras["cpu"]] == ["tensorflow-cpu==2.21.0"]
    assert [p.split(";")[0] for p in extras["gpu"]] == ["tensorflow[and-cuda]==2.21.0"]
    assert not any(
        p.startswith("tensorflow-cpu") for p in project["dependencies"]
    )  # so `.[gpu]` never adds a second build
