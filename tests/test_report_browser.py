"""Each kind of report.html opened in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium): no console errors, every image and chart drawn,
the per-class table sorts on a click, the page holds the run's numbers. A screenshot of
each page is saved next to the test output (``tmp_path``).

The run folder comes from a 2-step smoke training through the CLI, as a user makes one;
the eval report from ``onestage eval ... --out``; the compare report from a small table.
Skips, saying why, only where no browser (or selenium) is installed: ``.ci/run`` installs them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from onestage.cli import main as cli_main
from onestage.report import write_compare_report

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
SMOKE = ["data.train.num_images=16", "data.val.num_images=8", "model.input_size=128", "train.batch_size=8", "schedule.warmup_steps=0",
         "eval.num_images_drawn=4"]


def _browser_or_skip():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not Path(path).exists():
            pytest.skip(f"no {name} at {path}: install Debian's chromium and chromium-driver "
                        "(apt-get install -y chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='onestage-chromium-')}", "--window-size=1280,1000"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """A smoke run's folder with its report, an eval --out folder, a compare folder."""
    base = tmp_path_factory.mktemp("reports")
    config = str(ROOT / "configs" / "demo_shapes.yaml")
    assert cli_main(["train", config, "--max-steps", "2", "--no-progress", *SMOKE, f"train.out_dir={base}",
                     "train.name=smoke"]) == 0
    run = base / "smoke"
    assert cli_main(["eval", config, str(run / "last.pt"), *SMOKE, "--out", str(base / "eval")]) == 0
    table = [{"run": "smoke", "voc_ap50": 0.1, "minutes": 0.1}, {"run": "other", "voc_ap50": 0.3, "minutes": 2.0},
             {"run": "third", "voc_ap50": 0.2, "minutes": 1.0}]
    write_compare_report(base / "compare", table, [run / "eval" / "pr_curves.png"])
    return {"run": run, "eval": base / "eval", "compare": base / "compare"}


def _open(driver, path: Path) -> float:
    """Load the page and wait for its charts; returns the seconds it took."""
    start = time.perf_counter()
    driver.get(path.resolve().as_uri())
    deadline = start + 60
    while driver.execute_script("return document.body && document.body.dataset.charts") != "ready":
        assert time.perf_counter() < deadline, f"{path}: charts not drawn after 60 s"
        time.sleep(0.05)
    return time.perf_counter() - start


def _check_rendered(driver, path: Path, shot: Path) -> tuple[int, int]:
    """No console error, every image and chart drawn, nothing fetched from the network; a
    screenshot of the whole page. Returns (images, charts)."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{path}: console errors {errors}"
    sizes = driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert all(c and w > 0 and h > 0 for _, c, w, h in sizes), f"{path}: images not drawn: {sizes}"
    charts = driver.execute_script(
        "return Array.from(document.querySelectorAll('div.chart')).map(d => [d.id, d.querySelectorAll('svg').length])")
    assert all(n > 0 for _, n in charts), f"{path}: charts without svg: {charts}"
    fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name.slice(0, 40))")
    assert all(u.startswith(("data:", "file:")) for u in fetched), f"{path}: fetched from outside the file: {fetched}"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 100, 12000))
    driver.save_screenshot(str(shot))
    driver.set_window_size(1280, 1000)
    assert shot.stat().st_size > 10_000
    return len(sizes), len(charts)


def _column(driver, table_id: str, col: int) -> list[str]:
    return driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{table_id} tbody tr'))"
        f".map(r => r.cells[{col}].dataset.value !== undefined ? r.cells[{col}].dataset.value : r.cells[{col}].textContent)")


def _click_header(driver, table_id: str, col: int) -> None:
    driver.find_elements("css selector", f"#{table_id} thead th")[col].click()


def _metric_in_page(driver, table_id: str, key: str) -> float:
    return float(driver.execute_script(
        f"var r = Array.from(document.querySelectorAll('#{table_id} tbody tr')).find(r => r.cells[0].textContent === '{key}');"
        "return r ? r.cells[r.cells.length - 1].dataset.value : null"))


def test_run_report_in_browser(browser, reports, tmp_path) -> None:
    page = reports["run"] / "report.html"
    seconds = _open(browser, page)
    images, charts = _check_rendered(browser, page, tmp_path / "run_report.png")
    assert images >= 3 and charts >= 4  # PR curves, worst images, predictions; training + TIDE charts
    metrics = json.loads((reports["run"] / "eval" / "metrics.json").read_text())
    key = metrics["best_metric"]
    assert _metric_in_page(browser, "voc-metrics", key) == pytest.approx(metrics[key], abs=1e-12)
    # per-class table: text column, then numbers (descending on the first click, then ascending)
    names = _column(browser, "per-class", 0)
    _click_header(browser, "per-class", 0)
    assert _column(browser, "per-class", 0) == sorted(names, reverse=True)
    _click_header(browser, "per-class", 2)
    objects = [float(v) for v in _column(browser, "per-class", 2)]
    assert objects == sorted(objects, reverse=True) and len(set(objects)) > 1
    _click_header(browser, "per-class", 2)
    assert [float(v) for v in _column(browser, "per-class", 2)] == sorted(objects)
    size = page.stat().st_size
    assert size < 5e6, f"{page}: {size / 1e6:.1f} MB"
    print(f"run report: {size / 1e6:.2f} MB, charts ready {seconds:.2f} s after opening")


def test_eval_report_in_browser(browser, reports, tmp_path) -> None:
    page = reports["eval"] / "report.html"
    _open(browser, page)
    _check_rendered(browser, page, tmp_path / "eval_report.png")
    result = json.loads((reports["eval"] / "result.json").read_text())
    assert _metric_in_page(browser, "voc-metrics", "voc_ap50") == pytest.approx(result["metrics"]["voc_ap50"], abs=1e-12)
    assert "tide" in result and browser.find_elements("css selector", "#tide .chart svg")


def test_compare_report_in_browser(browser, reports, tmp_path) -> None:
    page = reports["compare"] / "report.html"
    _open(browser, page)
    _check_rendered(browser, page, tmp_path / "compare_report.png")
    _click_header(browser, "compare", 1)
    assert [float(v) for v in _column(browser, "compare", 1)] == [0.3, 0.2, 0.1]
    assert _column(browser, "compare", 0) == ["other", "third", "smoke"]
