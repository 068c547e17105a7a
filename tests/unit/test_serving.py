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


def tiny_model(seed: int):
    """A real Keras classifier on 16-pixel inputs with a sigmoid output."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    return keras.Model(inputs, outputs)


def served_classifier(tmp_path, models, config):
    """A CTClassifier loaded from artifacts written as log_serving_model writes them."""
    import json

    from mstl.inference.pyfunc import CTClassifier, member_artifact

    artifacts = {}
    for i, model in enumerate(models):
        path = tmp_path / f"m{i}.keras"
        model.save(path)
        artifacts[member_artifact(i)] = str(path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    artifacts["config"] = str(tmp_path / "config.json")
    classifier = CTClassifier()
    classifier.load_context(type("Context", (), {"artifacts": artifacts}))
    return classifier


def test_the_served_probability_applies_the_stored_tta_and_temperature(tmp_path):
    import numpy as np

    from mstl.data.preprocessing import Preprocessing
    from mstl.inference.predict import apply_temperature, predict_grey
    from mstl.inference.pyfunc import serving_config
    from mstl.models import get_backbone

    model = tiny_model(0)
    config = serving_config("mobilenet_025", Preprocessing(16), 0.5, "flip", 2.0)
    classifier = served_classifier(tmp_path, [model], config)
    grey = (np.random.default_rng(1).random((5, 16, 16)) * 255).astype(np.uint8)
    preprocess = get_backbone("mobilenet_025").preprocess_input
    flipped = np.ascontiguousarray(grey[:, :, ::-1])
    mean = predict_grey(model, grey, preprocess, 8) + predict_grey(model, flipped, preprocess, 8)
    expected = apply_temperature(mean[:, 0] / 2, 2.0)
    np.testing.assert_allclose(classifier.predict_grey(grey), expected, rtol=1e-5)


def test_an_ensemble_serves_the_mean_of_its_members_each_with_its_temperature(tmp_path):
    import numpy as np

    from mstl.data.preprocessing import Preprocessing
    from mstl.inference.predict import apply_temperature, predict_grey
    from mstl.inference.pyfunc import serving_config
    from mstl.models import get_backbone

    members = [tiny_model(0), tiny_model(1)]
    config = serving_config("mobilenet_025", Preprocessing(16), 0.4)
    config["members"] = [{"run_id": "a", "temperature": 1.0}, {"run_id": "b", "temperature": 3.0}]
    classifier = served_classifier(tmp_path, members, config)
    grey = (np.random.default_rng(2).random((4, 16, 16)) * 255).astype(np.uint8)
    preprocess = get_backbone("mobilenet_025").preprocess_input
    each = [predict_grey(m, grey, preprocess, 8)[:, 0] for m in members]
    expected = (each[0] + apply_temperature(each[1], 3.0)) / 2
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(classifier.predict_grey(grey), expected, rtol=1e-5)
    assert classifier.model is classifier.models[0]  # what Grad-CAM and the probes read
