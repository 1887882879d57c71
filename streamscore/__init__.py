"""streamscore: stream scoring of registered MLflow models on Spark, with hot model swaps."""

__version__ = "0.1.0"
