"""The ensemble stage's parameter checks and its averaging of the members' logged predictions."""

import pandas as pd
import pytest

from mstl.stages.ensemble import EnsembleParams, Member, check_compatible, mean_predictions


def member(run_id: str, probs: list[float], config: dict | None = None) -> Member:
    files = [f"f{i}.png" for i in range(len(probs))]
    frame = pd.DataFrame(
        {"file": files, "patient_id": "", "label": [0, 1] * (len(probs) // 2), "probability": probs}
    )

    class Served:  # the part of a CTClassifier the checks read
        models = [None]
        temperatures = [1.0]

    Served.config = config or {"backbone": "mobilenet_025", "image_size": 224, "tta": "none"}
    return Member(run_id, "", Served(), pd.DataFrame(), {"val": frame, "test": frame})


def test_the_ensemble_probability_is_the_members_mean_matched_by_file():
    a = member("a", [0.1, 0.9, 0.2, 0.8])
    b = member("b", [0.3, 0.5, 0.4, 0.6])
    b.predictions["val"] = b.predictions["val"].iloc[::-1]  # another order: matched by file
    mean = mean_predictions([a, b], "val")
    assert mean["probability"].round(6).tolist() == [0.2, 0.7, 0.3, 0.7]
    assert mean["label"].tolist() == [0, 1, 0, 1]


def test_members_must_read_requests_the_same_way():
    a = member("a", [0.1, 0.9])
    b = member("b", [0.3, 0.5], {"backbone": "mobilenet_025", "image_size": 128, "tta": "none"})
    with pytest.raises(ValueError, match="run b has image_size=128 but run a has 224"):
        check_compatible([a, b])
    c = member("c", [0.3, 0.5, 0.4, 0.6])
    with pytest.raises(ValueError, match="run c predicted other val images than run a"):
        check_compatible([a, c])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"run_ids": "abc"}, "at least two"),
        ({"run_ids": "a,a"}, "names a run twice"),
        ({"run_ids": "a,b", "operating_point": "best"}, "unknown operating_point 'best'"),
        ({"run_ids": "a,b", "threshold": 1.0}, "threshold must be in"),
    ],
)
def test_impossible_parameters_are_refused_before_anything_loads(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EnsembleParams(**kwargs).validate()
