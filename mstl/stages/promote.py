"""Promotion to the MLflow model registry: the most sensitive Target model becomes ``champion``.

Selection uses the **validation** split (highest recall, ties broken by validation ROC AUC):
choosing on the test split would leak it into the model choice, so ``select_on=test`` is allowed
only with a warning. Re-promoting registers a new version and moves the alias; older versions stay.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import mlflow

from mstl import defaults
from mstl.evaluation.champion import description, selection_key, version_metric_tags
from mstl.evaluation.external import version_tags as external_version_tags
from mstl.evaluation.metrics import HEADLINE, RECALL, ROC_AUC
from mstl.stages.evaluate import EvaluateParams, run_evaluate
from mstl.tracking import MODEL_ID_TAG, log_params, start_stage_run, tracking_uri, ui_url

SERVED_MODEL = "classifier"  # the pyfunc that answers images and DICOM (mstl.inference.pyfunc)
MODEL_NAME = "mstl-covid-ct"


@dataclass(frozen=True)
class PromoteParams:
    """Parameters of `-e promote`."""

    search_experiment: str = defaults.EXPERIMENT_NAME
    model_name: str = MODEL_NAME
    alias: str = "champion"
    select_on: str = "val"
    # an external labelled set the candidate is evaluated on before the alias moves (`-e evaluate`'s
    # inputs)
    external_root: str = ""
    external_positive_class: str = ""
    external_csv: str = ""
    min_external_auc: float = (
        0.0  # 0: report only; above 0: refuse to move the alias below this AUC
    )
    experiment: str = defaults.EXPERIMENT_NAME

    def validate(self) -> None:
        if self.select_on not in ("val", "test"):
            raise ValueError(f"select_on must be val or test, got {self.select_on!r}")
        if not 0 <= self.min_external_auc <= 1:
            raise ValueError(f"min_external_auc must be in [0, 1], got {self.min_external_auc}")
        if self.min_external_auc and not (self.external_root or self.external_csv):
            raise ValueError(
                "min_external_auc needs an external set: external_root (with "
                "external_positive_class) or external_csv"
            )
        if self.external_root or self.external_csv:
            self.evaluation("x").validate()

    def evaluation(self, model_uri: str):

        return EvaluateParams(
            model_uri=model_uri,
            images_root=self.external_root,
            positive_class=self.external_positive_class,
            labels_csv=self.external_csv,
            experiment=self.experiment,
        )


class PromotionRefused(RuntimeError):
    """The candidate fell below ``min_external_auc`` on the external set: the alias was not
    moved."""


def candidates(client, experiment_name: str, select_on: str) -> list:
    """Finished Target runs with the selection metrics and a served model, best first
    (``selection_key``: highest recall, ties by ROC AUC, then the earliest)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ValueError(f"no experiment named {experiment_name!r} on {tracking_uri()}")
    runs = client.search_runs(
        [experiment.experiment_id],
        "tags.stage = 'target' and attributes.status = 'FINISHED'",
        max_results=10_000,
    )
    usable = [
        r
        for r in runs
        if f"{select_on}_{RECALL.name}" in r.data.metrics
        and r.data.params.get("log_model", "true") == "true"
    ]
    if not usable:
        raise ValueError(
            f"no finished Target run with {select_on}_{RECALL.name} and a logged model in "
            f"experiment {experiment_name!r}"
        )
    return sorted(
        usable, key=lambda r: (*selection_key(r.data.metrics, select_on), r.info.start_time)
    )


def version_tags(best, select_on: str) -> dict[str, str]:
    """What a registered version records about the run it comes from, and its figures."""
    p, tags = best.data.params, best.data.tags
    return (
        {
            "source_run_id": best.info.run_id,
            "selected_on": select_on,
            "threshold": p.get("threshold", str(defaults.THRESHOLD)),
            "backbone": tags.get("backbone", ""),
            "strategy": tags.get("strategy", ""),
            "split": tags.get("split", ""),
            "parent_run_id": tags.get("mlflow.parentRunId", ""),
        }
        | version_metric_tags(best.data.metrics, select_on)
        | data_hash_tags(p)
    )


# what a reviewer checks the version's data against: the Target run's image and split hashes
DATA_HASHES = ("data_sha256", "split_sha256")


def data_hash_tags(params: dict[str, str]) -> dict[str, str]:
    return {key: params[key] for key in DATA_HASHES if key in params}


def promote(params: PromoteParams):
    """Register the best run's served model and point the alias at the new version."""
    params.validate()
    if params.select_on == "test":
        warnings.warn(
            "select_on=test chooses the model on the test split: the test metrics of the champion "
            "are then optimistically biased (leakage); prefer select_on=val",
            stacklevel=2,
        )
    client = mlflow.MlflowClient(tracking_uri())
    best = candidates(client, params.search_experiment, params.select_on)[0]
    version = register(client, best, params)
    if params.min_external_auc:
        refuse_below_gate(client, params, best, version)
    client.set_registered_model_alias(params.model_name, params.alias, version.version)
    return best, version


