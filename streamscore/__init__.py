"""streamscore: stream scoring of registered MLflow models on Spark, with hot model swaps.

One import package; its subpackages live in the repository's top-level folders (see README
"Code map"): ``streamscore.jobs``, ``streamscore.scoring``, ``streamscore.registry_watch``,
``streamscore.conf``, ``streamscore.infra``."""

__version__ = "0.1.0"
