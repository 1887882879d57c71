"""Local services, real ones: a single-node KRaft Kafka broker, an MLflow tracking server and the
Hive metastore that holds the table names (the local catalog, see :class:`MetastoreService`).

Each service keeps its state under ``<home>/services/<name>/`` (data, ``<name>.log``, ``<name>.pid``).
``start`` is idempotent (a running service is left alone), ``stop`` terminates the process group,
``status`` reports pid, port and health. Ports come from the arguments or from
``STREAMSCORE_KAFKA_PORT`` / ``STREAMSCORE_MLFLOW_PORT`` / ``STREAMSCORE_METASTORE_PORT``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from streamscore.infra import jars

log = logging.getLogger(__name__)

S = TypeVar("S", bound="Service")

DEFAULT_KAFKA_PORT = int(os.environ.get("STREAMSCORE_KAFKA_PORT", "9092"))
DEFAULT_MLFLOW_PORT = int(os.environ.get("STREAMSCORE_MLFLOW_PORT", "5055"))
DEFAULT_METASTORE_PORT = int(os.environ.get("STREAMSCORE_METASTORE_PORT", "9083"))


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now (each socket is held until all are chosen, so none
    repeats). Another process may still take one before the service binds it: see
    :func:`start_on_free_ports`."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_on_free_ports(make: Callable[[list[int]], S], n_ports: int, timeout: float = 180, attempts: int = 3) -> S:
    """``make(ports)`` a service on fresh free ports and start it; when it cannot start (another
    process took a port between the choice and the bind), stop it and try again on new ports."""
    for attempt in range(1, attempts + 1):
        service = make(free_ports(n_ports))
        try:
            service.start(timeout=timeout)
            return service
        except RuntimeError:
            service.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still answers kill(0); treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Service:
    name: str
    home: Path
    port: int

    @property
    def dir(self) -> Path:
        return self.home / "services" / self.name

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The service's process, or None. The pid file holds the pid and the process's start time:
        a stale file whose pid now belongs to another process (after a reboot, or pid reuse) is not
        trusted, so ``stop`` never signals an unrelated process group."""
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _pid_alive(pid):
            return None
        started = fields[1] if len(fields) > 1 else None
        if started is None or started != _start_time(pid):
            log.warning(
                "%s: pid file %s names process %d, which is not this service; ignored", self.name, self.pid_file, pid
            )
            return None
        try:
            if os.getpgid(pid) != pid:  # the service leads its own process group (start_new_session)
                return None
        except ProcessLookupError:
            return None
        return pid

    # -- to be provided by subclasses -----------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def prepare(self) -> None:
        pass

    def healthy(self) -> bool:
        return port_open(self.port)

    @property
    def address(self) -> str:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> dict:
        pid = self.pid()
        if pid and self.healthy():
            return self.status() | {"action": "already running"}
        if pid is None and port_open(self.port):
            raise RuntimeError(f"{self.name}: port {self.port} is taken by another process; choose another port")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        if pid is None:
            with open(self.log_file, "ab") as logf:
                proc = subprocess.Popen(
                    self.command(),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env(),
                    cwd=self.dir,
                    start_new_session=True,
                )
            self.pid_file.write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
            pid = proc.pid
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not _pid_alive(pid):
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited during start; log {self.log_file}:\n{tail}")
            if self.healthy():
                return self.status() | {"action": "started"}
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not become healthy within {timeout}s; see {self.log_file}")

    def stop(self, timeout: float = 30) -> dict:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return {"service": self.name, "action": "not running"}
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + timeout
        while time.time() < deadline and _pid_alive(pid):
            time.sleep(0.3)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return {"service": self.name, "action": "stopped", "pid": pid}

    def status(self) -> dict:
        pid = self.pid()
        return {
            "service": self.name,
            "running": pid is not None,
            "healthy": pid is not None and self.healthy(),
            "pid": pid,
            "address": self.address,
            "log": str(self.log_file),
        }


