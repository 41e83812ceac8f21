"""The MLflow UI, in a real headless Chromium, over a tracking store built by the project's own flows.

The flows (prepare → extract → train → evaluate) run in process on the tiny suite, as in test_flows.py; then
`mlflow server` serves the store and selenium checks what a user sees: the nested runs, the compare view with
`test/balanced_accuracy`, the alf heatmap artifact rendered as an image, and `@champion` on the right model version.

Needs /usr/bin/chromium, /usr/bin/chromedriver (Debian: apt-get install chromium chromium-driver) and selenium;
skipped when one is missing. Selenium Manager never runs: the driver and the browser are given by path.
With LAYERPROBE_SCREENSHOTS=<dir> the test also saves mlflow-runs.png and mlflow-champion.png there (docs/ holds them).
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
import time
import urllib.request
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

pytestmark = pytest.mark.slow

MODEL = "layerprobe-count-tiny-vit"
ALIAS = "champion"
METRIC = "test/balanced_accuracy"
HEATMAP = "evaluation/heatmap.png"
TIMEOUT = 60  # seconds for any one thing to show up: the machine may be slow
WIDTH, HEIGHT = 1400, 900
# resolved at import, before project_dir moves the working directory into a temporary project
SCREENSHOTS = Path(os.environ["LAYERPROBE_SCREENSHOTS"]).resolve() if os.environ.get("LAYERPROBE_SCREENSHOTS") else None
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
def tracking_store(project_dir, prefect_harness) -> Path:
    """prepare → extract → train → evaluate through the flows, in process: experiment `tiny` in mlruns/."""
    from flows.evaluate import evaluate_flow
    from flows.extract import extract_flow
    from flows.prepare import prepare_flow
    from flows.train import train_flow

    prepare_flow("params.yaml")
    extract_flow("params.yaml")
    train_flow("params.yaml")
    evaluate_flow("params.yaml")
    return project_dir


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tracking_store, tmp_path_factory):
    """`mlflow server` on the store, as the README's `mlflow ui` would serve it; yields its base URL.

    The experiment's artifact location is a file URI under mlruns/artifacts, which the server reads directly
    (--artifacts-destination only applies to mlflow-artifacts:/ locations; it is set so nothing lands in ./mlartifacts).
    """
    mlruns = tracking_store / "mlruns"
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else a job runner starts ~8 huey consumer processes
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [
        *(sys.executable, "-m", "mlflow", "server"),
        *("--backend-store-uri", f"sqlite:///{mlruns / 'mlflow.db'}"),
        *("--artifacts-destination", (mlruns / "artifacts").as_uri()),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]
    log_path = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with open(log_path, "wb") as log:
        # its own process group: `mlflow server` runs uvicorn as a child, and both must go at the end
        server = subprocess.Popen(
            command, cwd=tracking_store, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer in {TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


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


def test_mlflow_ui_shows_runs_comparison_heatmap_and_champion(tracking_store, mlflow_server, browser, tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tracking_store / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["probe"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"linear_last_cls", "alf"}
    alf = children["alf"]
    heatmap = Path(client.download_artifacts(alf.info.run_id, HEATMAP, str(tmp_path))).read_bytes()
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    champion = str(client.get_model_version_by_alias(MODEL, ALIAS).version)
    assert len(versions) == 2 and champion in versions
    driver, base = browser, mlflow_server

    # Keep the MLflow Assistant side panel closed (it opens on a first visit and takes a third of the screen): set in
    # the origin's localStorage from a page that is not the app, so the app cannot write over it before it reads it.
    driver.get(f"{base}health")
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
        # only so the screenshot shows the metric; the checks below do not depend on these columns
        "localStorage.setItem(arguments[0], JSON.stringify({selectedColumns: arguments[1]}));",
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment.experiment_id}"]-ReactComponentState',
        [f"metrics.`{METRIC}`", "metrics.`val/balanced_accuracy`", "attributes.`Models`"],
    )
    driver.get(f"{base}#/experiments/{experiment.experiment_id}/runs")

    # a. The runs table lists the parent run; its children show once it is expanded, each linked by id and name.
    def link_text(d, href_suffix: str) -> str | None:
        found = _links(d, href_suffix)
        return found[0].get_attribute("textContent").strip() if found else None

    parent_suffix = f"/runs/{parent.info.run_id}"
    name = _wait(driver, lambda d: link_text(d, parent_suffix), f"parent run {parent.info.run_name}")
    assert name == parent.info.run_name
    child_names = {f"/runs/{r.info.run_id}": r.info.run_name for r in children.values()}
    if not all(_links(driver, suffix) for suffix in child_names):  # nested under the parent, collapsed at first
        _links(driver, parent_suffix)[0].find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]//button").click()
    for suffix, name in child_names.items():
        assert _wait(driver, lambda d, s=suffix: link_text(d, s), f"child run {name}") == name
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

    # d. The registered model's page marks `@champion` on the version the registry's alias points to, and only there.
    driver.get(f"{base}#/models/{MODEL}")
    alias = re.compile(rf"@\s*{ALIAS}\b")

    def row_text(d, version: str) -> str | None:
        found = _links(d, f"/models/{MODEL}/versions/{version}")
        return found[0].find_element(By.XPATH, "./ancestor::*[@role='row'][1]").text if found else None

    for version in versions:
        _wait(driver, lambda d, v=version: row_text(d, v), f"row of version {version}")
    _wait(driver, lambda d: alias.search(row_text(d, champion) or ""), f"@{ALIAS} on version {champion}")
    marked = {version: bool(alias.search(row_text(driver, version))) for version in versions}
    assert marked == {version: version == champion for version in versions}, f"@{ALIAS} should mark {champion} only"
    _screenshot(driver, "mlflow-champion.png")
