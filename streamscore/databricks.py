"""Databricks jobs built from the settings: one definition serves ``streamscore submit`` (through
the official ``databricks-sdk``) and ``streamscore bundle`` (the resources of a Databricks Asset
Bundle), so the two cannot drift.

Each job has one task that runs the project's wheel (``python_wheel_task``: package
``streamscore``, entry point ``streamscore``) with the same subcommand and settings as a local run
(``stream|backfill --profile <profile> --set ...``). The stream runs on a job cluster in continuous
mode (serverless jobs only allow available-now triggers); a backfill runs on a job cluster or on
serverless compute. Databricks Runtime 18 brings Spark 4.1, Delta and the Kafka connector, so the
wheel is installed without the local Spark extra and no jars are added.

Credentials never pass through here: the SDK authenticates in its own ways (environment, a
``~/.databrickscfg`` profile, Azure service principal / CLI), and the job cluster's environment may
hold credentials only as ``{{secrets/<scope>/<key>}}`` references (checked by the settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamscore.conf.settings import CREDENTIAL_KEY
from streamscore.errors import ConfigError, StreamscoreError, UsageError

if TYPE_CHECKING:
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.service import compute, jobs

    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)

PACKAGE = "streamscore"
ENTRY_POINT = "streamscore"
COMMANDS = ("stream", "backfill")
CLUSTER_KEY = "main"
ENVIRONMENT_KEY = "default"
BUNDLE_WHEEL = "../dist/*.whl"  # the bundle's own build of the wheel, relative to resources/
TERMINAL = {"TERMINATED", "SKIPPED", "INTERNAL_ERROR"}


class WorkspaceError(StreamscoreError):
    """The workspace refused a request (its own message is kept)."""


@dataclass(frozen=True)
class JobSpec:
    """What a job runs: the subcommand, the settings it runs with, and its own arguments."""

    command: str
    profile: str
    overrides: tuple[str, ...] = ()
    job_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.command not in COMMANDS:
            raise UsageError(f"submit: the command must be one of {', '.join(COMMANDS)}, not {self.command!r}")
        for item in self.job_overrides():
            key = item.split("=", 1)[0]
            if CREDENTIAL_KEY.search(key):
                raise UsageError(
                    f"submit: --set {key}=... would put a credential into the job's definition; give it to "
                    f"the job cluster as a secret reference instead: --set "
                    f"databricks.env.STREAMSCORE_{key.upper().replace('.', '__')}={{{{secrets/<scope>/<key>}}}}"
                )

    def job_overrides(self) -> list[str]:
        """The ``--set`` options the job runs with: all but ``databricks.*``, which shape the job
        itself (cluster, environment, wheel folder) and are used here; the Unity Catalog location
        (``databricks.catalog_name``, ``schema_name``, ``volume_name``) places the job's tables and
        checkpoints, so the job gets it too."""
        return [item for item in self.overrides if not item.strip().startswith("databricks.") or _uc_location(item)]

    def parameters(self) -> list[str]:
        sets = [x for item in self.job_overrides() for x in ("--set", item)]
        return [self.command, "--profile", self.profile, *sets, *self.job_args]


def _uc_location(item: str) -> bool:
    key = item.split("=", 1)[0].strip()
    return key in ("databricks.catalog_name", "databricks.schema_name", "databricks.volume_name")


def _extra_requirements(extra: str) -> list[str]:
    """The pinned requirements of one of the project's extras (pyproject.toml is the one source)."""
    try:
        requires = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return []
    out = []
    for req in requires:
        spec, _, marker = req.partition(";")
        if re.search(rf"extra\s*==\s*['\"]{extra}['\"]", marker):
            out.append(spec.strip())
    return out


def _uses_azureml(settings: Settings) -> bool:
    t = settings.tracking
    uris = [t.uri or "", t.registry_uri or "", t.mirror_uri or ""]
    return t.azure.is_set() or any(u.startswith("azureml://") for u in uris)


def _pypi(settings: Settings) -> list[str]:
    return _extra_requirements("azure") if _uses_azureml(settings) else []


def _wheel_task(spec: JobSpec) -> jobs.PythonWheelTask:
    from databricks.sdk.service import jobs

    return jobs.PythonWheelTask(package_name=PACKAGE, entry_point=ENTRY_POINT, parameters=spec.parameters())


def _cluster(settings: Settings) -> compute.ClusterSpec:
    from databricks.sdk.service import compute

    d = settings.databricks
    return compute.ClusterSpec(
        spark_version=d.spark_version,
        node_type_id=d.node_type_id,
        num_workers=d.num_workers,
        policy_id=d.policy_id,
        apply_policy_default_values=True if d.policy_id else None,
        data_security_mode=compute.DataSecurityMode.SINGLE_USER,
        spark_conf=dict(d.spark_conf) or None,
        spark_env_vars=dict(d.env) or None,
    )


