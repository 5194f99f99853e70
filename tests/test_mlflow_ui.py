"""Comparing runs in the MLflow UI, in a real browser.

The team server (scripts/mlflow_server.sh over HTTPS, authenticated, on a throwaway
PostgreSQL and a free loopback port) gets the runs of a tiny project (the CNN alone) logging
to it as a user allowed to EDIT: the pipeline as committed (train.lr 0.05), then a DVC
experiment with train.lr 0.04. Headless Chromium, trusting the server's certificate and
logged in as a user allowed to READ, opens the experiment page and the comparison page of
the two runs, as a person following README's "Comparing runs in MLflow" would, and checks
what is on the screen. The comparison
page's screenshot goes to the test's temporary folder; with
IMGCLF_SCREENSHOT=docs/mlflow-compare.png set it also refreshes README's picture (tests never
write into the checkout by default).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.parse
from dataclasses import dataclass

import pytest

from browser import BrowserUnavailable, spki_pin, start_chromium
from dvcqueue import EXPERIMENT
from fixtures import ONE_MODEL, ROOT, tiny_project
from imgclf import tracking
from remotes import commit_all
from teamserver import start_team_server

WAIT = 60  # seconds for the single-page app to show something; it usually takes one or two

# Every row of every table on the page, as lists of cell texts (header cells included): the
# run details and the parameters are HTML tables.
TABLE_ROWS_JS = """
return Array.from(document.querySelectorAll('tr')).map(
    tr => Array.from(tr.children).map(cell => cell.innerText.trim()));
"""
# The metrics are a grid of absolutely positioned cells, names (links to the metric's chart)
# apart from values: return the texts of the cells on the same line as the name, left to right.
METRIC_ROW_JS = """
const label = arguments[0];
const link = Array.from(document.querySelectorAll('a[title="Plot chart"]'))
    .find(a => a.textContent.trim() === label);
if (!link) return null;
const name = link.parentElement.getBoundingClientRect();
return Array.from(document.querySelectorAll('div[style*="position: absolute"]'))
    .filter(cell => !cell.querySelector('div, a'))
    .map(cell => [cell, cell.getBoundingClientRect()])
    .filter(([cell, box]) => box.height > 0 && Math.abs(box.top - name.top) < 2 && box.left >= name.right - 1)
    .sort((a, b) => a[1].left - b[1].left)
    .map(([cell, box]) => cell.innerText.trim());
"""


# The runs table's Duration cells by run id (each row's row-id is its run id).
DURATIONS_JS = """
return Object.fromEntries(Array.from(document.querySelectorAll('[role="row"][row-id] [col-id="duration"]'))
    .map(cell => [cell.closest('[role="row"]').getAttribute('row-id'), cell.innerText.trim()]));
