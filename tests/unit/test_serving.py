"""The served model's environment, without logging a model."""

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from mstl.inference.pyfunc import serving_requirements

PYPROJECT = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())


def test_serving_requirements_are_the_installed_runtime_dependencies_pinned():
    pins = {Requirement(text).name: Requirement(text) for text in serving_requirements()}
    declared = {Requirement(text).name for text in PYPROJECT["project"]["dependencies"]}
    builds = {
        Requirement(text).name
        for extra in ("cpu", "gpu")
        for text in PYPROJECT["project"]["optional-dependencies"][extra]
    }
    assert {"keras", "pydicom", "pillow", "mlflow"} <= set(pins)  # what serving a DICOM slice needs
    assert (
        "mstl" not in pins and "pytest" not in pins and "ruff" not in pins
    )  # mstl travels as code; no test tools
    assert set(pins) <= declared | builds
    assert (
        len(set(pins) & {"tensorflow", "tensorflow-cpu"}) == 1
    )  # exactly the TensorFlow build installed here
    for name, requirement in pins.items():  # every pin is exactly what runs here
        assert str(requirement.specifier) == f"=={metadata.version(name)}"


def test_defining_the_served_model_raises_no_mlflow_warning():
    """MLflow checks ``predict``'s type hints when the class is defined (on every import of
    mstl.inference.pyfunc: each Target run, each `mlflow models serve`); without one it warns to add
    one."""
    import importlib
    import warnings

    import mstl.inference.pyfunc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(mstl.inference.pyfunc)
    assert [str(w.message) for w in caught] == []
