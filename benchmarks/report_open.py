"""Open a report.html in headless Chromium (the browser test's setup): how long until every
chart is drawn, its size, and optionally a screenshot (how docs/report.png was taken).

    PYTHONPATH=src .venv/bin/python benchmarks/report_open.py runs/demo/report.html [--shot docs/report.png]

Needs Debian's chromium and chromium-driver, and selenium (the dev extra). Prints the CPU
(model name and torch's CPU capability): timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = platform.processor()
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path)
    p.add_argument("--shot", type=Path, help="save a screenshot of the top of the page here (PNG)")
    p.add_argument("--height", type=int, default=2400, help="screenshot height in pixels")
    p.add_argument("--section", help="start the screenshot at this section's anchor (e.g. training)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS + [f"--user-data-dir={tempfile.mkdtemp()}", f"--window-size=1280,{args.height}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            driver.get(args.report.resolve().as_uri())
            while driver.execute_script("return document.body && document.body.dataset.charts") != "ready":
                time.sleep(0.02)
            times.append(time.perf_counter() - start)
        split = driver.execute_script("return document.body.dataset.chartsMs")
        print(f"{args.report}: {args.report.stat().st_size / 1e6:.2f} MB; charts drawn {statistics.median(times):.2f} s "
              f"after opening (median of {args.repeat}; plotly unpacked + charts drawn: {split} ms); CPU {_cpu()}")
        if args.shot:
            if args.section:
                driver.execute_script(f"document.getElementById('{args.section}').scrollIntoView()")
            png = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
            png.convert("RGB").quantize(colors=128).save(args.shot, optimize=True)
            print(f"screenshot: {args.shot} ({args.shot.stat().st_size / 1e3:.0f} kB)")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
