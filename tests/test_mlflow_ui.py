"""The MLflow UI as a new user meets it: `layerprobe ui` on a store built by the project's own flows, opened in a
fresh headless Chromium (an empty profile: nothing set in its local storage).

The flows (prepare → extract → train → evaluate → report) run in process on the tiny suite, as in test_flows.py; or,
with LAYERPROBE_UI_PROJECT=<folder>, the test uses that project as it is (the default suite's, for docs/mlflow.md's
screenshots). `layerprobe ui` serves the store and prints a URL; the browser opens it and must find the runs table
(in the "Model training" sidebar) with the last parent run's `alf` and `linear_last_cls` children and each one's
`test/balanced_accuracy`; the compare view of the two; the alf heatmap artifact rendered as an image; the registered
model's versions table naming each version's probe and score, `@champion` on the right one; and a probe run's page
naming its input dataset (the feature cache, by content hash).

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver) and selenium;
skipped when one is missing. Selenium Manager never runs: the driver and the browser are given by path.
With LAYERPROBE_SCREENSHOTS=<dir> the test also saves mlflow-runs.png, mlflow-registry.png and mlflow-run.png there
(docs/ holds them, taken on the default suite's store).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
if importlib.util.find_spec("selenium") is None:
    _missing.append("selenium (pip install -e '.[dev]')")
if _missing:
    pytest.skip(
        f"{', '.join(_missing)} not installed: .ci/run installs them (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from mlflow.tracking import MlflowClient  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from layerprobe import mlflow_ui, model_registry, tracking  # noqa: E402
from layerprobe.params import load_params  # noqa: E402

pytestmark = pytest.mark.slow

ALIAS = "champion"
METRIC = "test/balanced_accuracy"
HEATMAP = "evaluation/heatmap.png"
TIMEOUT = 60  # seconds for any one thing to show up: the machine may be slow
WIDTH, HEIGHT = 1400, 900
# resolved at import, before project_dir moves the working directory into a temporary project
SCREENSHOTS = Path(os.environ["LAYERPROBE_SCREENSHOTS"]).resolve() if os.environ.get("LAYERPROBE_SCREENSHOTS") else None
PROJECT = Path(os.environ["LAYERPROBE_UI_PROJECT"]).resolve() if os.environ.get("LAYERPROBE_UI_PROJECT") else None
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    f"--window-size={WIDTH},{HEIGHT}",
]


@pytest.fixture
def tracking_store(request, monkeypatch) -> Path:
    """A project whose mlruns/ the flows filled: the tiny suite built here, or LAYERPROBE_UI_PROJECT as it is."""
    if PROJECT is not None:
        monkeypatch.chdir(PROJECT)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        return PROJECT
    project_dir = request.getfixturevalue("project_dir")
    request.getfixturevalue("prefect_harness")
    from flows.evaluate import evaluate_flow
    from flows.extract import extract_flow
    from flows.prepare import prepare_flow
    from flows.report import report_flow
    from flows.train import train_flow

    prepare_flow("params.yaml")
    extract_flow("params.yaml")
    train_flow("params.yaml")
    evaluate_flow("params.yaml")
    report_flow("params.yaml")
    return project_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ui_url(tracking_store, tmp_path_factory):
    """`layerprobe ui --no-browser` in the project: yields the URL it prints; SIGTERM ends it and its server."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path_factory.mktemp("layerprobe-ui") / "ui.log"
    command = [sys.executable, "-m", "layerprobe.cli", "ui", "--no-browser", "--port", str(_free_port())]
    with open(log_path, "wb") as log:
        ui = subprocess.Popen(
            command, cwd=tracking_store, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True
        )
    try:
        url = ui.stdout.readline().decode().strip()  # printed once the server answers
        if not url.startswith("http"):
            pytest.fail(f"`layerprobe ui` printed {url!r}, exit code {ui.poll()}:\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        ui.send_signal(signal.SIGTERM)  # `layerprobe ui` stops its `mlflow server` on the way out
        try:
            ui.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=30)


@pytest.fixture
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=subprocess.DEVNULL), options=options)
    try:
        # the viewport itself 1400x900 (--window-size counts the window's frame too): the screenshots' size
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_script_timeout(TIMEOUT)
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, what: str):
    """Poll `condition(driver)` until truthy; fail naming `what` and the page's visible text otherwise."""
    wait = WebDriverWait(driver, TIMEOUT, poll_frequency=0.25, ignored_exceptions=[StaleElementReferenceException])
    try:
        return wait.until(lambda d: condition(d))
    except TimeoutException:
        text = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{what}: not shown within {TIMEOUT} s at {driver.current_url}\npage text:\n{text[:3000]}")


def _links(driver, href_suffix: str) -> list:
    """Links whose target ends with `href_suffix` (the UI's links are `#/experiments/1/runs/<id>` and the like)."""
    return driver.find_elements(By.CSS_SELECTOR, f'a[href$="{href_suffix}"]')