def register(client, best, params: PromoteParams):
    """A new version of the best run's served model, tagged and described (and checked on the
    external set when one is given)."""
    # by the logged model's ID when the run has one, so the version links to it (its metrics, its
    # data sets)
    model_id = best.data.tags.get(MODEL_ID_TAG)
    source = f"models:/{model_id}" if model_id else f"runs:/{best.info.run_id}/{SERVED_MODEL}"
    version = mlflow.register_model(source, params.model_name)
    tags = version_tags(best, params.select_on)
    for key, value in tags.items():
        client.set_model_version_tag(params.model_name, version.version, key, value)
    text = description(
        best.data.metrics, best.data.tags, best.info.run_id, params.select_on, tags["threshold"]
    ) + hashes_sentence(tags)
    if params.external_root or params.external_csv:
        text += external_check(client, params, version, best)
    client.update_model_version(params.model_name, version.version, description=text)
    return version


def hashes_sentence(tags: dict[str, str]) -> str:
    found = [f"{key} {tags[key]}" for key in DATA_HASHES if key in tags]
    return f" Data: {', '.join(found)}." if found else ""


def refuse_below_gate(client, params: PromoteParams, best, version) -> None:
    """Raise ``PromotionRefused`` when the version's external ROC AUC is below the gate (or
    undefined)."""
    auc = float(
        client.get_model_version(params.model_name, version.version).tags.get(
            external_tag(params, ROC_AUC.clinical), "nan"
        )
    )
    if not auc >= params.min_external_auc:  # NaN (one-class set) refuses too
        raise PromotionRefused(
            f"version {version.version} of {params.model_name} (run {best.info.run_id}) scored "
            f"external ROC AUC {auc:.3f} on {params.evaluation('').name()}, below "
            f"min_external_auc={params.min_external_auc}: "
            f"@{params.alias} was not moved (the version stays registered, without the alias)"
        )


def external_tag(params: PromoteParams, metric: str) -> str:
    return f"external.{params.evaluation('').name()}.{metric}"


def grid_evaluation(client, params: PromoteParams, best):
    """The latest finished `evaluate` run of the candidate's own Target run on this external set
    (the grid's evaluate cells nest under their Target run), or None: the same set is the same
    data name, folder or CSV, and positive class."""
    wanted = asdict(params.evaluation(""))
    same = ("images_root", "positive_class", "labels_csv")
    found = [
        run
        for run in client.search_runs(
            [best.info.experiment_id],
            f"tags.stage = 'evaluate' and tags.`mlflow.parentRunId` = '{best.info.run_id}' and "
            "attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )
        if run.data.tags.get("data_name") == params.evaluation("").name()
        and all(run.data.params.get(k, "") == str(wanted[k]) for k in same)
    ]
    return found[0] if found else None


def external_check(client, params: PromoteParams, version, best) -> str:
    """The new version's figures on the external set: read from the grid's evaluation of the same
    model on that set when there is one, else evaluated now (a nested evaluate run); either way
    the version is tagged with them. Return the sentence the version's description gains."""
    name = params.evaluation("").name()
    earlier = grid_evaluation(client, params, best)
    if earlier is None:
        run_id = run_evaluate(params.evaluation(f"models:/{params.model_name}/{version.version}"))
        how = "evaluate run"
    else:
        run_id, how = earlier.info.run_id, "the grid's evaluate run"
        digest = earlier.data.tags.get("data_digest", "")
        for key, value in external_version_tags(name, earlier.data.metrics, digest, run_id).items():
            client.set_model_version_tag(params.model_name, version.version, key, value)
    m = client.get_run(run_id).data.metrics

    def figure(key: str) -> str:
        if key not in m:
            return "undefined"
        low, high = m.get(key + "_ci_low", float("nan")), m.get(key + "_ci_high", float("nan"))
        return f"{m[key]:.3f} [{low:.3f}, {high:.3f}]"

    auc, sensitivity, specificity = (figure(metric.clinical) for metric in HEADLINE)
    return (
        f" External set {name} ({how} {run_id}): ROC AUC {auc}, sensitivity "
        f"{sensitivity}, specificity {specificity}."
    )


def run_promote(params: PromoteParams) -> str:
    with start_stage_run(params.experiment, f"promote-{params.model_name}") as run:
        mlflow.set_tag("stage", "promote")
        log_params({k: v for k, v in asdict(params).items() if k != "experiment"})
        params.validate()
        best, version = promote(params)
        log_params({"promoted_run_id": best.info.run_id, "model_version": version.version})
        print(
            f"{params.model_name} version {version.version} (run {best.info.run_id}) is now "
            f"@{params.alias}"
        )
        print(f"in the MLflow UI: {ui_url(f'models/{params.model_name}')}")
        return run.info.run_id
