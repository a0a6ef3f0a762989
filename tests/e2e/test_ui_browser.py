"""The MLflow UI as a user sees it, in headless Chromium (`make ui-check`).

A short digits run and a 2-trial sweep (FM vs Self-Flow) make a store; `selfflow ui` serves it; the
system Chromium (Debian's `chromium`, driven by Playwright) opens the run page, its metrics, its
artifacts and the compare view, checks that the FD chart, a sample image and the readable config
are there, and saves screenshots to $SELFFLOW_UI_CHECK_OUT (default runs/ui-check/). The store
stays beside them (store/): `selfflow ui --runs runs/ui-check/store` reopens it.

Marked `browser`: `make test` leaves it out, `make ui-check` runs it; skipped where Chromium or
Playwright is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from selfflow_testing.servers import free_port, wait_until_healthy

CHROMIUM = Path(os.environ.get("SELFFLOW_CHROMIUM", "/usr/bin/chromium"))
REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("SELFFLOW_UI_CHECK_OUT", REPO_ROOT / "runs" / "ui-check")).resolve()
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

try:
    import playwright.sync_api  # noqa: F401

    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not CHROMIUM.exists() or not HAVE_PLAYWRIGHT,
                       reason=f"needs {CHROMIUM} (apt install chromium) and playwright (pip install '.[ui-check]')"),
]

# A short run that evaluates twice (steps 20 and 40), so the FD chart is a line and samples have steps.
TINY_EVAL = [
    "TrainConfig.log_every = 10", "TrainConfig.checkpoint_every = 0", "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 2", "EvalSuite.min_steps = 0", "EvalSuite.num_samples = 40",
    "EvalSuite.sample_batch = 40", "EvalSuite.probe_levels = (0.0, 0.5)", "EvalSuite.probe_train_samples = 200",
    "EvalSuite.probe_test_samples = 100", "EvalSuite.loss_samples = 100", "EvalSuite.knn_k = 5",
    "ClassifierEvaluator.steps = 30",
]
RUN = ["TrainConfig.steps = 40", "TrainConfig.eval_every = 20", "EvalSuite.every = 20",
       "RunTracking.system_metrics = True", "RunTracking.system_metrics_every_s = 1.0", *TINY_EVAL]
SWEEP = """# FM against Self-Flow on digits, a few steps each: the sweep `make ui-check` opens.
Sweep.name = 'ui_check'
Sweep.space = {'include': ('grid', ['digits/fm.gin', 'digits/selfflow.gin'])}
Sweep.seeds = [0]
Sweep.bindings = %s
Sweep.metric = 'loss/flow'
""" % json.dumps(["TrainConfig.steps = 20", "TrainConfig.eval_every = 10", "EvalSuite.every = 10", *TINY_EVAL])


@pytest.fixture(scope="module")
def store(digits_root, ray_local):
    """runs/ui-check/store: the run and the sweep, made afresh."""
    from selfflow.platform.scale.sweep import run_sweep
    from selfflow.platform.train.driver import train

    folder = OUT / "store"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "digits").symlink_to(digits_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        run = train(["digits/fm.gin"], RUN, run_dir=folder / "runs" / "digits_fm", runs_dir=folder / "runs",
                    progress=False)
        (folder / "ui_check_sweep.gin").write_text(SWEEP)
        sweep = run_sweep(folder / "ui_check_sweep.gin", runs_dir=folder / "runs")
    assert not sweep.failed
    return {"runs": folder / "runs", "run": run, "sweep": sweep}


@pytest.fixture(scope="module")
def ui(store):
    """`selfflow ui` on the store; stopped (and checked to stop) at the end."""
    port = free_port()
    log = open(OUT / "ui.log", "w")
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}  # serve this store
    process = subprocess.Popen([str(Path(sys.executable).with_name("selfflow")), "ui", "--runs", str(store["runs"]),
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base, process, 180, OUT / "ui.log", "selfflow ui")
    yield base
    process.terminate()
    assert process.wait(timeout=60) == 0
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def open_page(page, url: str, wait_for_text: str):
    page.goto(url)
    page.get_by_text(wait_for_text, exact=False).first.wait_for()
    close = page.get_by_role("button", name="Close")  # the MLflow Assistant panel hides half the page
    if close.count():
        close.first.click()
    return page


def model_training_layout(page, base: str) -> None:
    """MLflow 3 opens in its GenAI layout; a model-training user switches once (the UI remembers)."""
    page.goto(f"{base}/")
    page.get_by_text("Model training", exact=True).first.click()
    page.wait_for_timeout(1000)


def chart_card(page, title: str):
    """The chart card titled `title`, found through the chart search box as a user would."""
    page.get_by_placeholder("Search metric charts").fill(title)
    card = page.locator("[data-testid='experiment-view-compare-runs-card']").filter(
        has=page.get_by_text(title, exact=True)).first
    card.wait_for()
    return card


def slide_to_last_step(page, scope) -> None:
    """An image chart starts at step 0; move its step slider to the end (a click at the track's end)."""
    handle = scope.get_by_role("slider").first
    handle.scroll_into_view_if_needed()
    track = handle.locator("xpath=../..").bounding_box()
    page.mouse.click(track["x"] + track["width"] - 2, track["y"] + track["height"] / 2)
    page.wait_for_function("(h) => h.getAttribute('aria-valuenow') === h.getAttribute('aria-valuemax')",
                           arg=handle.element_handle())


def shot(page, name: str) -> Path:
    path = OUT / name
    page.screenshot(path=str(path))
    return path


def run_url(base: str, run, tab: str = "") -> str:
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" + (f"/{tab}" if tab else "")


def test_run_page_metrics_artifacts_and_compare_view(store, ui, page):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store["run"].tracking_uri)
    run = client.get_run(store["run"].mlflow_run_id)
    model_training_layout(page, ui)

    # The run page: its description (the gin file's header comment), source commit, datasets.
    open_page(page, run_url(ui, run), run.info.run_name)
    page.get_by_text("Class-conditional vanilla flow matching on digits").first.wait_for()
    page.get_by_text("digits/train", exact=False).first.wait_for()  # the dataset input
    shot(page, "1-run-overview.png")

    # Metrics: the FD chart, a line over the two evaluation steps.
    open_page(page, run_url(ui, run, "model-metrics"), run.info.run_name)
    fd = chart_card(page, "fd")
    fd.locator(".js-plotly-plot").first.wait_for()
    fd.get_by_text("(eval/fd)").first.wait_for()  # the legend entry names the metric
    shot(page, "2-metrics-fd-chart.png")

    # A sample image: the step image samples/grid at the last step, opened full size.
    card = chart_card(page, "samples/grid")
    card.locator("[data-testid='experiment-view-compare-runs-card-menu']").locator(
        "xpath=preceding-sibling::button[1]").click()  # the card's full-screen button
    dialog = page.get_by_role("dialog").first
    slide_to_last_step(page, dialog)
    image = dialog.locator("img[src*='samples~grid']").first
    image.wait_for()
    assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", image.element_handle())
    assert "step%2B40" in image.get_attribute("src")  # the image logged at step 40
    image.scroll_into_view_if_needed()
    shot(page, "3-sample-image.png")
    page.keyboard.press("Escape")

    # Artifacts: the operative config as readable text, defaults included.
    open_page(page, run_url(ui, run, "artifacts/config/operative_config.gin.txt"), "operative_config.gin.txt")
    page.get_by_text("TrainConfig.bf16 = False").first.wait_for()
    shot(page, "4-artifacts-readable-config.png")

    # Compare view: the sweep's two children side by side; Self-Flow's own parameters among the diffs.
    children = [trial.run_id for trial in store["sweep"].trials]
    names = [client.get_run(run_id).info.run_name for run_id in children]
    url = f"{ui}/#/compare-runs?runs={json.dumps(children)}&experiments={json.dumps([run.info.experiment_id])}"
    open_page(page, url, "Comparing 2 Runs")
    for name in names:
        page.get_by_text(name).first.wait_for()
    page.get_by_text("DualTimestepScheduler.mask_ratio", exact=True).first.wait_for()
    shot(page, "5-compare-sweep-children.png")

    # The sweep's parent run: a link to each child in its description.
    parent = client.get_run(store["sweep"].parent_run_id)
    open_page(page, run_url(ui, parent), parent.info.run_name)
    page.get_by_text("Show more", exact=True).first.click()  # the description is folded after a few lines
    description = page.locator("p:has-text('trials')").locator("xpath=..")  # the rendered Markdown
    for name in names:
        description.locator(f"a:has-text('{name}')").first.wait_for()
    shot(page, "6-sweep-parent.png")
