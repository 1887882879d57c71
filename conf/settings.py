"""Typed, validated settings: YAML defaults + profile + user file + environment + CLI overrides.

Precedence, lowest first: ``conf/defaults.yaml``, ``conf/profiles/<profile>.yaml``, ``--config FILE``,
environment variables ``STREAMSCORE_<SECTION>__<KEY>`` (``__`` separates nesting levels),
``--set section.key=value``. An unknown key or an invalid value raises :class:`ConfigError` naming
the key. Secrets are ``SecretStr`` and print as ``**********``.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamscore.errors import ConfigError

if TYPE_CHECKING:
    from streamscore.scoring.tables import TableRef

__all__ = ["ConfigError", "Settings", "load_settings", "parse_overrides"]

CONF_DIR = Path(__file__).resolve().parent
ENV_PREFIX = "STREAMSCORE_"
MASK = "**********"
# option keys whose values are (or may hold) credentials
CREDENTIAL_KEY = re.compile(r"pass|secret|token|jaas|sasl|credential|key|auth", re.IGNORECASE)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AppSettings(_Section):
    home: Path = Path(".streamscore")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    run_name: str | None = None
    preflight_timeout_s: float = Field(30, gt=0)  # each start-up check (broker, topic, tracking) within this


class SparkSettings(_Section):
    master: str | None = "local[*]"
    app_name: str = "streamscore"
    shuffle_partitions: int = Field(2, ge=1)
    conf: dict[str, str] = {}
    use_local_jars: bool = True
    class_archive: bool = True
    driver_jit: Literal["c1", "tiered"] = "c1"


class KafkaSource(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "streamscore-events"
    starting_offsets: str = "earliest"
    max_offsets_per_trigger: int | None = Field(200_000, ge=1)
    fail_on_data_loss: bool = True
    # how long the broker may hold a task's fetch that finds no new data (Kafka's fetch.max.wait.ms,
    # 500 ms by default): a small batch's task paid it whole, every batch (README "Performance")
    fetch_max_wait_ms: int = Field(10, ge=0, le=60_000)
    options: dict[str, str] = {}
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    security_protocol: Literal["SASL_SSL", "SASL_PLAINTEXT"] = "SASL_SSL"  # with SASL credentials


def _table_name(v: str | None) -> str | None:
    from streamscore.scoring.tables import check_name

    return None if v is None else check_name(v)


TableName = Annotated[str, AfterValidator(_table_name)]


def _one_of(name: str | None, path: str | None, name_key: str, path_key: str) -> None:
    if name is not None and path is not None:
        raise ValueError(
            f"{name_key}={name!r} and {path_key}={path!r} both name the table: give the name or the path, not both"
        )


class DeltaSource(_Section):
    path: str | None = None
    table: TableName | None = None  # a catalog name instead of a path
    max_files_per_trigger: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _name_or_path(self) -> DeltaSource:
        _one_of(self.table, self.path, "source.delta.table", "source.delta.path")
        return self


class SourceSettings(_Section):
    kind: Literal["kafka", "delta"] = "kafka"
    event_id_field: str = "event_id"
    event_time_field: str = "event_time"
    max_message_bytes: int | None = Field(1_048_576, ge=1)  # larger messages are dead-lettered unparsed
    kafka: KafkaSource = KafkaSource()
    delta: DeltaSource = DeltaSource()

    @model_validator(mode="after")
    def _delta_needs_path(self) -> SourceSettings:
        if self.kind == "delta" and not (self.delta.path or self.delta.table):
            raise ValueError("source.delta.table or source.delta.path is required when source.kind is 'delta'")
        return self


class KafkaSink(_Section):
    """Scored events as Kafka messages, beside the Delta tables (``topic`` unset: no Kafka output).
    Connection and credentials as the source's (``bootstrap_servers`` unset: the source's broker)."""

    topic: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    dead_letter_topic: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    bootstrap_servers: str | None = None
    value_format: Literal["json"] = "json"  # room for avro
    options: dict[str, str] = {}  # extra producer options (kafka.*), e.g. {"kafka.compression.type": "lz4"}
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    security_protocol: Literal["SASL_SSL", "SASL_PLAINTEXT"] = "SASL_SSL"  # with SASL credentials

    @model_validator(mode="after")
    def _dead_letters_need_the_topic(self) -> KafkaSink:
        if self.dead_letter_topic is not None and self.topic is None:
            raise ValueError("sink.kafka.dead_letter_topic needs sink.kafka.topic (the scored events' topic)")
        if self.dead_letter_topic is not None and self.dead_letter_topic == self.topic:
            raise ValueError("sink.kafka.dead_letter_topic must differ from sink.kafka.topic")
        return self


class SinkSettings(_Section):
    output_table: TableName | None = None  # a catalog name (schema.table, catalog.schema.table) ...
    dead_letter_table: TableName | None = None
    output_path: str | None = None  # ... or a location; neither: <home>/tables/scored
    dead_letter_path: str | None = None  # neither: <home>/tables/dead_letter
    checkpoint_path: str = "checkpoints/stream"
    app_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # in Delta txn ids, names
    warm_snapshots: bool = True  # read the tables' Delta state between batches, not inside each write
    change_data_feed: bool = True  # tables the job creates record row changes (delta.enableChangeDataFeed)
    kafka: KafkaSink = KafkaSink()
    # watch.shadow_ref's table (both predictions, both versions); neither: <home>/tables/shadow
    shadow_table: TableName | None = None
    shadow_path: str | None = None

    @model_validator(mode="after")
    def _name_or_path(self) -> SinkSettings:
        _one_of(self.output_table, self.output_path, "sink.output_table", "sink.output_path")
        _one_of(self.dead_letter_table, self.dead_letter_path, "sink.dead_letter_table", "sink.dead_letter_path")
        _one_of(self.shadow_table, self.shadow_path, "sink.shadow_table", "sink.shadow_path")
        return self


class CatalogSettings(_Section):
    """Where table names are looked up. ``metastore``: a Hive metastore's ``thrift://`` URI (on
    loopback: the one ``streamscore services`` runs), or ``session`` for the catalog the Spark
    session already has (Databricks: Unity Catalog). Used only by jobs that name a table, unless
    ``connect`` is ``always``."""

    metastore: str = "thrift://127.0.0.1:9083"
    connect: Literal["when-named", "always"] = "when-named"
    create_schemas: bool = True  # a named table's missing schema is created (false: refused, naming the fix)

    @field_validator("metastore")
    @classmethod
    def _metastore(cls, v: str) -> str:
        if v != "session" and not re.match(r"^thrift://[^/:]+:\d+$", v):
            raise ValueError(f"expected 'session' or thrift://host:port, got {v!r}")
        return v

    @property
    def local(self) -> bool:
        """The metastore is the local service (a loopback thrift URI)."""
        host = self.metastore.removeprefix("thrift://").rsplit(":", 1)[0]
        return self.metastore != "session" and host in ("127.0.0.1", "localhost")

    @property
    def port(self) -> int | None:
        return None if self.metastore == "session" else int(self.metastore.rsplit(":", 1)[1])


_GRANULARITY = re.compile(r"^(5 minutes|30 minutes|1 hour|1 day|[1-4] weeks?|1 month|1 year)$")


class MonitorSettings(_Section):
    """Lakehouse Monitoring of the output table, an ``InferenceLog`` profile: ``streamscore bundle``
    renders a ``quality_monitors`` resource for it when ``problem_type`` is set."""

    problem_type: Literal["classification", "regression"] | None = None
    timestamp_col: Literal["scored_at", "event_time"] = "scored_at"
    label_col: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # a column for labels joined later
    granularities: list[str] = Field(["1 hour", "1 day"], min_length=1)
    schedule: str | None = "0 0 * * * ?"  # Quartz cron of the monitor's refresh (UTC); null: on demand
    assets_dir: str | None = None  # default /Workspace/Users/<deploying user>/streamscore/monitoring

    @field_validator("granularities")
    @classmethod
    def _granularities(cls, v: list[str]) -> list[str]:
        bad = [g for g in v if not _GRANULARITY.match(g)]
        if bad:
            raise ValueError(f"{bad}: granularities are '5 minutes', '30 minutes', '1 hour', '1 day', 'N weeks'...")
        return v


class TriggerSettings(_Section):
    processing_time: str | None = "500 milliseconds"
    available_now: bool = False
    max_batches: int | None = Field(None, ge=1)
    idle_timeout_s: float | None = Field(None, gt=0)

    @field_validator("processing_time")
    @classmethod
    def _interval(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = v.split()
        units = {"second", "seconds", "minute", "minutes", "millisecond", "milliseconds", "hour", "hours"}
        if len(parts) != 2 or not parts[0].replace(".", "", 1).isdigit() or parts[1] not in units:
            raise ValueError(f"expected an interval like '5 seconds', got {v!r}")
        return v


def _model_ref(v: str | None) -> str | None:
    """A model reference must parse (``@alias``, ``stage:<Stage>``, ``latest``, a version)."""
    if v is not None:
        from streamscore.registry_watch.resolve import ModelRef

        ModelRef.parse(v)
    return v


def _version_number_as_text(v: Any) -> Any:
    """``--set model.ref=3`` (or ``ref: 3`` in YAML) reads as a number: it is a version."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