class KafkaService(Service):
    """Apache Kafka in KRaft mode (broker and controller in one JVM) from Maven Central jars."""

    def __init__(
        self,
        home: Path,
        port: int = DEFAULT_KAFKA_PORT,
        controller_port: int | None = None,
        sasl_port: int | None = None,
        sasl_jaas: str | None = None,
    ):
        """``sasl_port`` and ``sasl_jaas`` (the broker's PLAIN login module line, as it goes into
        ``server.properties``) add a SASL_PLAINTEXT listener beside the plain one."""
        super().__init__("kafka", home, port)
        self.controller_port = controller_port or port + 1
        self.sasl_port = sasl_port
        self.sasl_jaas = sasl_jaas

    @property
    def sasl_address(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self) -> list[str]:
        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        cp = str(jars.ensure_kafka_jars(self.home)) + "/*"
        return [java, "-Xms256m", "-Xmx512m", f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}", "-cp", cp]

    def prepare(self) -> None:
        data = self.dir / "data"
        props = self.dir / "server.properties"
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        sasl: list[str] = []
        if self.sasl_port and self.sasl_jaas:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            sasl = [
                "sasl.enabled.mechanisms=PLAIN",
                f"listener.name.sasl_plaintext.plain.sasl.jaas.config={self.sasl_jaas}",
            ]
        props.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers=127.0.0.1:{self.controller_port}",
                    f"listeners={','.join(listeners)},CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners={','.join(listeners)}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                    *sasl,
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={data}",
                    "num.partitions=2",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        (self.dir / "log4j2.properties").write_text(
            "rootLogger.level=WARN\nrootLogger.appenderRef.stdout.ref=STDOUT\n"
            "appender.stdout.type=Console\nappender.stdout.name=STDOUT\n"
            "appender.stdout.layout.type=PatternLayout\nappender.stdout.layout.pattern=[%d] %p %m (%c)%n\n"
            "logger.kafka.name=kafka\nlogger.kafka.level=INFO\n"
        )
        if not (data / "meta.properties").exists():
            cluster_id = (
                subprocess.run(
                    self._java() + ["kafka.tools.StorageTool", "random-uuid"],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            proc = subprocess.run(
                self._java()
                + ["kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(props)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"kafka storage format failed:\n{proc.stdout}\n{proc.stderr}")

    def command(self) -> list[str]:
        return self._java() + ["kafka.Kafka", str(self.dir / "server.properties")]

    def healthy(self) -> bool:
        if not port_open(self.port):
            return False
        from confluent_kafka.admin import AdminClient

        try:
            md = AdminClient({"bootstrap.servers": self.address}).list_topics(timeout=3)
            return bool(md.brokers)
        except Exception:  # noqa: BLE001 - unhealthy, whatever the cause
            return False


class MlflowService(Service):
    """``mlflow server`` with a SQLite backend store and local artifacts, webhooks allowed on loopback."""

    def __init__(self, home: Path, port: int = DEFAULT_MLFLOW_PORT):
        super().__init__("mlflow", home, port)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        mlflow = Path(sys.executable).with_name("mlflow")
        return [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.dir / "artifacts"),
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MLFLOW_CONFIGURE_LOGGING", None)  # the server's own log lines go to its log file
        env.pop("MLFLOW_TRACKING_URI", None)
        env.setdefault("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
        env.setdefault("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
        # the server caches the webhook list per event (60 s by default): a webhook registered by a
        # starting stream would miss alias moves for up to a minute
        env.setdefault("MLFLOW_WEBHOOK_CACHE_TTL", "1")
        # MLflow 3.15's server also starts a job runner (8 Python processes, ~2.4 GB resident here)
        # for server-side GenAI jobs the project never submits
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        return env

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.address + "/health", timeout=2) as r:
                return r.status == 200
        except Exception:  # noqa: BLE001 - unhealthy, whatever the cause
            return False


class MetastoreService(Service):
    """The local catalog: Hive's metastore as a Thrift service, from the jars pyspark ships (no
    download), its Derby database and the managed tables' warehouse under the service's folder.

    One process owns the Derby database; every Spark session (the jobs, their subprocesses, a
    test's own session) reaches the same names through ``thrift://127.0.0.1:<port>``. Open-source
    Unity Catalog publishes no server on Maven Central, so this is the catalog that runs here: names
    are two-level (``schema.table``), as in Spark's session catalog."""

    def __init__(self, home: Path, port: int = DEFAULT_METASTORE_PORT):
        super().__init__("metastore", home, port)

    @property
    def address(self) -> str:
        return f"thrift://127.0.0.1:{self.port}"

    @property
    def warehouse(self) -> Path:
        return warehouse_dir(self.home)

    def command(self) -> list[str]:
        import pyspark

        java = os.path.join(os.environ["JAVA_HOME"], "bin", "java") if os.environ.get("JAVA_HOME") else "java"
        cp = str(Path(pyspark.__file__).parent / "jars") + "/*"
        conf = {
            "hive.async.log.enabled": "false",  # Hive's async logger needs a jar pyspark does not ship
            "javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={self.dir / 'metastore_db'};create=true",
            "datanucleus.schema.autoCreateAll": "true",
            "hive.metastore.schema.verification": "false",
            "hive.metastore.warehouse.dir": str(self.warehouse),
        }
        args = [
            java,
            "-Xms64m",
            "-Xmx384m",
            f"-Dderby.stream.error.file={self.dir / 'derby.log'}",
            f"-Dhive.log.dir={self.dir}",
            "-Dhive.log.file=metastore-hive.log",
            "-cp",
            cp,
            "org.apache.hadoop.hive.metastore.HiveMetaStore",
            "-p",
            str(self.port),
        ]
        for key, value in conf.items():
            args += ["--hiveconf", f"{key}={value}"]
        return args

    def prepare(self) -> None:
        self.warehouse.mkdir(parents=True, exist_ok=True)


def warehouse_dir(home: Path) -> Path:
    """Where the local catalog keeps managed tables (``<schema>.db/<table>``)."""
    return home / "services" / "metastore" / "warehouse"


def all_services(home: Path, kafka_port: int | None = None, mlflow_port: int | None = None) -> list[Service]:
    return [
        KafkaService(home, kafka_port or DEFAULT_KAFKA_PORT),
        MlflowService(home, mlflow_port or DEFAULT_MLFLOW_PORT),
    ]
