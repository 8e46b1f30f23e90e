"""The HTML report renders its plots in headless Chromium (Debian's `chromium`; .ci/run installs it when it can).

Checks the screenshot, not just the file: the embedded PNG plots must be decoded and drawn, which shows as
matplotlib's default line colour in the rendered page."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


def test_report_renders_plots_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    sys.path.insert(0, os.path.dirname(__file__))
    from test_analysis import traced_sliding_run

    traced_sliding_run(str(tmp_path))
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    subprocess.run([exe, "analyze", str(tmp_path / "slide"), "--out", str(tmp_path / "an"), "--quiet"], check=True)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1300,2400",
                    f"--screenshot={shot}", f"file://{tmp_path / 'an' / 'report.html'}"],
                   check=True, capture_output=True, timeout=120)
    img = mpimg.imread(shot)[:, :, :3]
    non_white = np.mean(img.sum(2) < 2.9)
    assert non_white > 0.02, "the page rendered (almost) blank"
    c0 = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour: only present if the plots drew
    assert np.count_nonzero(np.abs(img - c0).sum(2) < 0.08) > 200
