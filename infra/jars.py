"""Resolve JVM jars from Maven Central once into a local folder.

Two sets are needed on this machine:

* ``kafka``: the Apache Kafka broker (KRaft) and a log4j2 backend, run with ``java -cp``;
* ``spark``: Spark's Kafka connector (exact pyspark version) and Delta Lake (the artifact that
  matches the installed ``delta-spark`` wheel), handed to Spark through ``spark.jars`` so that a
  SparkSession start never needs the network.

Each set is resolved with ``mvn dependency:copy-dependencies`` on a generated pom; a marker file
records the coordinates so a changed version resolves again and an unchanged one is a no-op.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_VERSION = os.environ.get("STREAMSCORE_KAFKA_VERSION", "4.1.1")
LOG4J_VERSION = "2.24.3"
SCALA_BINARY = "2.13"


@dataclass(frozen=True)
class Artifact:
    group: str
    artifact: str
    version: str
    exclusions: tuple[str, ...] = ()  # "group:artifact"

    @property
    def coordinate(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"


def kafka_artifacts() -> list[Artifact]:
    return [
        Artifact("org.apache.kafka", f"kafka_{SCALA_BINARY}", KAFKA_VERSION),
        Artifact("org.slf4j", "slf4j-api", "2.0.17"),
        Artifact("org.apache.logging.log4j", "log4j-slf4j2-impl", LOG4J_VERSION),
        Artifact("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
    ]


# Maven Central as reached from here serves spark-token-provider-kafka-0-10 (the connector's small
# helper for Kafka delegation tokens) only up to 4.1.1 on the 4.1 line; the connector and Spark
# itself are 4.1.3. The helper's classes are unchanged between these patch releases.
TOKEN_PROVIDER_VERSIONS = {"4.1.2": "4.1.1", "4.1.3": "4.1.1"}


def spark_artifacts() -> list[Artifact]:
    import pyspark

    spark_version = pyspark.__version__
    # the connector of the exact Spark version (4.1.3 has the SPARK-55271 fix the restart path needs)
    connector_version = os.environ.get("STREAMSCORE_KAFKA_CONNECTOR_VERSION") or spark_version
    delta_version = metadata.version("delta-spark")
    spark_minor = ".".join(spark_version.split(".")[:2])
    token_provider = f"spark-token-provider-kafka-0-10_{SCALA_BINARY}"
    return [
        Artifact(
            "org.apache.spark",
            f"spark-sql-kafka-0-10_{SCALA_BINARY}",
            connector_version,
            exclusions=(f"org.apache.spark:{token_provider}",),
        ),
        Artifact("org.apache.spark", token_provider, TOKEN_PROVIDER_VERSIONS.get(spark_version, spark_version)),
        Artifact("io.delta", f"delta-spark_{spark_minor}_{SCALA_BINARY}", delta_version),
    ]


def _exclusions(a: Artifact) -> str:
    if not a.exclusions:
        return ""
    items = "".join(
        f"<exclusion><groupId>{e.split(':')[0]}</groupId><artifactId>{e.split(':')[1]}</artifactId></exclusion>"
        for e in a.exclusions
    )
    return f"\n      <exclusions>{items}</exclusions>"


def _pom(artifacts: list[Artifact]) -> str:
    deps = "\n".join(
        f"""    <dependency>
      <groupId>{a.group}</groupId>
      <artifactId>{a.artifact}</artifactId>
      <version>{a.version}</version>{_exclusions(a)}
    </dependency>"""
        for a in artifacts
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>streamscore.local</groupId>
  <artifactId>jar-resolver</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{deps}
  </dependencies>
</project>
"""


_MAVEN_SETTINGS = """<settings xmlns="http://maven.apache.org/SETTINGS/1.0.0">
  <mirrors>
    <mirror>
      <id>central-only</id>
      <mirrorOf>*</mirrorOf>
      <url>https://repo.maven.apache.org/maven2</url>
    </mirror>
  </mirrors>
</settings>
"""


def _pyspark_jar_names() -> set[str]:
    """Artifact names (version stripped) already shipped inside the pyspark wheel."""
    import pyspark

    jars_dir = Path(pyspark.__file__).parent / "jars"
    return {_strip_version(p.name) for p in jars_dir.glob("*.jar")}


def _strip_version(jar_name: str) -> str:
    stem = jar_name[:-4] if jar_name.endswith(".jar") else jar_name
    parts = stem.split("-")
    kept = []
    for part in parts:
        if part[:1].isdigit():
            break
        kept.append(part)
    return "-".join(kept)


def resolve(name: str, artifacts: list[Artifact], dest: Path, skip_present_in_pyspark: bool) -> Path:
    """Copy ``artifacts`` and their runtime dependencies into ``dest`` (idempotent)."""
    marker = dest / ".resolved.json"
    wanted = [a.coordinate for a in artifacts]
    if marker.exists() and json.loads(marker.read_text()).get("artifacts") == wanted:
        return dest
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError(f"Maven ('mvn') is needed once to resolve the {name} jars into {dest}")
    log.info("resolving %s jars from Maven Central: %s", name, ", ".join(wanted))
    with tempfile.TemporaryDirectory(prefix=f"streamscore-{name}-") as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_pom(artifacts))
        staging = Path(tmp) / "jars"
        settings = os.environ.get("STREAMSCORE_MAVEN_SETTINGS")
        if not settings:
            # Spark's parent pom names extra repositories (a mirror this machine cannot reach):
            # route every repository to Maven Central.
            settings = str(Path(tmp) / "settings.xml")
            Path(settings).write_text(_MAVEN_SETTINGS)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-U",
            "-s",
            settings,
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mvn could not resolve the {name} jars:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
        skip = _pyspark_jar_names() if skip_present_in_pyspark else set()
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for jar in sorted(staging.glob("*.jar")):
            if _strip_version(jar.name) in skip:
                continue
            shutil.copy2(jar, dest / jar.name)
    marker.write_text(json.dumps({"artifacts": wanted}))
    return dest


def jdk_tool(name: str) -> Path | None:
    """A JDK program (``java``, ``javac``): ``$JAVA_HOME/bin/<name>``, else the one on the PATH,
    links resolved; None when there is none."""
    home = os.environ.get("JAVA_HOME")
    tool = Path(home) / "bin" / name if home else None
    if tool is None or not tool.exists():
        found = shutil.which(name)
        tool = Path(found) if found else None
    return tool.resolve() if tool is not None else None


def jars_root(home: Path | None = None) -> Path:
    """Jar cache, shared by every state folder: ``STREAMSCORE_JARS_DIR`` or ``~/.cache/streamscore/jars``."""
    return Path(os.environ.get("STREAMSCORE_JARS_DIR") or Path.home() / ".cache" / "streamscore" / "jars")


def ensure_kafka_jars(home: Path) -> Path:
    return resolve("kafka", kafka_artifacts(), jars_root(home) / "kafka", skip_present_in_pyspark=False)


def ensure_spark_jars(home: Path) -> list[str]:
    folder = resolve("spark", spark_artifacts(), jars_root(home) / "spark", skip_present_in_pyspark=True)
    return sorted(str(p) for p in folder.glob("*.jar"))
