"""Session fixtures: one real Kafka broker, one real MLflow server and one metastore (shared by the
pytest-xdist workers), one SparkSession per worker (local mode with the Kafka connector and Delta),
all on free loopback ports under temporary state folders."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# Spark's Python workers import test helpers (e.g. broken models) by module name
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

_counter = itertools.count()


def _checkout_changes() -> set[str] | None:
    """``git status --porcelain`` lines of the checkout (None outside a git work tree)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


# what makes a test an integration test: the mark, or one of the shared services' fixtures
SERVICE_FIXTURES = {"services", "tracking", "spark", "make_settings"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Two tiers, by what a test needs: ``unit`` (no services, no Spark session) runs first, in
    seconds; then ``integration``, which shares the session's broker, MLflow server, metastore and
    SparkSession (started by the first test that asks for them). Under pytest-xdist the workers
    share the services (see SHARED_SERVICES), each has its own SparkSession, and the order is
    longest first (see _distributed_order)."""
    for item in items:
        needs = SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))
        if needs and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)
    if hasattr(config, "workerinput"):  # one of pytest-xdist's workers (the same order in each)
        items.sort(key=_distributed_order)
    else:
        items.sort(key=lambda item: item.get_closest_marker("integration") is not None)  # stable: file order kept


def _distributed_order(item: pytest.Item) -> int:
    """Run in parallel (``-n``, the default in pyproject.toml), the longest tests go out first and
    the unit tier last: the workers finish together instead of one waiting on a late long test."""
    if item.get_closest_marker("heavy") is not None:
        return 0
    return 1 if item.get_closest_marker("integration") is not None else 2


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _checkout_changes()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The test run must leave the checkout as it found it (outputs go to temporary folders)."""
    before, after = session.config.stash.get(_BEFORE, None), _checkout_changes()
    if before is None or after is None:
        return
    new = sorted(after - before)
    if new:
        print("\nthe test run changed the checkout:\n  " + "\n  ".join(new), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_BEFORE = pytest.StashKey[set[str] | None]()


# settings the tests must not inherit from the shell that runs them (infrastructure variables such
# as STREAMSCORE_JARS_DIR stay)
_SETTINGS_VARIABLES = ("STREAMSCORE_PROFILE", "STREAMSCORE_CONFIG", "STREAMSCORE_HOME")


@pytest.fixture(autouse=True)
def isolated_state(monkeypatch):
    """Each test starts without the caller's STREAMSCORE_* settings, and leaves MLflow's
    process-wide tracking and registry URIs as it found them (a job sets them from its settings)."""
    import mlflow

    for name in list(os.environ):
        if name in _SETTINGS_VARIABLES or (name.startswith("STREAMSCORE_") and "__" in name):
            monkeypatch.delenv(name)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    from streamscore import logs

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # a command run in-process sets up its logging
    log_setup = logs.current()
    yield
    logs.restore(log_setup)
    for h in set(root.handlers) - set(handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    logging.captureWarnings(False)
    from streamscore import credentials

    credentials.clear()
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])
    if before[2] is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before[2]


@pytest.fixture(scope="session", autouse=True)
def mlflow_default_outside_checkout(tmp_path_factory):
    """MLflow's default store is ``mlflow.db`` / ``mlruns`` in the working directory. Until a test
    says where to track (the ``tracking`` fixture, or a job's settings), anything logged goes to a
    temporary folder, never into the checkout."""
    store = tmp_path_factory.mktemp("mlflow-default")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    return os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streamscore-home")


# the shared services by name: how many ports each takes, and the service on those ports
SERVICE_PORTS = {"kafka": 2, "mlflow": 1, "metastore": 1}


def _service(name: str, home: Path, ports: list[int]):
    from streamscore.infra.services import KafkaService, MetastoreService, MlflowService

    return {"kafka": KafkaService, "mlflow": MlflowService, "metastore": MetastoreService}[name](home, *ports)


def _start_services(home: Path) -> dict[str, list[int]]:
    """A Kafka broker, an MLflow server and a metastore under ``home``, side by side (the caller
    waits for the slowest only); their ports by name. Those that started are stopped when one fails."""
    from concurrent.futures import ThreadPoolExecutor

    from streamscore.infra.services import start_on_free_ports

    def start(name: str) -> list[int]:
        chosen: list[int] = []  # the ports of the attempt that started (start_on_free_ports may retry)

        def make(ports: list[int]):
            chosen[:] = ports
            return _service(name, home, ports)

        start_on_free_ports(make, SERVICE_PORTS[name])
        return chosen

    with ThreadPoolExecutor(len(SERVICE_PORTS)) as pool:
        futures = {name: pool.submit(start, name) for name in SERVICE_PORTS}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for name, f in futures.items():
            if f.exception() is None:
                _service(name, home, f.result()).stop()
        raise failed[0]  # type: ignore[misc]
    return {name: f.result() for name, f in futures.items()}


def _service_objects(home: Path, ports: dict[str, list[int]]) -> dict:
    return {name: _service(name, home, ports[name]) for name in SERVICE_PORTS}


def _stop_services(home: Path, ports: dict[str, list[int]]) -> None:
    for service in reversed(list(_service_objects(home, ports).values())):
        service.stop()


# Under pytest-xdist the workers share one set of services: the controller names a folder
# (pytest_configure, inherited by the workers it spawns), the first worker that needs the services
# starts them there, each counts itself in and out under a file lock, the last one out stops them,
# and the controller stops whatever a crashed worker left.
SHARED_SERVICES = "STREAMSCORE_TESTS_SHARED_SERVICES"


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        import tempfile

        os.environ[SHARED_SERVICES] = tempfile.mkdtemp(prefix="streamscore-tests-")


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = os.environ.get(SHARED_SERVICES)
    if shared and not hasattr(config, "workerinput"):
        import shutil

        state = Path(shared) / "services.json"
        if state.exists():
            info = json.loads(state.read_text())
            _stop_services(Path(info["home"]), info["ports"])
        shutil.rmtree(shared, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def services(home):
    shared = os.environ.get(SHARED_SERVICES)
    if not shared:
        ports = _start_services(home)
        try:
            yield _addresses(home, ports)
        finally:
            _stop_services(home, ports)
        return
    lock, state = Path(shared) / "services.lock", Path(shared) / "services.json"
    with _locked(lock):
        if state.exists():
            info = json.loads(state.read_text())
        else:
            info = {"home": str(Path(shared) / "home"), "ports": _start_services(Path(shared) / "home"), "users": 0}
        info["users"] += 1
        state.write_text(json.dumps(info))
    try:
        yield _addresses(Path(info["home"]), info["ports"])
    finally:
        with _locked(lock):
            info = json.loads(state.read_text())
            info["users"] -= 1
            if info["users"]:
                state.write_text(json.dumps(info))
            else:
                _stop_services(Path(info["home"]), info["ports"])
                state.unlink()


def _addresses(home: Path, ports: dict[str, list[int]]) -> dict[str, str]:
    """Each service's address by its name, and its log file as ``<name>_log``."""
    out = {}
    for name, service in _service_objects(home, ports).items():
        out[name], out[f"{name}_log"] = service.address, str(service.log_file)
    return out


@pytest.fixture(scope="session")
def tracking(services):
    import mlflow

    mlflow.set_tracking_uri(services["mlflow"])
    mlflow.set_registry_uri(services["mlflow"])
    os.environ["MLFLOW_TRACKING_URI"] = services["mlflow"]
    return services["mlflow"]


@pytest.fixture(scope="session")
def spark(services, home):
    from streamscore.conf.settings import load_settings
    from streamscore.spark import build_spark

    # connected to the tests' metastore: tests read named tables with this session
    catalog = {"metastore": services["metastore"], "connect": "always"}
    settings = load_settings(
        "local", overrides={"app": {"home": str(home)}, "spark": {"master": "local[2]"}, "catalog": catalog}
    )
    session = build_spark(settings)
    yield session
    session.stop()


@pytest.fixture
def make_settings(services, tracking, home, tmp_path):
    """Settings for one test: its own topic, tables, checkpoint and model name."""
    from streamscore.conf.settings import load_settings
    from tests.helpers import unique

    def make(name: str | None = None, **sections):
        n = next(_counter)
        base = {
            "app": {"home": str(home)},
            "spark": {"master": "local[2]"},
            "source": {"kafka": {"bootstrap_servers": services["kafka"], "topic": unique(f"t{n}")}},
            "sink": {
                "output_path": str(tmp_path / f"scored{n}"),
                "dead_letter_path": str(tmp_path / f"dead{n}"),
                "checkpoint_path": str(tmp_path / f"cp{n}"),
            },
            # one step per batch: tests count steps against batch ids (windows: tests/test_run_rotation.py)
            "tracking": {"uri": services["mlflow"], "experiment": "streamscore-tests", "metrics_interval_s": 0},
            "catalog": {"metastore": services["metastore"]},
            # many of the tests' models are custom python_model classes (pickled): the loading
            # policy's default refuses them (tests/test_policy.py checks that default)
            "model": {"name": name or unique(f"iris-test-{n}"), "allow_pickle": True},
            "trigger": {"processing_time": "1 second"},
            "watch": {"poll_interval_s": 0.5},
        }
        for section, values in sections.items():
            base.setdefault(section, {})
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(base[section].get(k), dict):
                    base[section][k] = {**base[section][k], **v}
                else:
                    base[section][k] = v
        return load_settings("local", overrides=base)

    return make


@pytest.fixture
def own_broker(home):
    """A Kafka broker of the test's own, for a test that stops it (:func:`tests.helpers.private_broker`)."""
    from tests.helpers import private_broker, unique

    broker = private_broker(home, unique("broker"))
    yield broker
    broker.stop()
