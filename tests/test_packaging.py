"""The wheel: one import package (``streamscore``), its console script runs from a clean venv
outside the checkout, its settings files are inside it; and the checkout imports nothing by the
bare folder names."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("jobs", "scoring", "registry_watch", "conf", "infra")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "streamscore"
    skip = shutil.ignore_patterns(
        ".git",
        ".venv",
        ".streamscore",
        "build",
        "dist",
        "*.egg-info",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        ".mypy_cache",
    )
    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (found,) = out.glob("streamscore-*.whl")
    return found


def test_the_wheel_holds_one_import_package_with_its_settings_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"streamscore"}
    for module in (
        "jobs/cli.py",
        "scoring/udf.py",
        "registry_watch/watcher.py",
        "conf/settings.py",
        "infra/services.py",
        "lifecycle.py",
        "errors.py",
    ):
        assert f"streamscore/{module}" in names
    assert {"streamscore/conf/defaults.yaml", "streamscore/conf/profiles/databricks.yaml"} <= set(names)


def test_console_script_runs_from_a_clean_venv_outside_the_checkout(wheel, tmp_path):
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH pointing at the checkout
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=clean)
    py = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    added = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert added == {"streamscore"}

    # the dependencies come from this interpreter's site-packages (no .pth processing there, so the
    # checkout's editable install is not visible); the working directory is not the checkout
    env = {**clean, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    run = subprocess.run(
        [str(venv / "bin" / "streamscore"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "backfill" in run.stdout and "stream" in run.stdout
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import streamscore.scoring.udf as m, streamscore.conf.settings as s; "
            "print(m.__file__); print(s.load_settings('databricks').tracking.uri)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    module_file, uri = where.stdout.split()
    assert module_file.startswith(str(site)) and uri == "databricks"


def test_nothing_imports_the_folders_by_their_bare_names():
    offenders = []
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in (".venv", "build", ".git"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] in FOLDERS]
    assert offenders == []
