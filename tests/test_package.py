"""`pip install .` and `pip install -e .` both expose dsa_otel.model / .exporters / .runners / .proto."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPACKAGES = ("dsa_otel.model", "dsa_otel.exporters", "dsa_otel.runners", "dsa_otel.proto")


def test_regular_install_maps_top_level_folders(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), ROOT], check=True)
    for pkg in SUBPACKAGES:
        assert (target / pkg.replace(".", "/") / "__init__.py").is_file(), pkg
    assert not (target / "model").exists() and not (target / "exporters").exists()  # no bare top-level packages
    assert (target / "dsa_otel" / "proto" / "dsa_trace.proto").is_file()
    code = "import dsa_otel, dsa_otel.exporters, dsa_otel.model, dsa_otel.runners; print(dsa_otel.exporters.__file__)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().startswith(str(target))


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), ROOT], check=True)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    for pkg in SUBPACKAGES:
        assert pkg.replace(".", "/") + "/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)


def test_editable_install_resolves_to_the_checkout(tmp_path):
    # CI installs with `pip install -e .`; from outside the checkout the subpackages map to its folders
    code = "import dsa_otel.exporters as e, dsa_otel.model as m; print(e.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == os.path.join(ROOT, "exporters", "__init__.py")
    assert out[1] == os.path.join(ROOT, "model", "__init__.py")


def test_console_script_runs_the_demo(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    res = subprocess.run([exe, "demo", "--out", str(tmp_path), "--num-requests", "4", "--steps", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    # tiny model: 4 requests x 2 decode steps (the first new token comes from prefill) x 3 layers
    assert "records: 24" in res.stdout and "unique_blocks" in res.stdout and "report.html" in res.stdout
    assert (tmp_path / "demo" / "block16" / "summary.json").is_file()
    assert (tmp_path / "demo" / "analysis" / "report.html").is_file()
    syn = subprocess.run([exe, "demo", "--synthetic", "--out", str(tmp_path / "s"), "--num-requests", "4",
                          "--steps", "3", "--layers", "2", "--prompt-len", "512", "--no-analyze"],
                         capture_output=True, text=True, timeout=120)
    assert syn.returncode == 0 and "records: 24" in syn.stdout
    assert (tmp_path / "s" / "demo" / "block64" / "summary.json").is_file()
    bad = subprocess.run([exe, "demo", "--out", str(tmp_path), "--kv-block-size", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "kv_block_size" in bad.stderr
