"""Sources and sinks: the only module of ``scoring`` that reads or writes data.

Sources return ``value`` plus the columns of :data:`streamscore.scoring.schema.COORDINATES`.
Sinks write a frame of one micro-batch (or backfill chunk) to a Delta table:

* :class:`IdempotentAppend` appends with ``txnAppId``/``txnVersion`` so a replayed micro-batch is
  not written twice;
* :class:`SliceWriter` owns the rows of one value of a column (a backfill id): its first write
  replaces that slice (``replaceWhere``), later writes append to it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from streamscore.errors import SinkError
from streamscore.scoring.schema import VALUE
from streamscore.scoring.tables import TableRef
from streamscore.scoring.transform import as_events

if TYPE_CHECKING:
    from streamscore.conf.settings import Settings

log = logging.getLogger(__name__)


def kafka_options(kafka: Any) -> dict[str, str]:
    """Spark Kafka source options from ``settings.source.kafka``."""
    opts = {
        "kafka.bootstrap.servers": kafka.bootstrap_servers,
        "subscribe": kafka.topic,
        "startingOffsets": kafka.starting_offsets,
        "failOnDataLoss": str(kafka.fail_on_data_loss).lower(),
        "kafka.fetch.max.wait.ms": str(kafka.fetch_max_wait_ms),
    }
    opts.update(_sasl_options(kafka))
    opts.update(kafka.options)  # explicit options win
    return opts


def _sasl_options(kafka: Any) -> dict[str, str]:
    """The SASL login of a source's or sink's settings (none without a password)."""
    if kafka.sasl_password is None:
        return {}
    module = _LOGIN_MODULES[kafka.sasl_mechanism]
    user, password = _jaas_quote(kafka.sasl_username or ""), _jaas_quote(kafka.sasl_password.get_secret_value())
    return {
        "kafka.sasl.jaas.config": f"{module} required username={user} password={password};",
        "kafka.sasl.mechanism": kafka.sasl_mechanism,
        "kafka.security.protocol": kafka.security_protocol,
    }


def kafka_sink_connection(settings: Settings) -> tuple[str, Any, dict[str, str]]:
    """Where ``sink.kafka`` writes: its broker, the settings whose SASL login it uses, and its
    ``kafka.*`` options. Without ``bootstrap_servers`` the sink writes to the source's broker, and
    then, unless it has a login of its own, with the source's login and the source's ``kafka.*``
    options (a broker's TLS settings are the same for both directions). One rule for the job's
    writer (:func:`kafka_sink_options`) and the start-up checks (librdkafka)."""
    sink, source = settings.sink.kafka, settings.source
    if sink.bootstrap_servers is not None:
        return sink.bootstrap_servers, sink, dict(sink.options)
    if source.kind != "kafka":
        raise SinkError(
            "sink.kafka.topic is set but sink.kafka.bootstrap_servers is not, and the source is not Kafka: "
            "set sink.kafka.bootstrap_servers"
        )
    if sink.sasl_password is not None:
        return source.kafka.bootstrap_servers, sink, dict(sink.options)
    inherited = {k: v for k, v in source.kafka.options.items() if k.startswith("kafka.")}
    return source.kafka.bootstrap_servers, source.kafka, inherited | sink.options


def kafka_sink_options(settings: Settings) -> dict[str, str]:
    """Spark Kafka writer options for ``sink.kafka`` (:func:`kafka_sink_connection`); the sink's
    own ``options`` win."""
    bootstrap, login, options = kafka_sink_connection(settings)
    return {"kafka.bootstrap.servers": bootstrap, **_sasl_options(login), **options}


_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _jaas_quote(value: str) -> str:
    """A JAAS option value as a quoted string: Kafka's parser (a Java ``StreamTokenizer``) reads
    ``\\`` and ``\"`` inside quotes, so a password with quotes, backslashes or ``;`` stays one value."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kafka_columns(df: DataFrame) -> DataFrame:
    return df.select(
        VALUE,
        F.col("topic").alias("source"),
        F.col("partition").alias("source_partition"),
        F.col("offset").alias("source_offset"),
        F.col("timestamp").alias("source_timestamp"),
    )


def read_kafka_stream(spark: SparkSession, kafka: Any) -> DataFrame:
    reader = spark.readStream.format("kafka").options(**kafka_options(kafka))
    if kafka.max_offsets_per_trigger:
        reader = reader.option("maxOffsetsPerTrigger", str(kafka.max_offsets_per_trigger))
    return _kafka_columns(reader.load())


def read_kafka_range(
    spark: SparkSession,
    kafka: Any,
    starting: str,
    ending: str,
    starting_timestamp: int | None = None,
    ending_timestamp: int | None = None,
) -> DataFrame:
    """Bounded Kafka read (backfill): offsets as Spark's JSON offset specs or earliest/latest, or
    epoch-millisecond timestamps (which take precedence)."""
    opts = kafka_options(kafka) | {"startingOffsets": starting, "endingOffsets": ending}
    if starting_timestamp is not None:
        opts["startingTimestamp"] = str(starting_timestamp)
    if ending_timestamp is not None:
        opts["endingTimestamp"] = str(ending_timestamp)
    return _kafka_columns(spark.read.format("kafka").options(**opts).load())


def _delta_columns(df: DataFrame, table: TableRef) -> DataFrame:
    """Each row becomes a JSON event; the table (its name, else its path) is its coordinate."""
    payload = F.to_json(F.struct(*[F.col(f"`{c}`") for c in df.columns])).alias(VALUE)
    return as_events(df.select(payload), str(table))


def _load(reader: Any, table: TableRef) -> DataFrame:
    """``reader`` (batch or streaming, format delta) on ``table``: by name through the catalog,
    else by path."""
    return reader.table(table.name) if table.name is not None else reader.load(table.path)


def read_table(spark: SparkSession, table: TableRef) -> DataFrame:
    """The table's rows as they are (no event conversion)."""
    return _load(spark.read.format("delta"), table)


def read_delta_stream(spark: SparkSession, table: TableRef, max_files_per_trigger: int | None = None) -> DataFrame:
    reader = spark.readStream.format("delta")
    if max_files_per_trigger:
        reader = reader.option("maxFilesPerTrigger", str(max_files_per_trigger))
    return _delta_columns(_load(reader, table), table)


def read_delta_table(
    spark: SparkSession,
    table: TableRef,
    version: int | None = None,
    timestamp: str | None = None,
    where: str | None = None,
) -> DataFrame:
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    if timestamp is not None:
        reader = reader.option("timestampAsOf", timestamp)
    df = _load(reader, table)
    if where:
        df = df.where(where)
    return _delta_columns(df, table)


def newest_kafka_values(conf: dict[str, Any], topic: str, n: int, timeout_s: float) -> list[str]:
    """Up to ``n`` of the newest messages of ``topic`` (read with a consumer of its own, no group
    offsets committed), as text: the gate's sample when the stream has nothing scored yet."""
    import time

    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**conf, "group.id": "streamscore-gate-sample", "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        assigned, want = [], 0
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                start = max(low, high - n)
                assigned.append(TopicPartition(topic, p, start))
                want += high - start
        if not assigned:
            return []
        consumer.assign(assigned)
        values: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < want and time.monotonic() < deadline:
            for msg in consumer.consume(min(want - len(values), 500), timeout=1.0):
                value = msg.value() if msg.error() is None else None
                if value is not None:
                    values.append(value.decode("utf-8", errors="replace"))
        return values[-n:]
    finally:
        consumer.close()


def newest_delta_values(spark: SparkSession, table: TableRef, n: int) -> list[str]:
    """Up to ``n`` rows of a Delta source table as the JSON events the stream makes of them."""
    rows = _delta_columns(read_table(spark, table), table).limit(n).collect()
    return [r[VALUE] for r in rows]


def stream_id(spark: SparkSession, checkpoint: str) -> tuple[str, bool]:
    """The id of the streaming query on ``checkpoint`` (Spark's ``metadata`` file there: the same
    across restarts, new for a new checkpoint), and whether the checkpoint is new. For a new
    checkpoint the id is chosen here and written where Spark reads it, so everything that depends
    on it (the Delta app id of the writes) is fixed before the query starts."""
    import uuid

    meta = HadoopFile(spark, checkpoint.rstrip("/") + "/metadata")
    raw = meta.read()
    if raw is not None:
        return str(json.loads(raw)["id"]), False
    new = str(uuid.uuid4())
    meta.write(json.dumps({"id": new}, separators=(",", ":")).encode())
    return new, True


class HadoopFile:
    """A small file read and written whole through Spark's Hadoop file system API (any URI the
    session can reach: ``dbfs:/``, ``abfss://``, ``s3a://``, ``file://``)."""

    def __init__(self, spark: SparkSession, uri: str):
        jvm: Any = spark._jvm
        self._path = jvm.org.apache.hadoop.fs.Path(uri)
        self._fs = self._path.getFileSystem(spark._jsc.hadoopConfiguration())
        self._io = jvm.org.apache.commons.io.IOUtils
        self.uri = uri

    def exists(self) -> bool:
        return bool(self._fs.exists(self._path))

    def read(self) -> bytes | None:
        if not self.exists():
            return None
        stream = self._fs.open(self._path)
        try:
            return bytes(self._io.toByteArray(stream))
        finally:
            stream.close()

    def write(self, data: bytes) -> None:
        out = self._fs.create(self._path, True)
        try:
            out.write(bytearray(data))
        finally:
            out.close()


def has_rows(spark: SparkSession, table: TableRef) -> bool:
    return bool(read_table(spark, table).limit(1).count())


def table_exists(spark: SparkSession, table: TableRef) -> bool:
    from delta.tables import DeltaTable

    if table.name is not None:
        return bool(spark.catalog.tableExists(table.name))
    return bool(DeltaTable.isDeltaTable(spark, str(table.path)))


def location(spark: SparkSession, table: TableRef) -> str:
    """Where the table's files are (a named table's from the catalog)."""
    if table.path is not None:
        return table.path
    row = spark.sql(f"DESCRIBE DETAIL {table.sql}").select("location").first()
    if row is None or not row["location"]:
        raise SinkError(f"the catalog gives no location for table {table}")
    return str(row["location"])


@dataclass(frozen=True)
class Creation:
    """How a job creates a table that is not there yet."""

    change_data_feed: bool = False  # delta.enableChangeDataFeed: row changes for readers downstream
    create_schema: bool = True  # a named table's missing schema is created (False: SinkError naming the fix)

    @classmethod
    def from_settings(cls, settings: Settings) -> Creation:
        """``sink.change_data_feed`` and ``catalog.create_schemas``."""
        return cls(settings.sink.change_data_feed, settings.catalog.create_schemas)


def ensure_delta_table(
    spark: SparkSession,
    table: TableRef,
    schema: StructType,
    writer: str = "this job",
    creation: Creation = Creation(),
) -> None:
    """Create an empty Delta table with ``schema`` unless ``table`` exists (by name: a managed
    table of the catalog; with ``change_data_feed``, row changes recorded for readers such as
    Lakehouse Monitoring); an existing table must have every column of ``schema`` with its type
    (else :class:`SinkError` before any write: Delta would refuse the first append, and a restarted
    stream would fail on every batch)."""
    if not table_exists(spark, table):
        _create(spark, table, schema, creation.change_data_feed, creation.create_schema)
        return
    have = {f.name: f.dataType for f in read_table(spark, table).schema.fields}
    problems = [
        f"column {f.name!r} is missing"
        if f.name not in have
        else f"column {f.name!r} is {have[f.name].simpleString()}, {writer} writes {f.dataType.simpleString()}"
        for f in schema.fields
        if have.get(f.name) != f.dataType
    ]
    if problems:
        raise SinkError(
            f"Delta table {table} does not fit {writer}: "
            + "; ".join(problems)
            + " (serve a version with the table's schema, or write to a new table)"
        )


def empty_frame(spark: SparkSession, schema: StructType) -> DataFrame:
    """No rows, exactly ``schema``, and no Python worker: a frame made from a local Python list
    (even an empty one) is converted by a Python task of the RDD API when it is written. Where that
    API's worker environment differs from the SQL runners' (any session whose JVM streamscore did
    not start: see :meth:`streamscore.spark.SparkStart._start_python_workers`), the task starts a
    second Python daemon beside the scoring UDFs' own: about 2 s of a job's start-up here."""
    try:
        return spark.createDataFrame(spark.sparkContext.emptyRDD(), schema)  # no partitions: no task
    except Exception:  # noqa: BLE001 - a session without a SparkContext (Spark Connect)
        return spark.createDataFrame([], schema)


def _create(spark: SparkSession, table: TableRef, schema: StructType, cdf: bool, create_schema: bool) -> None:
    writer = empty_frame(spark, schema).write.format("delta").mode("append")
    if cdf:  # a table property from its first version on (a reader of changes may start at 0)
        writer = writer.option("delta.enableChangeDataFeed", "true")
    if table.name is None:
        writer.save(table.path)
        return
    db = table.schema
    assert db is not None
    if not spark.catalog.databaseExists(db.replace("`", "")):
        if not create_schema:
            raise SinkError(
                f"schema {db} of table {table} does not exist: create it (CREATE SCHEMA {db}), "
                "or name a table in an existing schema"
            )
        spark.sql(f"CREATE SCHEMA IF NOT EXISTS {db}")
    try:
        writer.saveAsTable(table.name)
    except Exception as e:
        if not table_exists(spark, table):
            raise SinkError(f"cannot create table {table}: {type(e).__name__}: {str(e)[:500]}") from e


CLASSES_PROPERTY = "streamscore.classes.v{version}"


def record_classes(spark: SparkSession, table: TableRef, version: str, classes: tuple[str, ...]) -> str:
    """Record, as a table property of the output table, what the positions of version ``version``'s
    ``probabilities`` stand for (a JSON list of class labels); returns the property's key."""
    import json

    key = CLASSES_PROPERTY.format(version=version)
    value = json.dumps(list(classes)).replace("\\", "\\\\").replace("'", "\\'")
    spark.sql(f"ALTER TABLE {table.sql} SET TBLPROPERTIES ('{key}' = '{value}')")
    return key


def class_labels(spark: SparkSession, table: TableRef, version: str) -> list[str] | None:
    """The class labels :func:`record_classes` recorded for ``version`` (None: none recorded)."""
    import json

    props = spark.sql(f"DESCRIBE DETAIL {table.sql}").select("properties").first()
    raw = (props["properties"] or {}).get(CLASSES_PROPERTY.format(version=version)) if props else None
    return None if raw is None else list(json.loads(raw))


class SnapshotWarmer:
    """Reads the Delta tables' state ahead of the next write, in a background thread.

    An idempotent append (``txnAppId``) asks Delta for the app id's last batch, which Delta 4.4
    answers by reconstructing the table's state from its log: three Spark jobs, most of a small
    batch's time. Delta keeps that state with the table's latest snapshot, so computing it right
    after a commit (while the stream waits for its next trigger, or while it scores) leaves the
    next write nothing to reconstruct. Uses Delta's JVM classes; where they are not available (or
    differ, e.g. on another Delta build) it turns itself off after logging why, and writes simply
    pay the cost inline as before."""

    def __init__(self, spark: SparkSession, tables: list[TableRef], enabled: bool = True):
        self.spark = spark
        self.tables = tables
        self._locations: list[str] | None = None
        self.enabled = enabled
        self._wanted = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Warm every table once more (requests made while a warm-up runs are merged)."""
        if not self.enabled:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="streamscore-delta-warmer", daemon=True)
            self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def warm(self) -> None:
        jvm: Any = self.spark._jvm
        delta_log = jvm.org.apache.spark.sql.delta.DeltaLog
        if self._locations is None:  # a named table's files: where the catalog says
            self._locations = [location(self.spark, t) for t in self.tables]
        for path in self._locations:
            delta_log.forTable(self.spark._jsparkSession, path).unsafeVolatileSnapshot().transactions()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopped.is_set():
                return
            try:
                self.warm()
            except Exception as e:  # noqa: BLE001 - an optimisation only: writes still work without it
                if self._stopped.is_set():
                    return
                log.info("Delta snapshot warm-up turned off (%s: %s)", type(e).__name__, str(e)[:300])
                self.enabled = False
                return


class Sink(Protocol):
    table: TableRef

    def write(self, df: DataFrame, batch_id: int, rows: int | None) -> None:
        """Write ``df`` (``rows`` rows, None: not counted yet) as batch/chunk ``batch_id``."""


PRODUCER_BATCH_BYTES = 262_144
RECORD_OVERHEAD = 128  # bytes a record batch adds around one record (v2 batch header and record framing)


class KafkaTopics:
    """Scored events (and, with a dead-letter topic, dead letters) as Kafka messages, written by
    Spark's Kafka writer: at least once, each message carrying an identity that a replay repeats
    (:func:`streamscore.scoring.transform.kafka_messages`)."""

    def __init__(
        self, options: dict[str, str], topic: str, dead_letter_topic: str | None = None, backfill_id: str | None = None
    ):
        self.options = options
        self.topic = topic
        self.dead_letter_topic = dead_letter_topic
        self.backfill_id = backfill_id  # messages a backfill writes say so (a header)

    def write(self, messages: DataFrame, topic: str) -> None:
        try:
            messages.write.format("kafka").options(**self.options).option("topic", topic).save()
        except Exception as e:
            text = str(e)
            if "RecordTooLargeException" in text or "MESSAGE_TOO_LARGE" in text or "too large" in text.lower():
                raise SinkError(
                    f"a message for Kafka topic {topic!r} is larger than the producer or the broker accepts "
                    "(nothing of this batch is acknowledged; it is written again at the next start): raise "
                    "sink.kafka.options kafka.max.request.size and the topic's max.message.bytes, or lower "
                    f"source.max_message_bytes so that such events are dead-lettered on input ({text[:300]})"
                ) from e
            raise

    @classmethod
    def from_settings(
        cls, settings: Settings, topic: str | None = None, backfill_id: str | None = None
    ) -> KafkaTopics | None:
        """``sink.kafka``, or a backfill's ``--kafka-topic`` (``topic``, with ``backfill_id``: no
        dead-letter topic, the backfill keeps its dead letters in its table); None without a topic.

        The producer's largest request (``kafka.max.request.size``, unless ``options`` set it) is
        the topics' ``max.message.bytes`` less a record's overhead: the producer then refuses a
        message the broker would refuse at once, in the batch's write (Kafka's Java producer, given
        a single record the broker refuses as too large, splits and resends it without end)."""
        from streamscore.preflight import topic_message_limit

        sink = settings.sink.kafka
        dead_letter_topic = None if topic is not None else sink.dead_letter_topic
        topic = topic or sink.topic
        if topic is None:
            return None
        options = kafka_sink_options(settings)
        if "kafka.max.request.size" not in options:
            limit = topic_message_limit(settings, [t for t in (topic, dead_letter_topic) if t])
            if limit is not None:
                options["kafka.max.request.size"] = str(max(limit - RECORD_OVERHEAD, 1))
        # larger producer batches than Kafka's 16 KB: the write of 200,000 messages 3.5-4.0 s ->
        # 2.1-2.9 s here; a task's end flushes the producer, so the linger adds no latency to a batch
        request = int(options.get("kafka.max.request.size", 1_048_576))
        options.setdefault("kafka.batch.size", str(min(PRODUCER_BATCH_BYTES, request)))
        options.setdefault("kafka.linger.ms", "20")
        return cls(options, topic, dead_letter_topic, backfill_id)


class IdempotentAppend:
    """Append once per (app id, batch id): Delta skips a write whose txnVersion it has already seen
    for the app id. An empty batch writes nothing.

    The app id must be unique per checkpoint *incarnation*: a new checkpoint restarts batch ids at
    0, and with a reused app id Delta would skip every one of its writes as already done (see
    :func:`streamscore.streaming.delta_app_id`). A frame
    not counted yet (``rows`` None) is written even when empty: the commit records the batch as
    done all the same."""

    def __init__(self, table: TableRef, app_id: str):
        self.table = table
        self.app_id = app_id

    def write(self, df: DataFrame, batch_id: int, rows: int | None) -> None:
        if rows == 0:
            return
        writer = df.write.format("delta").mode("append").option("txnAppId", self.app_id).option("txnVersion", batch_id)
        save(writer, self.table)


class SliceWriter:
    """The rows where ``column = value`` belong to this writer: the first write replaces them (even
    when it brings no rows, so a rerun never keeps stale rows), later writes append."""

    def __init__(self, table: TableRef, column: str, value: str):
        self.table = table
        self.column = column
        self.value = value
        self._replaced = False

    def write(self, df: DataFrame, batch_id: int, rows: int | None) -> None:
        if rows == 0 and self._replaced:
            return
        w = df.withColumn(self.column, F.lit(self.value)).write.format("delta")
        if self._replaced:
            save(w.mode("append"), self.table)
        else:
            escaped = self.value.replace("\\", "\\\\").replace("'", "\\'")
            save(w.mode("overwrite").option("replaceWhere", f"{self.column} = '{escaped}'"), self.table)
            self._replaced = True


def save(writer: Any, table: TableRef) -> None:
    """A Delta write (its mode and options set) to ``table``: ``saveAsTable`` for a name (Delta
    takes ``txnAppId``/``txnVersion`` and ``replaceWhere`` there as it does for a path)."""
    if table.name is not None:
        writer.saveAsTable(table.name)
    else:
        writer.save(table.path)