ModelRefText = Annotated[str, BeforeValidator(_version_number_as_text), AfterValidator(_model_ref)]


DEFAULT_LOADERS = (
    "mlflow.sklearn",
    "mlflow.xgboost",
    "mlflow.lightgbm",
    "mlflow.onnx",
    "mlflow.spark",
    "mlflow.pyfunc.model",
)


DEFAULT_MODEL_NAME = "streamscore-iris"


class ModelSettings(_Section):
    name: str = DEFAULT_MODEL_NAME
    ref: ModelRefText = "@champion"  # also models:/<name>@<alias> and models:/<name>/<version> (they set the name)
    # the loading policy, checked on the version's MLmodel file before any of its code runs
    allowed_loaders: list[str] = Field(default_factory=lambda: list(DEFAULT_LOADERS))
    allow_pickle: bool = False  # versions whose loading unpickles objects or imports code they ship
    trusted_types: list[str] = Field(default_factory=lambda: ["sklearn."])  # skops trusted-type prefixes
    allowed_names: list[str] | None = None  # registered model names this job may load (None: any)
    # the input columns (name -> MLflow type) of a model logged without an input signature, or the
    # path of a YAML/JSON file holding that mapping
    input_schema: dict[str, str] | None = None

    @field_validator("input_schema", mode="before")
    @classmethod
    def _schema_file(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:
            loaded = yaml.safe_load(Path(v).expanduser().read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read the input schema file {v!r}: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"the input schema file {v!r} must hold a mapping of column name to type")
        return {str(k): str(t) for k, t in loaded.items()}

    @field_validator("input_schema")
    @classmethod
    def _schema_types(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        from streamscore.scoring.spec import SUPPORTED_TYPES

        if v is not None:
            bad = {k: t for k, t in v.items() if str(t).lower() not in SUPPORTED_TYPES}
            if bad:
                raise ValueError(f"unsupported column type(s) {bad}: use one of {', '.join(SUPPORTED_TYPES)}")
            v = {k: str(t).lower() for k, t in v.items()}
        return v

    @model_validator(mode="before")
    @classmethod
    def _ref_uri(cls, data: Any) -> Any:
        """``ref: models:/fraud@champion`` (as MLflow writes model URIs) names the model too."""
        if not isinstance(data, dict) or not str(data.get("ref") or "").startswith("models:/"):
            return data
        from streamscore.registry_watch.resolve import ModelRef

        try:
            name, ref = ModelRef.parse_uri(str(data["ref"]))
        except ConfigError as e:
            raise ValueError(str(e).removeprefix("model.ref: ")) from None
        given = data.get("name")
        if given not in (None, DEFAULT_MODEL_NAME, name):
            raise ValueError(f"ref {data['ref']!r} names model {name!r} but model.name is {given!r}; set only one")
        return {**data, "name": name, "ref": str(ref)}

    @model_validator(mode="after")
    def _name_allowed(self) -> ModelSettings:
        if self.allowed_names is not None and self.name not in self.allowed_names:
            raise ValueError(f"model.name {self.name!r} is not in model.allowed_names {self.allowed_names}")
        return self


class AzureTarget(_Section):
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace: str | None = None
    region: str | None = None

    def is_set(self) -> bool:
        return any([self.subscription_id, self.resource_group, self.workspace, self.region])

    def uri(self) -> str:
        missing = [k for k in ("subscription_id", "resource_group", "workspace", "region") if not getattr(self, k)]
        if missing:
            raise ConfigError(
                "tracking.azure is incomplete: missing " + ", ".join(f"tracking.azure.{k}" for k in missing)
            )
        return (
            f"azureml://{self.region}.api.azureml.ms/mlflow/v2.0/subscriptions/{self.subscription_id}"
            f"/resourceGroups/{self.resource_group}/providers/Microsoft.MachineLearningServices"
            f"/workspaces/{self.workspace}"
        )


class TrackingSettings(_Section):
    uri: str | None = "http://127.0.0.1:5055"
    registry_uri: str | None = None
    experiment: str = "streamscore"
    token: SecretStr | None = None
    request_timeout_s: float = Field(10, gt=0)
    request_max_retries: int = Field(1, ge=0)
    buffer_max_entries: int = Field(10000, ge=1)
    close_timeout_s: float = Field(30, gt=0)  # closing the run at job end (flush, summary, status) within this
    azure: AzureTarget = AzureTarget()
    databricks_host: str | None = None  # workspace URL for databricks:// targets (else the SDK's own config)
    mirror_uri: str | None = None  # a second tracking target that gets the same params and metrics
    mirror_token: SecretStr | None = None  # the mirror's own token; the primary's is never sent there
    # a job that never ends: per-batch metrics aggregated over this window (0: every batch), and its
    # run continued in a new one (same experiment, linked by tags) before the run holds more metric
    # values than the budget (Databricks caps a run's metric steps), after rotate_after_h, and on a
    # model swap when rotate_on_swap
    metrics_interval_s: float = Field(60, ge=0)
    run_metric_budget: int = Field(900_000, ge=100)
    rotate_after_h: float | None = Field(24, gt=0)
    rotate_on_swap: bool = False

    def effective_uri(self) -> str:
        if self.uri:
            return self.uri
        if self.azure.is_set():
            return self.azure.uri()
        raise ConfigError("tracking.uri is not set (set it, or fill in tracking.azure.*)")

    def effective_registry_uri(self) -> str:
        return self.registry_uri or self.effective_uri()


class WebhookSettings(_Section):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: any free port
    secret: SecretStr | None = None
    max_age_s: float = Field(300, gt=0)
    max_connections: int = Field(16, ge=1)  # served at once; more are closed unread
    client_timeout_s: float = Field(10, gt=0)  # a client that sends its request slower is dropped
    register_on_server: bool = True  # create the webhook on the MLflow server at start (removed at stop)

    @model_validator(mode="after")
    def _secret(self) -> WebhookSettings:
        if self.enabled and self.secret is None:
            raise ValueError("watch.webhook.secret is required when watch.webhook.enabled is true")
        return self


class CanarySettings(_Section):
    """A validated candidate first serves ``fraction`` of the events (by a stable hash of the event
    id); after ``promote_after_batches`` batches and ``promote_after_rows`` of its rows without a
    rollback threshold crossed, it serves all. 0: a candidate takes over at once (no probation)."""

    fraction: float = Field(0.0, ge=0.0, le=1.0)
    promote_after_batches: int = Field(10, ge=1)
    promote_after_rows: int = Field(1000, ge=0)


class RollbackSettings(_Section):
    """While a candidate is a canary, the thresholds that send the stream back to the previous
    version (judged on the candidate's rows so far, once there are ``min_rows``); null: not checked."""

    min_rows: int = Field(50, ge=1)
    max_model_error_rate: float | None = Field(0.02, ge=0.0, le=1.0)  # rows it failed on / rows it scored
    max_disagreement: float | None = Field(None, ge=0.0, le=1.0)  # 1 - agreement (classifiers)
    max_mean_abs_diff: float | None = Field(None, ge=0.0)  # mean |difference| (regressors)
    max_seconds_per_row: float | None = Field(None, gt=0.0)  # its predict time per row


class WatchSettings(_Section):
    enabled: bool = True
    poll_interval_s: float = Field(5, gt=0)
    required_tag: str | None = None
    retry_refused_after_s: float = Field(600, ge=0)
    sample_rows: int = Field(20, ge=1)
    gate_timeout_s: float = Field(120, gt=0)  # scoring the gate's sample must finish within this
    download_timeout_s: float = Field(600, gt=0)  # downloading a candidate must finish within this
    gate_partitions: int = Field(1, ge=1)  # Spark tasks the gate's sample uses (the rest keep scoring the stream)
    webhook: WebhookSettings = WebhookSettings()
    # a second version that scores every valid row beside the served one, into the shadow table
    shadow_ref: ModelRefText | None = None  # e.g. "@challenger"
    shadow_max_seconds_per_row: float = Field(0.01, gt=0.0)  # a slower shadow skips the rest of a task's rows
    canary: CanarySettings = CanarySettings()
    rollback: RollbackSettings = RollbackSettings()

    @field_validator("required_tag")
    @classmethod
    def _tag(cls, v: str | None) -> str | None:
        if v is not None and "=" not in v:
            raise ValueError(f"expected 'key=value', got {v!r}")
        return v


_SECRET_REF = re.compile(r"^\{\{secrets/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+\}\}$")


_UC_IDENT = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,254}$"


class DatabricksSettings(_Section):
    """How ``streamscore submit`` / ``streamscore bundle`` build the Databricks jobs. Credentials
    are never here: the Databricks SDK's own authentication (environment, ~/.databrickscfg profile,
    Azure service principal / CLI) is used."""

    # Unity Catalog: the schema the job's tables are in by default (catalog_name.schema_name.scored,
    # ...) and the volume its relative paths go under (/Volumes/<catalog>/<schema>/<volume>/...)
    catalog_name: str | None = Field(None, pattern=_UC_IDENT)
    schema_name: str | None = Field(None, pattern=_UC_IDENT)
    volume_name: str = Field("streamscore", pattern=_UC_IDENT)
    wheel_dir: str | None = None  # UC volume or /Workspace folder for the wheel; default <volume>/wheels
    job_name_prefix: str = Field("streamscore", pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")
    spark_version: str = "18.0.x-scala2.13"  # Databricks Runtime 18: Spark 4.1, Delta and Kafka built in
    node_type_id: str = "Standard_D4ds_v5"
    num_workers: int = Field(1, ge=0)
    policy_id: str | None = None
    spark_conf: dict[str, str] = {}
    # environment of the job's cluster: credentials only as {{secrets/<scope>/<key>}} references
    env: dict[str, str] = {}
    backfill_compute: Literal["job_cluster", "serverless"] = "job_cluster"
    serverless_environment_version: str = "4"
    poll_interval_s: float = Field(10, gt=0)  # --wait: how often the run's state is read

    @model_validator(mode="after")
    def _catalog_and_schema(self) -> DatabricksSettings:
        if (self.catalog_name is None) != (self.schema_name is None):
            raise ValueError("set databricks.catalog_name and databricks.schema_name together (or neither)")
        return self

    @property
    def volume_root(self) -> str | None:
        if self.catalog_name is None:
            return None
        return f"/Volumes/{self.catalog_name}/{self.schema_name}/{self.volume_name}"

    @field_validator("env", "spark_conf")
    @classmethod
    def _secret_refs_only(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if CREDENTIAL_KEY.search(key) and not _SECRET_REF.match(value):
                raise ValueError(
                    f"{key}: a credential must be a {{{{secrets/<scope>/<key>}}}} reference, not a literal value"
                )
        return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        extra="forbid", frozen=True, env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False
    )

    profile: str = "local"
    app: AppSettings = AppSettings()
    spark: SparkSettings = SparkSettings()
    source: SourceSettings = SourceSettings()
    sink: SinkSettings = SinkSettings()
    catalog: CatalogSettings = CatalogSettings()
    monitor: MonitorSettings = MonitorSettings()
    trigger: TriggerSettings = TriggerSettings()
    model: ModelSettings = ModelSettings()
    tracking: TrackingSettings = TrackingSettings()
    watch: WatchSettings = WatchSettings()
    databricks: DatabricksSettings = DatabricksSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init kwargs carry the YAML layers; the environment overrides them. CLI --set is applied
        # into the YAML layers' top (see load_settings) but must still beat the environment, so it
        # comes in through _CliSource.
        # ``STREAMSCORE_..._FILE`` variables name files, read by load_settings (_secret_files)
        env_vars = env_settings.env_vars  # type: ignore[attr-defined]
        env_settings.env_vars = {  # type: ignore[attr-defined]
            k: v for k, v in env_vars.items() if not k.lower().endswith(FILE_SUFFIX.lower())
        }
        return (_CliSource(settings_cls), env_settings, init_settings)

    @model_validator(mode="after")
    def _names_fit_the_catalog(self) -> Settings:
        if self.catalog.metastore != "session":
            for name in self.table_names:
                check_metastore_name(name, self.catalog.metastore)
        return self

    @model_validator(mode="after")
    def _unity_catalog_ref(self) -> Settings:
        from streamscore.registry_watch.resolve import ModelRef, check_uc_ref, is_unity_catalog

        t = self.tracking
        if is_unity_catalog(t.registry_uri or t.uri):
            check_uc_ref(ModelRef.parse(self.model.ref), self.model.name)
            if self.watch.shadow_ref is not None:
                check_uc_ref(ModelRef.parse(self.watch.shadow_ref), self.model.name)
        return self

    # -- derived values -------------------------------------------------------------------------
    @property
    def home(self) -> Path:
        return self.app.home.expanduser().resolve()

    def path(self, value: str) -> str:
        """A sink/checkpoint location: URIs stay as they are, relative paths go under the Unity
        Catalog volume of ``databricks.*`` when one is set, else under app.home."""
        if "://" in value or value.startswith("dbfs:") or os.path.isabs(value):
            return value
        root = self.databricks.volume_root
        return f"{root}/{value}" if root else str(self.home / value)

    def default_table(self, stem: str) -> TableRef:
        """A table the settings do not place: ``<catalog_name>.<schema_name>.<stem>`` when
        ``databricks.catalog_name`` is set, else ``<app.home>/tables/<stem>``."""
        from streamscore.scoring.tables import TableRef

        d = self.databricks
        if d.catalog_name is not None:
            return TableRef.named(f"{d.catalog_name}.{d.schema_name}.{stem}")
        return TableRef.at(self.path(f"tables/{stem}"))

    @property
    def wheel_dir(self) -> str:
        d = self.databricks
        if d.wheel_dir:
            return d.wheel_dir
        if d.volume_root:
            return f"{d.volume_root}/wheels"
        raise ConfigError(
            "no folder for the wheel: set databricks.wheel_dir (a UC volume or /Workspace folder), or "
            "databricks.catalog_name and databricks.schema_name (the wheel goes to their volume)"
        )

    @property
    def output_table(self) -> TableRef:
        return self.table(self.sink.output_table, self.sink.output_path, "scored")

    @property
    def dead_letter_table(self) -> TableRef:
        return self.table(self.sink.dead_letter_table, self.sink.dead_letter_path, "dead_letter")

    @property
    def shadow_table(self) -> TableRef:
        return self.table(self.sink.shadow_table, self.sink.shadow_path, "shadow")

    @property
    def output_path(self) -> str:
        """The output table's path, or its name when it is named."""
        return str(self.output_table)

    @property
    def dead_letter_path(self) -> str:
        return str(self.dead_letter_table)

    @property
    def source_table(self) -> TableRef | None:
        d = self.source.delta
        return None if not (d.table or d.path) else self.table(d.table, d.path, "source")

    def table(self, name: str | None, path: str | None, stem: str) -> TableRef:
        """A table by ``name``, else at ``path`` (relative: see :meth:`path`), else the default
        table ``stem`` (:meth:`default_table`)."""
        from streamscore.scoring.tables import TableRef

        if name:
            return TableRef.named(name)
        return TableRef.at(self.path(path)) if path else self.default_table(stem)

    @property
    def table_names(self) -> list[str]:
        """The catalog names this job's settings use."""
        shadow = self.sink.shadow_table if self.watch.shadow_ref is not None else None
        return [n for n in (self.sink.output_table, self.sink.dead_letter_table, self.source.delta.table, shadow) if n]

    @property
    def uses_catalog(self) -> bool:
        """The Spark session must reach the configured metastore (a name is used, or always)."""
        return self.catalog.metastore != "session" and (bool(self.table_names) or self.catalog.connect == "always")

    @property
    def checkpoint_path(self) -> str:
        return self.path(self.sink.checkpoint_path)

    @property
    def app_id(self) -> str:
        if self.sink.app_id:
            return self.sink.app_id
        digest = hashlib.sha1(self.checkpoint_path.encode()).hexdigest()[:12]
        return f"streamscore-{digest}"

    def masked(self) -> dict[str, Any]:
        """JSON-able dump with secrets masked (safe to print and to log as MLflow params): the
        ``SecretStr`` fields, and every free-form option whose key looks like a credential
        (``source.kafka.options``, ``spark.conf``: JAAS configs, passwords, tokens, keys)."""
        out = self.model_dump(mode="json")
        for options in (out["source"]["kafka"]["options"], out["spark"]["conf"]):
            for key in options:
                if CREDENTIAL_KEY.search(key):
                    options[key] = MASK
        return out


def check_metastore_name(name: str, metastore: str) -> None:
    """A Hive metastore has one catalog, Spark's session catalog: a three-level name must start
    with ``spark_catalog`` (a Unity Catalog name needs ``catalog.metastore=session`` on Databricks)."""
    from streamscore.scoring.tables import SESSION_CATALOG, name_parts

    parts = name_parts(name)
    if len(parts) == 3 and parts[0] != SESSION_CATALOG:
        raise ValueError(
            f"table {name!r}: the metastore {metastore} has one catalog, {SESSION_CATALOG}; name the table "
            f"{'.'.join(parts[1:])} (schema.table), or set catalog.metastore=session where the Spark session "
            f"has catalog {parts[0]!r} (Unity Catalog on Databricks)"
        )


# the --set layer of the load_settings call in progress (in this thread or task only): it must beat
# the environment, which pydantic-settings reads inside Settings(...), so it enters as a source
_CLI_LAYER: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "streamscore_cli_layer", default=None
)

FILE_SUFFIX = "_FILE"


def _secret_files() -> dict[str, Any]:
    """Settings read from files named by ``STREAMSCORE_<SECTION>__<KEY>_FILE`` (a mounted secret,
    say): the file's content, without its trailing newline, is the value. Above the YAML layers,
    below the plain variable and ``--set``. A named file that cannot be read stops the job."""
    out: dict[str, Any] = {}
    for var, file in os.environ.items():
        if not (var.startswith(ENV_PREFIX) and var.endswith(FILE_SUFFIX)) or var == ENV_PREFIX + "HOME_FILE":
            continue
        path = var[len(ENV_PREFIX) : -len(FILE_SUFFIX)].lower().split("__")
        if len(path) < 2:
            continue
        try:
            value = Path(file).read_text().rstrip("\r\n")
        except OSError as e:
            raise ConfigError(f"{'.'.join(path)}: cannot read the file named by {var} ({e.strerror})") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


class _CliSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_CLI_LAYER.get() or {})


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in (top or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse_overrides(pairs: list[str]) -> dict:
    """``["source.kafka.topic=x", "trigger.max_batches=3"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _override_value(raw)
    return out


def _override_value(raw: str) -> Any:
    """A ``--set`` value parsed as YAML (numbers, booleans, lists, maps), or the text itself when it
    is not YAML (e.g. a ``{{secrets/scope/key}}`` reference)."""
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_settings(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | dict | None = None,
) -> Settings:
    profile = profile or os.environ.get(ENV_PREFIX + "PROFILE") or "local"
    layers = _read_yaml(CONF_DIR / "defaults.yaml")
    profile_file = CONF_DIR / "profiles" / f"{profile}.yaml"
    if not profile_file.exists():
        known = sorted(p.stem for p in (CONF_DIR / "profiles").glob("*.yaml"))
        raise ConfigError(f"profile: unknown profile {profile!r} (known: {', '.join(known)})")
    layers = _deep_merge(layers, _read_yaml(profile_file))
    if config_file:
        layers = _deep_merge(layers, _read_yaml(Path(config_file)))
    layers["profile"] = profile
    layers = _deep_merge(layers, _secret_files())
    if "STREAMSCORE_HOME" in os.environ:
        layers = _deep_merge(layers, {"app": {"home": os.environ["STREAMSCORE_HOME"]}})
    cli = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    token = _CLI_LAYER.set(cli)
    try:
        return Settings(**layers)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    finally:
        _CLI_LAYER.reset(token)


# -- backfill: one request object, validated like the settings -------------------------------------

_BACKFILL_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class DeltaSlice(_Section):
    """A Delta table, optionally time-travelled (``version`` or ``timestamp``) and filtered."""

    kind: Literal["delta"] = "delta"
    path: str | None = None
    table: TableName | None = None  # a catalog name instead of a path
    version: int | None = Field(None, ge=0)
    timestamp: str | None = None
    where: str | None = None

    @model_validator(mode="after")
    def _one_time_travel(self) -> DeltaSlice:
        if self.version is not None and self.timestamp is not None:
            raise ValueError("give either --as-of-version or --as-of-timestamp, not both")
        if (self.path is None) == (self.table is None):
            raise ValueError("give the input table's name (--table) or its path (--delta), one of them")
        return self


class KafkaRange(_Section):
    """A bounded range of the configured Kafka topic: Spark offset specs (``earliest``,
    ``latest`` or JSON such as ``{"topic":{"0":10}}``; end exclusive), or epoch-ms timestamps,
    which take precedence."""

    kind: Literal["kafka"] = "kafka"
    starting: str = "earliest"
    ending: str = "latest"
    starting_timestamp: int | None = Field(None, ge=0)
    ending_timestamp: int | None = Field(None, ge=0)


BackfillInput = Annotated[DeltaSlice | KafkaRange, Field(discriminator="kind")]


class BackfillRequest(_Section):
    """Everything one backfill run needs besides the settings."""

    input: BackfillInput
    model_ref: ModelRefText | None = None  # default: model.ref
    backfill_id: str | None = Field(None, pattern=_BACKFILL_ID)  # default: derived from input + version
    compare_with: ModelRefText | None = None
    chunks: int = Field(1, ge=1, le=10_000)
    output_path: str | None = None  # default: <home>/tables/backfill
    dead_letter_path: str | None = None  # default: <home>/tables/backfill_dead_letter
    output_table: TableName | None = None  # a catalog name instead of output_path
    dead_letter_table: TableName | None = None
    # the scored rows as Kafka messages too (sink.kafka's broker and login), marked as a backfill's
    kafka_topic: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,249}$")

    @model_validator(mode="after")
    def _name_or_path(self) -> BackfillRequest:
        _one_of(self.output_table, self.output_path, "--output-table", "--output")
        _one_of(self.dead_letter_table, self.dead_letter_path, "--dead-letter-table", "--dead-letter")
        return self

    @property
    def table_names(self) -> list[str]:
        inp = self.input.table if isinstance(self.input, DeltaSlice) else None
        return [n for n in (inp, self.output_table, self.dead_letter_table) if n]

    @classmethod
    def of(cls, **values: Any) -> BackfillRequest:
        """Validate, turning errors into a :class:`ConfigError` that names the option."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise ConfigError(_format_errors(e).replace("invalid configuration", "invalid backfill request")) from None