def _libraries(settings: Settings, wheel: str) -> list[compute.Library]:
    from databricks.sdk.service import compute

    return [compute.Library(whl=wheel)] + [
        compute.Library(pypi=compute.PythonPyPiLibrary(package=p)) for p in _pypi(settings)
    ]


def _serverless(settings: Settings, spec: JobSpec) -> bool:
    if spec.command == "stream":
        return False  # continuous streams need a job cluster
    return settings.databricks.backfill_compute == "serverless"


def _environment(settings: Settings, wheel: str) -> jobs.JobEnvironment:
    from databricks.sdk.service import compute, jobs

    return jobs.JobEnvironment(
        environment_key=ENVIRONMENT_KEY,
        spec=compute.Environment(
            environment_version=settings.databricks.serverless_environment_version,
            dependencies=[wheel, *_pypi(settings)],
        ),
    )


def job_name(settings: Settings, spec: JobSpec) -> str:
    return f"{settings.databricks.job_name_prefix}-{spec.command}-{settings.model.name}"


def job_settings(settings: Settings, spec: JobSpec, wheel: str) -> jobs.JobSettings:
    """The named job (jobs/create, jobs/reset, and the bundle's resource)."""
    from databricks.sdk.service import jobs

    serverless = _serverless(settings, spec)
    task = jobs.Task(task_key=spec.command, python_wheel_task=_wheel_task(spec))
    if serverless:
        task.environment_key = ENVIRONMENT_KEY
    else:
        task.job_cluster_key = CLUSTER_KEY
        task.libraries = _libraries(settings, wheel)
    return jobs.JobSettings(
        name=job_name(settings, spec),
        tasks=[task],
        job_clusters=None
        if serverless
        else [jobs.JobCluster(job_cluster_key=CLUSTER_KEY, new_cluster=_cluster(settings))],
        environments=[_environment(settings, wheel)] if serverless else None,
        continuous=jobs.Continuous(pause_status=jobs.PauseStatus.UNPAUSED) if spec.command == "stream" else None,
        max_concurrent_runs=1,
        tags={"streamscore-command": spec.command, "streamscore-model": settings.model.name},
    )