"""


def _as_shown(ms: int) -> str:
    """A duration in milliseconds as the runs table formats it (MLflow's Utils.formatDuration)."""
    if ms < 500:
        return f"{ms}ms"
    for limit, unit, scale in ((60_000, "s", 1_000), (3_600_000, "min", 60_000), (86_400_000, "h", 3_600_000)):
        if ms < limit:
            return f"{ms / scale:.1f}{unit}"
    return f"{ms / 86_400_000:.1f}d"


VIEWER = "reader"  # READ on the experiment
COMPARED = 0.04  # the experiment's train.lr compared with the committed run's (0.05)


@pytest.fixture(scope="module")
def https_team_server(postgres, tmp_path_factory, request):
    """The script's server over HTTPS with a throwaway CA; users in PostgreSQL: the admin, an
    editor (EDIT) who logs the runs, and the viewer (READ), added the way `make mlflow-user` does."""
    return start_team_server(postgres, tmp_path_factory.mktemp("server"), request, tls=True,
                             users={"editor": "EDIT", VIEWER: "READ"})


@dataclass(frozen=True)
class ComparedRuns:
    committed: set[str]  # the run ids on the server after the committed params' pipeline
    experiment: str  # the DVC experiment with train.lr COMPARED


@pytest.fixture(scope="module")
def compared_runs(https_team_server, tmp_path_factory):
    """The tiny pipeline (the CNN alone) as committed, then `dvc exp run -S train.lr=COMPARED`,
    both logging to the team server as the editor."""
    from mlflow import MlflowClient

    server, name = https_team_server, "lr-004"
    with tiny_project(tmp_path_factory.mktemp("ui"), models=ONE_MODEL) as proj:
        proj.env.update(server.env("editor"))
        proj.repro()
        commit_all(proj, "tiny pipeline trained against the server")
        # The client reads the CA and the editor's credentials from the environment.
        with pytest.MonkeyPatch.context() as patch:
            for key, value in server.env("editor").items():
                patch.setenv(key, value)
            client = MlflowClient(tracking_uri=server.url)
            experiment = client.get_experiment_by_name(EXPERIMENT)
            committed = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
        proj.run("dvc", "exp", "run", "-n", name, "-S", f"train.lr={COMPARED}")
    return ComparedRuns(committed, name)


@pytest.fixture(scope="module")
def browser(https_team_server, tmp_path_factory):
    """Headless Chromium trusting the team server's certificate, and no other one it cannot
    verify (the throwaway CA is not in its trust store)."""
    work = tmp_path_factory.mktemp("chromium")
    try:
        driver = start_chromium(work / "profile", log_file=work / "chromedriver.log",
                                flags=(spki_pin(https_team_server.cert),))
    except BrowserUnavailable as exc:
        # CI (and any root Debian machine) always runs it; elsewhere say what is missing.
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no headless Chromium can be driven here: {exc}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def logged_in(browser, https_team_server):
    """The browser, sending the viewer's credentials with every request (what a person types
    into the login dialog; headless Chromium has no dialog). Without them the server answers
    401 (tests/test_tracking_server.py)."""
    token = base64.b64encode(f"{VIEWER}:{https_team_server.users[VIEWER]}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    return browser


def _page_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''")


def _wait_until(driver, what: str, condition, timeout: float = WAIT):
    """Poll `condition(driver)` until it is truthy; fail with what the page showed instead."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(condition)
    except TimeoutException:
        raise AssertionError(
            f"{what}: not shown within {timeout} s at {driver.current_url}; the page says:\n"
            f"{_page_text(driver)[-3000:]}") from None


def _wait_for_text(driver, *texts: str) -> str:
    def shown(d):
        text = _page_text(d)
        return text if all(t in text for t in texts) else False

    return _wait_until(driver, f"text {texts}", shown)


def _row(rows: list[list[str]], label: str) -> list[str]:
    """The cells after the label of the table row whose first cell is `label`."""
    found = [r[1:] for r in rows if r and r[0].rstrip(":") == label]
    assert found, f"no table row {label!r} on the page; rows: {[r[0] for r in rows if r]}"
    return found[0]


@pytest.mark.slow
def test_mlflow_ui_compares_two_learning_rates(logged_in, compared_runs, https_team_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    browser, server = logged_in, https_team_server
    for key, value in server.env(VIEWER).items():
        monkeypatch.setenv(key, value)
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    everything = client.search_runs([experiment.experiment_id])
    committed = [r for r in everything if r.info.run_id in compared_runs.committed and r.data.tags["model_name"] == "cnn"]
    changed = [r for r in everything if r.data.tags.get("dvc_exp_name") == compared_runs.experiment]
    assert len(committed) == len(changed) == 1, (committed, changed)
    runs = [*committed, *changed]
    assert [r.data.params["train.lr"] for r in runs] == ["0.05", str(COMPARED)]
    lr = {r.info.run_id: r.data.params["train.lr"] for r in runs}
    accuracy = {r.info.run_id: r.data.metrics["test/accuracy"] for r in runs}

    # 1. What a person sees first at the address `make mlflow-ui` prints: the runs table of the
    #    experiment as model training (not MLflow 3's GenAI overview of traces and tokens), all
    #    runs, each linking to its own page.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    browser.get(tracking.runs_page(server.url, experiment.experiment_id))
    _wait_for_text(browser, EXPERIMENT, "Run Name", "Duration", f"{len(everything)} matching runs")
    assert "Token Usage" not in _page_text(browser)
    assert VIEWER in _page_text(browser).splitlines()  # the account menu: logged in as the viewer
    for run_id in lr:
        _wait_until(browser, f"a link to run {run_id}",
                    lambda d, run_id=run_id: d.find_elements("css selector", f'a[href*="{run_id}"]'))
    # Each run's duration is its training's: evaluate and report added their metrics and files
    # after the run had ended, without reopening it (which would stretch it over them).
    durations = _wait_until(browser, "the runs' durations",
                            lambda d: (shown := d.execute_script(DURATIONS_JS)) and set(lr) <= set(shown) and shown)
    for run in runs:
        evaluated = client.get_metric_history(run.info.run_id, "test/accuracy")[0].timestamp
        assert run.info.end_time < evaluated, "the run ended after its evaluation was logged"
        lasted = run.info.end_time - run.info.start_time
        assert run.data.metrics["train/seconds"] * 1000 <= lasted
        assert durations[run.info.run_id] == _as_shown(lasted), durations

    # 2. The comparison page, as the Compare button opens it.
    query = urllib.parse.urlencode(
        {"runs": json.dumps(list(lr)), "experiments": json.dumps([experiment.experiment_id])},
        quote_via=urllib.parse.quote)
    browser.get(f"{server.url}/#/compare-runs?{query}")
    _wait_for_text(browser, "Comparing 2 Runs from 1 Experiment", "Run ID:", "Parameters", "Metrics",
                   "train.lr", "test/accuracy", *lr)
    rows = browser.execute_script(TABLE_ROWS_JS)
    columns = _row(rows, "Run ID")
    assert sorted(columns) == sorted(lr), columns
    assert _row(rows, "Run Name") == ["cnn", "cnn"]
    # The differing hyperparameter, one column per run.
    assert _row(rows, "train.lr") == [lr[run_id] for run_id in columns]
    # The test accuracy of each run, as the UI rounds it.
    shown = browser.execute_script(METRIC_ROW_JS, "test/accuracy")
    assert shown and len(shown) == 2, shown
    for run_id, text in zip(columns, shown):
        assert float(text) == pytest.approx(accuracy[run_id], abs=5e-4), (run_id, text)

    # "Show diff only" on the parameters: of all the params, the UI finds only train.lr differs.
    params = set(runs[0].data.params) | set(runs[1].data.params)

    def param_rows(d):
        return [r for r in d.execute_script(TABLE_ROWS_JS) if r and r[0] in params]

    assert len(param_rows(browser)) == len(params) > 1
    browser.find_element("css selector", '[aria-label="Parameters - Show diff only"]').click()
    _wait_until(browser, "the parameters reduced to the ones that differ", lambda d: len(param_rows(d)) < len(params))
    assert param_rows(browser) == [["train.lr", *[lr[run_id] for run_id in columns]]]

    # The screenshot: without the assistant's side panel and with the charts folded away, so
    # the title, the run ids, the differing param and the first metrics are in view.
    close = 'button[data-component-id="mlflow.assistant.chat_panel.close"]'
    for button in browser.find_elements("css selector", close):
        button.click()
    _wait_until(browser, "the assistant panel closed", lambda d: not d.find_elements("css selector", close))
    browser.find_element("xpath", "//div[@role='button'][normalize-space()='Visualizations']").click()
    _wait_until(browser, "the charts folded", lambda d: "Parallel Coordinates Plot" not in _page_text(d))
    # A little taller than the default window, so test/accuracy's row fits under the run details.
    browser.set_window_size(1600, 1150)
    browser.execute_script("document.querySelector('.CompareRunView').scrollIntoView(true);")
    shot = tmp_path / "mlflow-compare.png"
    assert browser.save_screenshot(str(shot)), "Chromium could not take the screenshot"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("IMGCLF_SCREENSHOT"):
        (ROOT / os.environ["IMGCLF_SCREENSHOT"]).write_bytes(shot.read_bytes())


@pytest.mark.slow
def test_mlflow_ui_shows_the_model_card_on_the_version_page(logged_in, compared_runs, https_team_server, monkeypatch):
    """The evaluate stage wrote the registered version's model card (imgclf.modelcard) as its
    description: the version's page shows it, rendered, to a user who may only READ."""
    import mlflow
    from mlflow import MlflowClient

    from imgclf.config import MlflowConfig, load_section
    from imgclf.modelcard import ARTIFACT

    browser, server = logged_in, https_team_server
    for key, value in server.env(VIEWER).items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(server.url)
    client = MlflowClient(tracking_uri=server.url)
    name = load_section("mlflow", MlflowConfig).registered_name
    version, = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id in compared_runs.committed]
    card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/{ARTIFACT}")
    assert version.description == card
    title = card.splitlines()[0].removeprefix("# ")
    assert title == f"Model card: {name} version {version.version}"
    accuracy = client.get_run(version.run_id).data.metrics["test/accuracy"]
    shown_accuracy, = [line.replace("**", "") for line in card.splitlines() if line.startswith("**Test accuracy: ")]
    assert shown_accuracy.startswith(f"Test accuracy: {100 * accuracy:.2f}% (95% interval ")

    browser.get(f"{server.url}/#/models/{urllib.parse.quote(name)}/versions/{version.version}")
    _wait_for_text(browser, title, shown_accuracy)
    # Markdown rendered: the title a heading, the per-class figures a table.
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h1')).map(h => h.innerText.trim())")
    assert title in headings, headings
    assert _row(browser.execute_script(TABLE_ROWS_JS), "class") == ["train", "val", "test", "test accuracy",
                                                                     "95% interval"]
