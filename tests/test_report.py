"""report: HTML + PNG charts, numbers equal to stats/what-if, rendered by a headless browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import det_floats

import deltackpt
from deltackpt.cli import main
from deltackpt.report import change_matrix, report
from deltackpt.stats import snapshot
from deltackpt.whatif import Policy, whatif

torch.set_num_threads(1)
pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")

CHARTS = ["cumulative.png", "per_save.png", "heatmap.png", "whatif.png"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = os.path.join(tmp_path_factory.mktemp("report"), "store")
    w, m = det_floats((64, 256), 1), det_floats((64, 256), 2)
    with deltackpt.open(path, block_size=4096) as s:
        for i, step in enumerate(range(0, 120, 10)):
            w[: 4 * (i % 4)] += 0.01
            m *= 0.9
            state = {"model": {"w": w.clone(), "b": det_floats((30,), 3)},
                     "optimizer": {"exp_avg": m.clone()}}
            if step >= 60:
                state["model"]["late"] = det_floats((100,), i)
            s.save(state, step)
    return path


def test_report_files_and_numbers(store_dir, tmp_path):
    out = tmp_path / "r"
    with deltackpt.open(store_dir) as s:
        r = report(s, out, price_per_gb_month=0.05, policies=[Policy("keep_last", 2)])
        expected = whatif(s, [Policy("keep_last", 2)], 0.05)
        m, labels = change_matrix(snapshot(s))
    assert r.files == [str(out / "index.html")] + [str(out / c) for c in CHARTS]
    for f in r.files[1:]:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(f) > 5000
    assert r.whatif == expected
    page = (out / "index.html").read_text()
    for c in CHARTS:
        assert f"src='{c}'" in page
    assert "keep last 2" in page and "$0.05/GB" in page and "optimizer/exp_avg" in page
    # the heat-map: the optimizer moments change wholly every step, "late" is absent early
    assert labels == ["model/b", "model/late", "model/w", "optimizer/exp_avg"]
    assert np.all(m[3, 1:] == 1.0) and np.all(np.isnan(m[1, :6])) and m[1, 6] == 1.0
    assert np.all(m[0, 1:] == 0.0)
    assert not list(out.glob("*.partial"))


def test_report_refuses_an_empty_store_and_a_file(tmp_path, store_dir):
    with deltackpt.open(tmp_path / "empty") as s, pytest.raises(deltackpt.DeltackptError,
                                                                 match="no steps"):
        report(s, tmp_path / "r")
    (tmp_path / "f").write_text("x")
    with deltackpt.open(store_dir) as s, pytest.raises(deltackpt.DeltackptError,
                                                        match="not a directory"):
        report(s, tmp_path / "f")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_report(store_dir, tmp_path):
    r = run("report", store_dir, "-o", tmp_path / "r", "--keep-last", 3, "--save-every", 20,
            "--price", 0.1, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [w["policy"] for w in data["whatif"]] == ["keep all (now)", "keep last 3",
                                                      "save every 20"]
    assert len(data["files"]) == 5
    r = run("report", store_dir, "-o", tmp_path / "r2", "-q")
    assert r.exit_code == 0 and "keep last 1" in r.stdout and "wrote" in r.stdout


@pytest.mark.parametrize("args,fragment", [
    (("--price", -1), "--price"),
    (("--keep-last", 0), "--keep-last"),
    (("--save-every", "x"), "--save-every"),
])
def test_cli_report_bad_arguments(store_dir, tmp_path, args, fragment):
    r = run("report", store_dir, "-o", tmp_path / "r", *args)
    assert r.exit_code == 2 and fragment in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_browser() is None,
                    reason="no headless browser (apt-get install chromium) to render the page")
def test_report_renders_in_a_headless_browser(store_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "r"
    with deltackpt.open(store_dir) as s:
        report(s, out)
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2600",
                    (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (2600, 1200)
    # the charts' blue (#4c72b0) appears only if the page loaded the PNGs
    blue = np.all(np.abs(img - np.array([0x4C, 0x72, 0xB0]) / 255) < 0.03, axis=-1)
    assert blue.sum() > 2000