def _screenshot(driver, name: str) -> None:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(SCREENSHOTS / name))


# Fetches every loaded <img> of the page back as bytes (blob:, data: or http URLs alike).
_LOADED_IMAGES_JS = """
const done = arguments[arguments.length - 1];
const loaded = [...document.images].filter((img) => img.complete && img.naturalWidth > 0);
Promise.all(loaded.map(async (img) => {
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return {src: img.src.slice(0, 80), width: img.naturalWidth, height: img.naturalHeight, base64: btoa(binary)};
})).then(done, (error) => done([{error: String(error)}]));
"""

# How the UI prints a metric (MLflow's Utils.formatMetric), so the expected text is computed the browser's way.
_FORMAT_METRIC_JS = """
const x = arguments[0];
if (x === 0) return "0";
if (Math.abs(x) < 0.001) return x.toExponential(3);
const scale = Math.abs(x) < 10 ? 1e3 : Math.abs(x) < 100 ? 1e2 : 1e1;
return (Math.round(scale * x) / scale).toString();
"""

# The compare view's metrics table: names in one virtualized grid, values in another. What the page shows for a run's
# metric is what is drawn level with the metric's name, in the column headed by the run's id (the "Run ID:" row):
# asked with elementFromPoint, so rows clipped inside another table's scroll box do not count.
_METRIC_ROW_JS = """
const [metric, runIds] = arguments;
const name = [...document.querySelectorAll("a")].find((a) => a.textContent.trim() === metric);
if (!name) return {};
name.scrollIntoView({block: "center"});
const box = name.getBoundingClientRect();
const values = {};
for (const id of runIds) {
  const head = [...document.querySelectorAll(`a[href$="/runs/${id}"]`)].find((a) => a.textContent.trim() === id);
  const cell = head && document.elementFromPoint(head.getBoundingClientRect().left + 1, box.top + box.height / 2);
  values[id] = cell ? cell.textContent.trim().slice(0, 100) : null;
}
return {plot_href: name.getAttribute("href"), values};
"""


# The runs table's cell of one run (its row id is the run id) in one column (its col-id is the column's key).
_CELL_JS = """
const [runId, column] = arguments;
const cell = [...document.querySelectorAll(`[role=row][row-id="${runId}"] [col-id]`)].find(
  (c) => c.getAttribute("col-id") === column);
return cell ? cell.textContent.trim() : null;
"""


