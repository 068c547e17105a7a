"""The MLflow UI path to "does MSTL beat ImageNet?", in a real browser: a tiny grid on a real
`mlflow server`, then `compare` and `promote`, then the pages a user opens, in headless Chromium.

With ``MSTL_UI_SHOTS=docs/img/ui`` (``make ui-docs``) the screenshots regenerate ``docs/ui.md``'s
pictures; otherwise they go to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from mstl.tracking import COMPARISON_VIEW, SHARED_VIEW_PREFIX, UI_TAGS, ui_url
from tests.conftest import DATA_ROOT, run_entry_point

pytestmark = pytest.mark.integration
EXPERIMENT = "mstl-ui"
REPORTS = "mstl-ui-reports"  # compare logs apart, so the path that creates an experiment is seen
MODEL = "mstl-ui-covid-ct"
# test_experiment.py's tiny grid, with 2 soft-label folds (not 10): the search is the slowest cell
EXTERNAL = str(DATA_ROOT / "covid-ct-md")
TINY = {"profile": "cpu", "epochs": 1, "image_size": 64, "soft_k_values": "2,4", "soft_folds": 2}
GRID_TIMEOUT_S = 2400  # 7 cells; about 20 min on a 2-core machine shared with other jobs
WINDOW = (1400, 900)
WAIT_S = 90  # a page's data, on a machine busy with other tests


def find_browser() -> tuple[str, str]:
    """Debian's chromium and chromedriver (.ci/run installs them); under CI missing ones fail."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    if os.environ.get("CI"):
        pytest.fail("chromium and chromedriver not found: .ci/run installs Debian's packages")
    pytest.skip("no chromium/chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(mlflow_server):
    """Headless Chromium at a fixed window size, a fresh profile (MLflow's default: GenAI pages),
    with MLflow's assistant panel closed, as a user closes it, so it hides no part of a page."""
    chromium, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.get(mlflow_server)
    chrome.execute_script(
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    )
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MSTL_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def ui_line(stdout: str) -> str:
    """The link a stage prints for the UI."""
    return next(line for line in stdout.splitlines() if "MLflow UI: " in line).split(": ")[-1]


@pytest.fixture(scope="module")
def grid(mlflow_server, data_root, keras_home, tmp_path_factory) -> dict:
    """One tiny grid (imagenet, hard, soft; seed 0), its compare report and its champion."""
    tmp = tmp_path_factory.mktemp("ui-grid")
    external = {  # every Target cell evaluated on the external development set, per patient
        "external_sets": EXTERNAL,
        "external_patient_pattern": "ctmd_[a-z]+_([^_]+)_s",
    }
    common = {
        "export_dir": tmp / "exports",
        "cache_dir": tmp / "cache",
        "data_root": data_root,
        **external,
    }
    done = run_entry_point(
        "experiment", {**TINY, **common}, mlflow_server, EXPERIMENT, timeout=GRID_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compare = run_entry_point(
        "compare",
        {"search_experiment": EXPERIMENT, "out_dir": tmp / "report"},
        mlflow_server,
        REPORTS,
    )
    assert compare.returncode == 0, compare.stderr[-3000:]
    promote = run_entry_point(
        "promote",
        {
            "search_experiment": EXPERIMENT,
            "model_name": MODEL,
            "external_root": EXTERNAL,
            "external_positive_class": "COVID",
        },
        mlflow_server,
        EXPERIMENT,
    )
    assert promote.returncode == 0, promote.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    reports = client.get_experiment_by_name(REPORTS)
    (compare_run,) = client.search_runs([reports.experiment_id], "tags.stage = 'compare'")
    return {
        "uri": mlflow_server,
        "client": client,
        "experiment": client.get_experiment_by_name(EXPERIMENT),
        "compare_run": compare_run,
        "report": tmp / "report",
        "view_url": ui_line(compare.stdout),
        "model_url": ui_line(promote.stdout),
    }


def page(chrome, url: str, *texts: str) -> str:
    """Open ``url`` and wait until every one of ``texts`` shows; return the page's text."""
    chrome.get(url)
    return wait_for(chrome, *texts)


def wait_for(chrome, *texts: str) -> str:
    def shown(c):
        body = c.find_element(By.TAG_NAME, "body").text
        return body if all(t in body for t in texts) else False

    try:
        return WebDriverWait(chrome, WAIT_S).until(shown)
    except TimeoutException:
        body = chrome.find_element(By.TAG_NAME, "body").text
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{chrome.current_url} never showed {missing}; it shows:\n{body[:2000]}")


def shot(chrome, folder: Path, name: str) -> Path:
    """A screenshot at the fixed window size, in 256 colours (a docs picture stays small)."""
    path = folder / f"{name}.png"
    chrome.save_screenshot(str(path))
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    return path


def test_every_path_tags_its_experiment_for_the_model_training_pages(grid):
    """The grid's `mlflow run --experiment-name` and compare's new experiment carry the tags."""
    for name in (EXPERIMENT, REPORTS):
        tags = grid["client"].get_experiment_by_name(name).tags
        assert {k: tags.get(k) for k in UI_TAGS} == UI_TAGS, name
    view = grid["experiment"].tags[SHARED_VIEW_PREFIX + COMPARISON_VIEW]
    assert "tags.stage = 'target'" in view and "strategy" in view


def test_the_experiment_link_opens_on_its_runs(browser, grid, shots):
    url = ui_url(f"experiments/{grid['experiment'].experiment_id}", grid["uri"])
    page(browser, url, "Runs", "experiment-cpu", "Group by")
    # a fresh browser: without the link's workflowType MLflow 3.17 opens the GenAI overview
    assert "/runs" in browser.current_url and "/overview" not in browser.current_url
    shot(browser, shots, "01-experiment-runs")


def test_the_comparison_view_groups_the_target_runs_by_strategy(browser, grid, shots):
    text = page(browser, grid["view_url"], "Group: imagenet", "Group: hard", "Group: soft")
    for strategy in ("imagenet", "hard", "soft"):
        assert f"target-mobilenet_025-{strategy}-official-s0" in text
    assert "experiment-cpu" not in text and "Sort: test_roc_auc" in text  # parents filtered out
    shot(browser, shots, "02-comparison-table")
    page(browser, grid["view_url"] + "&compareRunsMode=CHART", "test_roc_auc_ci_low", "Group: soft")
    shot(browser, shots, "03-comparison-charts")


def test_compares_table_iii_and_figures_render_on_its_run_page(browser, grid, shots):
    run = grid["compare_run"]
    base = f"experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/report"
    text = page(browser, ui_url(f"{base}/table_iii.json", grid["uri"]), "View as table", "roc_auc")
    assert all(s in text for s in ("imagenet", "hard", "soft", "recall_ci"))
    shot(browser, shots, "04-compare-table-iii")
    figure = "fig6_roc_per_strategy.png"  # a click in the artifact tree, as a user opens it
    browser.find_element(By.XPATH, f"//*[normalize-space(text())='{figure}']").click()
    wait_for(browser, f"report/{figure}")
    WebDriverWait(browser, WAIT_S).until(
        lambda c: any(
            c.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            for img in c.find_elements(By.CSS_SELECTOR, "img")
        )
    )
    shot(browser, shots, "05-compare-roc-per-strategy")


def test_the_registered_model_shows_its_champion(browser, grid, shots):
    text = page(browser, grid["model_url"], MODEL, "champion")
    assert "Version 1" in text
    shot(browser, shots, "06-registry-champion")
    version = grid["client"].get_model_version_by_alias(MODEL, "champion")
    text = page(
        browser,
        ui_url(f"models/{MODEL}/versions/{version.version}", grid["uri"]),
        "Chosen for the highest val recall",
        "data_sha256",
    )
    assert version.tags["source_run_id"] in text and "strategy" in text
    shot(browser, shots, "07-champion-version")


def test_each_target_is_evaluated_on_the_external_set_and_compare_pairs_them(grid):
    """The grid's evaluate cells nest under their Target runs; compare's external table and its
    paired MSTL minus ImageNet differences on covid-ct-md come from them; promote reads the
    champion's figures from its grid evaluation instead of evaluating again."""
    client, experiment = grid["client"], grid["experiment"]
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    targets = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "target"}
    evaluations = [r for r in runs if r.data.tags.get("stage") == "evaluate"]
    assert len(evaluations) == len(targets) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in evaluations} == set(targets)
    assert {r.data.tags["data_name"] for r in evaluations} == {"covid-ct-md"}
    assert all(r.data.metrics["n_patients"] == 6 for r in evaluations)
    external = pd.read_csv(grid["report"] / "external.csv")
    assert set(external["data"]) == {"covid-ct-md"} and len(external) == 3
    paired = pd.read_csv(grid["report"] / "paired_tests.csv")
    assert {"hard", "soft"} <= set(paired.loc[paired["data"] == "covid-ct-md", "strategy"])
    assert set(external["patients"]) == {6} and external["val_threshold"].between(0, 1).all()
    patients = pd.read_csv(grid["report"] / "external_patients.csv")  # 6 patients x 3 Targets
    assert len(patients) == 18 and set(patients["patient_id"]) >= {"P001", "P002"}
    report = (grid["report"] / "report.md").read_text()
    assert "over seeds (the external set covid-ct-md)" in report
    assert "## External sets per patient" in report
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert "the grid's evaluate run" in champion.description
    assert champion.tags["external.covid-ct-md.run_id"] in {r.info.run_id for r in evaluations}
