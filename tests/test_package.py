"""pyproject.toml: a wheel builds (offline, with the venv's setuptools), holds the package, app.py and the
assets, and its `telugu-agent` command starts the same server as `python app.py`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests

from app_helpers import AppProcess
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def runtime_requirements() -> list[str]:
    """requirements.txt's runtime section: the lines before its first comment after the header."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    runtime = []
    for line in lines[1:]:
        if line.startswith("#"):
            break
        runtime.append(line.split("#")[0].strip())
    return [line for line in runtime if line]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the tree (the build leaves build/ and *.egg-info behind)."""
    source = tmp_path_factory.mktemp("source")
    for name in ["pyproject.toml", "README.md", "LICENSE", "app.py"]:
        shutil.copy(ROOT / name, source / name)
    for folder in ["agent", "assets"]:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_package_wheel_holds_the_code_and_the_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "agent").rglob("*.py") if "__pycache__" not in p.parts}
    assert sources and sources <= names, sorted(sources - names)
    assert "app.py" in names
    assets = {p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert {"catalogue.json", "style.css"} <= assets
    assert {f"agent/assets/{a}" for a in assets} <= names, sorted({f"agent/assets/{a}" for a in assets} - names)
    assert not any(n.startswith(("tests/", "assets/", "docs/", "runpod/")) for n in names), sorted(names)


def test_package_metadata_matches_requirements(wheel):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # one set of runtime pins: pyproject's are requirements.txt's (which README installs from)
    assert sorted(project["dependencies"]) == sorted(runtime_requirements())
    assert {"datasets", "yt-dlp", "tensorboard"} <= set(project["optional-dependencies"]["train"])
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^telugu-agent = app:main$", entry_points, re.M), entry_points


@pytest.mark.slow
def test_package_console_script_serves_the_page(wheel, tmp_path):
    """Installed away from the checkout, `telugu-agent` takes app.py's flags, finds its assets and serves."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = target / "bin" / "telugu-agent"
    env = dict(os.environ, PYTHONPATH=str(target), NO_TORCH_COMPILE="1", GRADIO_ANALYTICS_ENABLED="False")
    run = tmp_path / "run"  # not the checkout: `app` and `agent` come from the installed wheel
    run.mkdir()

    def help_text(command: list[str]) -> str:
        out = subprocess.run(command + ["--help"], cwd=run, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    flags = set(re.findall(r"--[a-z][a-z-]+", help_text([str(script)])))
    assert flags == set(re.findall(r"--[a-z][a-z-]+", help_text([sys.executable, str(ROOT / "app.py")])))
    assert {"--share", "--auth", "--model", "--max-calls-per-client"} <= flags

    port = free_port()
    app = AppProcess(["--model", "tiny", "--device", "cpu", "--max-sessions", "1", "--port", str(port),
                      "--drain-seconds", "1"], cwd=run, env=env, command=[str(script)])
    try:
        assert app.wait_for("Uvicorn running", timeout=240), app.output[-3000:]
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 200 and health.json()["random_weights"] is True
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=10).text
        assert "#random-banner" in page  # the stylesheet came from the installed agent/assets/style.css
        where = subprocess.run([sys.executable, "-c", "import agent; print(agent.ASSETS)"], cwd=run, env=env,
                               capture_output=True, text=True, timeout=120).stdout.strip()
        assert Path(where) == target / "agent" / "assets"
    finally:
        code = app.stop()
    assert code == 0, app.output[-3000:]