def _close_assistant(driver) -> None:
    """MLflow's assistant panel opens by itself on a first visit to a local server; a user closes it with its x."""
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def test_layerprobe_ui_lands_on_the_runs_and_the_registry_and_runs_describe_themselves(
    tracking_store, ui_url, browser, tmp_path
):
    params = load_params("params.yaml")
    client = MlflowClient(tracking_uri=tracking.resolve_tracking_uri(params.paths.mlruns, params.tracking.tracking_uri))
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    backbone, dataset = params.suite.backbones[0], params.suite.datasets[0]
    model = model_registry.registered_model_name(params.evaluate.registry_prefix, dataset, backbone)
    # The probes of the first task, wherever they were logged (a rerun references unchanged probes' earlier runs).
    newest = {"max_results": 1, "order_by": ["attributes.start_time DESC"]}
    task = f"tags.backbone = '{backbone}' and tags.dataset = '{dataset}'"
    children = {
        p: client.search_runs([experiment.experiment_id], f"tags.probe = '{p}' and {task}", **newest)[0]
        for p in ("linear_last_cls", "alf")
    }
    parent = client.get_run(children["alf"].data.tags["mlflow.parentRunId"])
    alf = children["alf"]
    heatmap = Path(client.download_artifacts(alf.info.run_id, HEATMAP, str(tmp_path))).read_bytes()
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{model}'")}
    champion = str(client.get_model_version_by_alias(model, ALIAS).version)
    assert champion in versions
    driver, base = browser, ui_url.split("#")[0]

    # a. The printed URL opens the experiment's runs (not the GenAI overview), in the "Model training" sidebar, with
    # the probes' scores as columns. The children show once their parent is expanded, each with its score.
    assert ui_url.startswith(base) and f"#/experiments/{experiment.experiment_id}/runs?" in ui_url
    driver.get(ui_url)

    def link_text(d, href_suffix: str) -> str | None:
        found = _links(d, href_suffix)
        return found[0].get_attribute("textContent").strip() if found else None

    parent_suffix = f"/runs/{parent.info.run_id}"
    assert (
        _wait(driver, lambda d: link_text(d, parent_suffix), f"parent run {parent.info.run_name}")
        == parent.info.run_name
    )
    sidebar = driver.find_element(By.TAG_NAME, "body").text
    assert "Model training" in sidebar and "Traces 0" not in sidebar
    _close_assistant(driver)
    child_names = {f"/runs/{r.info.run_id}": r.info.run_name for r in children.values()}
    if not all(_links(driver, suffix) for suffix in child_names):  # nested under the parent, collapsed at first
        _links(driver, parent_suffix)[0].find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]//button").click()
    for suffix, name in child_names.items():
        assert _wait(driver, lambda d, s=suffix: link_text(d, s), f"child run {name}") == name
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", _links(driver, suffix)[0])
    column = f"metrics.`{METRIC}`"
    for probe, run in children.items():
        shown = _wait(
            driver, lambda d, r=run: d.execute_script(_CELL_JS, r.info.run_id, column), f"{METRIC} of {probe}"
        )
        assert float(shown) == pytest.approx(run.data.metrics[METRIC], abs=1e-9), f"{probe}: {shown}"
    driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", _links(driver, parent_suffix)[0])
    _screenshot(driver, "mlflow-runs.png")

    # b. The compare view of the two children has a `test/balanced_accuracy` row with each run's value in its column.
    ids = [children["linear_last_cls"].info.run_id, alf.info.run_id]
    driver.get(f"{base}#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment.experiment_id])}")
    expected = {
        run_id: driver.execute_script(_FORMAT_METRIC_JS, client.get_run(run_id).data.metrics[METRIC]) for run_id in ids
    }
    shown: dict = {}

    def metric_row(d) -> bool:
        shown.clear()
        shown.update(d.execute_script(_METRIC_ROW_JS, METRIC, ids))
        return shown.get("values") == expected and all(r in shown["plot_href"] for r in ids)

    try:
        WebDriverWait(driver, TIMEOUT, poll_frequency=0.5).until(metric_row)
    except TimeoutException:
        pytest.fail(f"compare view at {driver.current_url}: expected {METRIC} values {expected}, found {shown}")

    # c. The alf run's heatmap artifact renders: a decoded <img> whose bytes are exactly the logged PNG.
    driver.get(f"{base}#/experiments/{experiment.experiment_id}/runs/{alf.info.run_id}/artifacts/{HEATMAP}")
    seen: list[dict] = []

    def heatmap_shown(d) -> bool:
        seen[:] = d.execute_async_script(_LOADED_IMAGES_JS)
        return any("base64" in img and base64.b64decode(img["base64"]) == heatmap for img in seen)

    try:
        WebDriverWait(driver, TIMEOUT, poll_frequency=0.5).until(heatmap_shown)
    except TimeoutException:
        loaded = [{k: v for k, v in img.items() if k != "base64"} for img in seen]
        pytest.fail(f"{HEATMAP} of run {alf.info.run_id} not rendered at {driver.current_url}; loaded: {loaded}")

    # d. The registered model's versions table says what each version is: its probe and score in its row, and
    # `@champion` on the version the registry's alias points to, and only there. (Pages other than the runs follow
    # the browser's sidebar setting; opened here as after one click on "Model training".)
    driver.get(f"{base}#/models/{model}?{mlflow_ui.TRAINING_SIDEBAR}")
    alias = re.compile(rf"@\s*{ALIAS}\b")

    def row_text(d, version: str) -> str | None:
        found = _links(d, f"/models/{model}/versions/{version}")
        return found[0].find_element(By.XPATH, "./ancestor::*[@role='row'][1]").text if found else None

    for number, version in versions.items():
        row = _wait(driver, lambda d, v=number: row_text(d, v), f"row of version {number}")
        score = f"test_balanced_accuracy\n: {version.tags['test_balanced_accuracy']}"
        assert f"probe\n: {version.tags['probe']}" in row and score in row, row
    _wait(driver, lambda d: alias.search(row_text(d, champion) or ""), f"@{ALIAS} on version {champion}")
    marked = {number: bool(alias.search(row_text(driver, number))) for number in versions}
    assert marked == {number: number == champion for number in versions}, f"@{ALIAS} should mark {champion} only"
    _close_assistant(driver)
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'end'})", _links(driver, f"/models/{model}/versions/{champion}")[0]
    )
    _screenshot(driver, "mlflow-registry.png")

    # e. A probe run's page names its input dataset: the feature cache, by name and content-hash digest, and says in
    # its description what the probe scored.
    (dataset_input,) = alf.inputs.dataset_inputs
    label = f"{dataset_input.dataset.name} ({dataset_input.dataset.digest})"
    driver.get(f"{base}#/experiments/{experiment.experiment_id}/runs/{alf.info.run_id}?{mlflow_ui.TRAINING_SIDEBAR}")
    _wait(driver, lambda d: label in d.find_element(By.TAG_NAME, "body").text, f"dataset {label} on the run page")
    assert alf.data.tags["mlflow.note.content"] in driver.find_element(By.TAG_NAME, "body").text
    _close_assistant(driver)
    _screenshot(driver, "mlflow-run.png")
