"""distribute=mirrored on the CPU with two logical devices (in a fresh process: devices are fixed at
start): training, then the predictions the stages make after it."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration  # trains a network

SCRIPT = textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from mstl.models import TARGET_OUTPUT, get_backbone
    from mstl.training.fit import FitConfig, distribution_scope, fit_classifier, set_seed
    from mstl.training.params import ClassifierParams
    set_seed(0)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (40, 32, 32)).astype(np.uint8)
    y = (np.arange(40) % 2).astype("float32")
    params = ClassifierParams(backbone="mobilenet_025", weights="none", image_size=32, epochs=1,
                              batch_size=8, distribute="mirrored", cache_frozen={cache})
    with distribution_scope(params.distribute) as strategy:
        model = params.build(TARGET_OUTPUT)
        result = fit_classifier(model, (grey[:32], y[:32]), (grey[32:], y[32:]),
                                get_backbone("mobilenet_025").preprocess_input, TARGET_OUTPUT,
                                FitConfig(epochs=1, batch_size=8, log_to_mlflow=False,
                                          cache_frozen={cache}))
    # evaluation runs after the scope, as in the stages: one row per image, as an eager call gives
    from mstl.data.pipeline import grey_to_input
    from mstl.inference.predict import predict_grey
    preprocess = get_backbone("mobilenet_025").preprocess_input
    prob = predict_grey(model, grey, preprocess, 16)
    eager = np.concatenate([np.asarray(model(grey_to_input(grey[i : i + 16], preprocess),
                                             training=False)) for i in range(0, 40, 16)])
    assert prob.shape == (40, 1), prob.shape
    np.testing.assert_allclose(prob, eager, atol=1e-6)
    from mstl.evaluation.gradcam import GradCam
    assert GradCam(model).on_slices(grey[:5], preprocess).shape == (5, 32, 32)
    print("REPLICAS", strategy.num_replicas_in_sync, "CACHED", result.cached_frozen,
          "VAL", result.best_val_accuracy)
""")


@pytest.mark.parametrize("cache", [True, False])
def test_mirrored_training_runs_on_two_logical_cpus(cache):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(cache=cache)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(text for text in out.stdout.splitlines() if text.startswith("REPLICAS"))
    assert line.split()[1] == "2" and line.split()[3] == str(cache)


def test_unknown_distribution_is_named():
    from mstl.training.params import ClassifierParams

    with pytest.raises(ValueError, match="'horovod'"):
        ClassifierParams(distribute="horovod").validate_network()
