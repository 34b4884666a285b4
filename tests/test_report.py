"""report.html without a browser: what the page holds, missing pieces, resume, size."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from onestage.cli import main as cli_main
from onestage.report import write_compare_report, write_eval_report, write_run_report

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=ssdlite", "model.width_mult=0.25", "model.extra_channels=[64,32,32]", "model.input_size=128",
    "data.train.num_images=8", "data.val.num_images=4", "data.augment.preset=none", "train.batch_size=4",
    "train.time_budget=null", "train.log_every=1", "train.eval_every=1", "schedule.warmup_steps=0",
    "ema.enabled=false", "eval.num_images_drawn=2",
]


def _metric_cell(page: str, key: str) -> float:
    """The exact value the page's metric table holds for ``key`` (data-value of its row)."""
    m = re.search(rf"<td>{re.escape(key)}</td><td class=\"num\" data-value=\"([^\"]*)\"", page)
    assert m, f"{key} not in the page's metric table"
    return float(m.group(1))


def _chart_data(page: str) -> dict:
    m = re.search(r'<script id="chart-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), color, np.uint8)).save(path)
    return path


def test_run_report_reads_the_folder_and_skips_missing_pieces(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "kind,step,epoch,loss_loc,loss_cls,lr,voc_ap50\n"
        "step,1,1,2.0,3.0,0.001,\nstep,2,1,1.5,2.5,0.002,\nepoch,2,1,,,,0.25\n")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps({"voc_ap50": 0.4321, "steps": 2, "seconds": 4.0,
                                                           "images_seen": 16}))
    _png(run / "eval" / "worst" / "000_3.png")
    (run / "precision.json").write_text(json.dumps({"reason": "fp32 (bf16 measured 9x slower)", "amp": False,
                                                    "timings": {"fp32": 1.0, "bf16": 9.0}}))
    _png(run / "sub" / "assignment" / "panel0.png", (10, 200, 10))
    page = write_run_report(run).read_text()
    assert _metric_cell(page, "voc_ap50") == 0.4321  # from metrics.json, not the last csv row
    assert "<td>images/s (whole run)</td><td>4.0</td>" in page  # 16 images / 4 s
    assert page.count("<img ") == 2 and "Assignment panels" in page
    assert "<td>reason</td><td>fp32 (bf16 measured 9x slower)</td>" in page  # the precision the run used
    for missing in ("Per class", "Error analysis (TIDE)", "Model layout", "Precision-recall curves"):
        assert f">{missing}</h2>" not in page  # no result.json, no config, no PR curves: left out
    traces = [t for fig in _chart_data(page).values() for t in fig["data"]]
    assert {t["name"] for t in traces} >= {"loss_loc", "loss_cls", "lr", "voc_ap50"}
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page.split("<script id=\"plotly-gz\"")[0]


def test_compare_report_table_and_figures(tmp_path: Path) -> None:
    fig = _png(tmp_path / "curves.png")
    rows = [{"run": "a", "voc_ap50": 0.5, "minutes": 3}, {"run": "b", "voc_ap50": 0.7, "note": "<b>x</b>"}]
    page = write_compare_report(tmp_path / "cmp", rows, [fig]).read_text()
    assert 'id="compare" class="sortable"' in page and "<th>note</th>" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page  # cells are escaped
    assert 'data-value="0.7"' in page and page.count("<img ") == 1
    assert 'id="plotly-gz"' not in page  # no charts: no plotly.js either


def test_eval_report_from_eval_out_folder(tmp_path: Path) -> None:
    result = {"metrics": {"voc_ap50": 0.25, "coco_ap": 0.125}, "iou_threshold": 0.5, "voc_metric": "area",
              "per_class": [{"name": "cat", "ap": 0.25, "num_gt": 3, "num_det": 5},
                            {"name": "dog", "ap": None, "num_gt": 0, "num_det": 1}]}
    (tmp_path / "result.json").write_text(json.dumps(result))
    page = write_eval_report(tmp_path, config_text="seed: 0\n", checkpoint="best.pt").read_text()
    assert _metric_cell(page, "voc_ap50") == 0.25
    assert re.search(r"<td>coco_ap</td><td class=\"num\" data-value=\"0.125\"", page)
    assert 'id="per-class" class="sortable"' in page and "<td>dog</td>" in page


def test_killed_and_resumed_run_gets_one_report_over_the_whole_run(tmp_path: Path, capsys) -> None:
    """Two epochs of two steps; the first process stops after step 2 (as a kill would leave
    it: last.pt, metrics.csv), the resumed one finishes. The report holds steps 1 to 4 and
    the final evaluation's numbers."""
    args = ["train", str(ROOT / "configs" / "demo_shapes.yaml"), "--no-progress", *TINY, "train.epochs=2",
            f"train.out_dir={tmp_path}", "train.name=resumed"]
    run = tmp_path / "resumed"
    assert cli_main(args + ["--max-steps", "2"]) == 0
    assert cli_main(["train", "--resume", str(run), "--no-progress"]) == 0
    page = (run / "report.html").read_text()
    losses = next(f for f in _chart_data(page).values() if f["data"][0]["name"].startswith("loss_"))
    assert losses["data"][0]["x"] == [1.0, 2.0, 3.0, 4.0]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert _metric_cell(page, "voc_ap50") == metrics["voc_ap50"]
    assert "Error analysis (TIDE)" in page and 'id="per-class"' in page
    assert (run / "report.html").stat().st_size < 5e6
    # eval --json carries the TIDE breakdown next to the metrics
    capsys.readouterr()
    assert cli_main(["eval", str(ROOT / "configs" / "demo_shapes.yaml"), str(run / "last.pt"), *TINY, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tide"]["main"]) == {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"}
    assert [r["name"] for r in out["tide"]["per_class"]] == [r["name"] for r in out["per_class"]]
