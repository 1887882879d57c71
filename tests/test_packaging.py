"""The wheel: one import package (``streamscore``), its console script runs from a clean venv
outside the checkout, its settings files are inside it; and the checkout imports nothing by the
bare folder names."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from streamscore.infra.jars import jars_root

# its module fixtures (a wheel, a clean venv) are built once, on one worker
pytestmark = pytest.mark.xdist_group("packaging")

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("jobs", "scoring", "registry_watch", "conf", "infra")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built the way ``streamscore submit`` builds it: from a clean copy of the checkout."""
    from streamscore.databricks import build_wheel

    return build_wheel(tmp_path_factory.mktemp("dist"))


def test_the_wheel_holds_one_import_package_with_its_settings_files(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"streamscore"}
    for module in (
        "jobs/cli.py",
        "jobs/submit.py",
        "scoring/udf.py",
        "registry_watch/watcher.py",
        "conf/settings.py",
        "infra/services.py",
        "lifecycle.py",
        "databricks.py",
        "errors.py",
    ):
        assert f"streamscore/{module}" in names
    assert {"streamscore/conf/defaults.yaml", "streamscore/conf/profiles/databricks.yaml"} <= set(names)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """The wheel alone in a clean venv outside the checkout: (venv, environment to run it, site-packages)."""
    tmp_path = tmp_path_factory.mktemp("clean")
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
    # the dependencies come from this interpreter's site-packages (no .pth processing there, so the
    # checkout's editable install is not visible); the working directory is not the checkout
    env = {**clean, "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    return venv, env, site


def test_console_script_runs_from_a_clean_venv_outside_the_checkout(installed, tmp_path):
    venv, env, site = installed
    py = venv / "bin" / "python"
    added = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__"}
    assert added == {"streamscore"}

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


@pytest.mark.heavy
@pytest.mark.integration
def test_the_exact_command_line_of_a_databricks_job_scores_rows_from_the_clean_venv(
    installed, wheel, make_settings, capsys, tmp_path
):
    """``submit --dry-run`` prints the job's parameters; the clean venv's ``streamscore`` runs
    exactly them (profile local, the tests' services) and scores every valid event."""
    import json

    from streamscore.demo import ensure_topic, produce_events, train_and_register
    from streamscore.jobs import submit

    venv, env, _ = installed
    s = make_settings()
    train_and_register(s.model.name, "v1", alias="champion")
    k = s.source.kafka
    ensure_topic(k.bootstrap_servers, k.topic)
    sent = produce_events(k.bootstrap_servers, k.topic, 200, malformed_every=20, prefix="wheel")
    local = {
        "app.home": str(tmp_path / "home"),
        "spark.master": "local[2]",
        "source.kafka.bootstrap_servers": k.bootstrap_servers,
        "source.kafka.topic": k.topic,
        "sink.output_path": s.output_path,
        "sink.dead_letter_path": s.dead_letter_path,
        "sink.checkpoint_path": s.checkpoint_path,
        "tracking.uri": s.tracking.uri,
        "model.name": s.model.name,
    }
    sets = [x for key, value in local.items() for x in ("--set", f"{key}={value}")]
    capsys.readouterr()  # what training printed
    code = submit.main(
        [
            *("stream", "--once", "--dry-run", "--profile", "local", "--wheel", str(wheel), *sets),
            *("--set", "databricks.wheel_dir=/Volumes/ml/streamscore/wheels", "--", "--available-now"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    (task,) = json.loads(out[: out.rindex("\n{")])["requests"][0]["body"]["tasks"]
    params = task["python_wheel_task"]["parameters"]
    assert params[:3] == ["stream", "--profile", "local"] and params[-1] == "--available-now"
    env = {**env, "JAVA_HOME": os.environ.get("JAVA_HOME", ""), "STREAMSCORE_JARS_DIR": str(jars_root())}
    run = subprocess.run(
        [str(venv / "bin" / task["python_wheel_task"]["entry_point"]), *params],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["status"] == "FINISHED" and summary["rows_scored"] == sent.valid
    assert summary["rows_dead_lettered"] == sent.malformed