def job_locations(settings: Settings, command: str, job_args: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Where the job will write (tables by name or path, the stream's checkpoint), as the job's
    own settings resolve them: what ``submit --dry-run`` shows before anything is sent."""
    if command == "stream":
        out = {
            "output_table": str(settings.output_table),
            "dead_letter_table": str(settings.dead_letter_table),
            "checkpoint": settings.checkpoint_path,
        }
        if settings.watch.shadow_ref is not None:
            out["shadow_table"] = str(settings.shadow_table)
        return out
    from streamscore.jobs.backfill import build_parser, request_from_args

    request = request_from_args(build_parser(None).parse_args(list(job_args)))
    return {
        "output_table": str(settings.table(request.output_table, request.output_path, "backfill")),
        "dead_letter_table": str(
            settings.table(request.dead_letter_table, request.dead_letter_path, "backfill_dead_letter")
        ),
    }


def submit_body(settings: Settings, spec: JobSpec, wheel: str) -> dict[str, Any]:
    """The body of a one-time run (jobs/runs/submit), idempotency token included: the same request
    (same wheel content, same settings) carries the same token, so a retried submit starts one run."""
    from databricks.sdk.service import jobs

    serverless = _serverless(settings, spec)
    task = jobs.SubmitTask(task_key=spec.command, python_wheel_task=_wheel_task(spec))
    if serverless:
        task.environment_key = ENVIRONMENT_KEY
    else:
        task.new_cluster = _cluster(settings)
        task.libraries = _libraries(settings, wheel)
    body: dict[str, Any] = {"run_name": job_name(settings, spec) + "-once", "tasks": [task.as_dict()]}
    if serverless:
        body["environments"] = [_environment(settings, wheel).as_dict()]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    body["idempotency_token"] = f"streamscore-{digest[:40]}"
    return body


# -- the wheel -------------------------------------------------------------------------------------


def source_root() -> Path | None:
    """The checkout this package runs from (editable install), if any."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "streamscore").is_dir() else None


_NOT_SOURCE = (".git", ".venv", ".streamscore", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def build_wheel(out_dir: Path) -> Path:
    """The project's wheel, built from a copy of the checkout without its build leftovers (a stale
    ``build/`` folder would otherwise put files removed since into the wheel)."""
    import importlib.util
    import shutil

    root = source_root()
    if root is None:
        raise UsageError("submit: not running from a checkout; build the wheel and pass it with --wheel PATH")
    src = Path(tempfile.mkdtemp(prefix="streamscore-src-")) / "streamscore"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out_dir), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        command.insert(4, "--no-build-isolation")  # the build backend is here: no download needed
    proc = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(src.parent, ignore_errors=True)
    wheels = sorted(out_dir.glob(f"{PACKAGE}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise StreamscoreError(f"building the wheel failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return wheels[-1]


def wheel_target(settings: Settings, wheel: Path) -> str:
    """Upload path: under a folder named by the wheel's content, so a changed build never reuses a
    path a cluster has already installed from."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()[:12]
    return f"{settings.wheel_dir.rstrip('/')}/{digest}/{wheel.name}"


# -- the workspace -----------------------------------------------------------------------------------


def workspace_client() -> WorkspaceClient:
    """The SDK's client with its own authentication chain; a clear error when nothing is set up."""
    try:
        from databricks.sdk import WorkspaceClient
        from databricks.sdk.core import Config
    except ImportError:
        raise ConfigError("submit needs the databricks-sdk package (pip install 'streamscore[databricks]')") from None
    try:
        # the plain Files API upload (one PUT), not the multipart client
        return WorkspaceClient(config=Config(disable_experimental_files_api_client=True))
    except ValueError as e:
        raise ConfigError(
            "Databricks credentials not found: set DATABRICKS_HOST with DATABRICKS_TOKEN (or a service "
            "principal: DATABRICKS_CLIENT_ID/DATABRICKS_CLIENT_SECRET, or ARM_CLIENT_ID/ARM_TENANT_ID/"
            f"ARM_CLIENT_SECRET on Azure), or a ~/.databrickscfg profile (DATABRICKS_CONFIG_PROFILE). ({e})"
        ) from None


def _workspace_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from databricks.sdk.errors import DatabricksError

    try:
        return fn(*args, **kwargs)
    except DatabricksError as e:
        code = getattr(e, "error_code", None) or type(e).__name__
        raise WorkspaceError(f"{what}: the workspace answered {code}: {e}") from None


def upload_wheel(w: WorkspaceClient, wheel: Path, target: str) -> None:
    with open(wheel, "rb") as f:
        _workspace_call(f"uploading the wheel to {target}", w.files.upload, target, f, overwrite=True)


def find_job(w: WorkspaceClient, name: str) -> int | None:
    found = [j for j in _workspace_call(f"listing jobs named {name!r}", lambda: list(w.jobs.list(name=name)))]
    exact = [j for j in found if j.settings and j.settings.name == name]
    if len(exact) > 1:
        raise WorkspaceError(f"{len(exact)} jobs are named {name!r}; delete all but one")
    return exact[0].job_id if exact else None


def create_or_reset(w: WorkspaceClient, settings_: jobs.JobSettings) -> tuple[int, str]:
    assert settings_.name is not None
    job_id = find_job(w, settings_.name)
    if job_id is None:
        created = _workspace_call("creating the job", w.jobs.create, **_kwargs(settings_))
        return int(created.job_id), "created"
    _workspace_call(f"updating job {job_id}", w.jobs.reset, job_id, settings_)
    return job_id, "updated"


def _kwargs(settings_: jobs.JobSettings) -> dict[str, Any]:
    return {k: v for k, v in vars(settings_).items() if v is not None}


def submit_once(w: WorkspaceClient, body: dict[str, Any]) -> int:
    from databricks.sdk.service import jobs

    waiter = _workspace_call(
        "submitting the run",
        w.jobs.submit,
        run_name=body["run_name"],
        tasks=[jobs.SubmitTask.from_dict(t) for t in body["tasks"]],
        environments=[jobs.JobEnvironment.from_dict(e) for e in body.get("environments", [])] or None,
        idempotency_token=body["idempotency_token"],
    )
    return int(waiter.run_id)


def run_now(w: WorkspaceClient, job_id: int) -> int:
    waiter = _workspace_call(f"starting job {job_id}", w.jobs.run_now, job_id)
    return int(waiter.run_id)


def run_state(w: WorkspaceClient, run_id: int) -> dict[str, Any]:
    run = _workspace_call(f"reading run {run_id}", w.jobs.get_run, run_id)
    state = run.state
    return {
        "run_id": run_id,
        "run_page_url": run.run_page_url,
        "life_cycle_state": state.life_cycle_state.value if state and state.life_cycle_state else None,
        "result_state": state.result_state.value if state and state.result_state else None,
        "state_message": state.state_message if state else None,
    }


def wait_for_run(w: WorkspaceClient, run_id: int, poll_s: float, timeout_s: float | None) -> dict[str, Any]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        state = run_state(w, run_id)
        if state["life_cycle_state"] != last:
            log.info("run %s: %s", run_id, state["life_cycle_state"])
            last = state["life_cycle_state"]
        if state["life_cycle_state"] in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            state["timed_out"] = True
            return state
        time.sleep(poll_s)


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="streamscore-wheel-"))
