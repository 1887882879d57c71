"""A generated corpus of bad messages: every kind a producer can send (a few good ones mixed in)."""

from __future__ import annotations

import orjson

from streamscore.demo import FEATURES, iris_frame

GOOD_PREFIX = "f"  # event ids of the good messages: f<i>


def fuzz_corpus(n: int, seed: int = 7) -> list[bytes | None]:
    """Generated bad messages of every kind a producer can send, and a few good ones."""
    import random

    rnd = random.Random(seed)
    X, _ = iris_frame()
    rows = X.to_dict(orient="records")

    def good(i):
        return {"event_id": f"f{i}", "event_time": "2026-01-02T03:04:05Z", **rows[i % 150]}

    def deep(depth):
        return "[" * depth + "]" * depth

    makers = [
        lambda i: orjson.dumps(good(i))[: rnd.randrange(1, 40)],  # truncated JSON
        lambda i: orjson.dumps({**good(i), rnd.choice(FEATURES): rnd.choice(["x", [], {}, True, None])}),
        lambda i: orjson.dumps(good(i)).replace(b"5", b"NaN", 1),  # NaN / Infinity literals
        lambda i: orjson.dumps(good(i)).replace(b"4", b"Infinity", 1),
        lambda i: orjson.dumps({**good(i), "sepal_length": float("inf")}),
        lambda i: orjson.dumps({**good(i), "event_id": "x" * rnd.randrange(10, 5000)} | {"petal_width": "w" * 10_000}),
        lambda i: deep(rnd.randrange(100, 3000)).encode(),  # deep nesting
        lambda i: b'{"event_id": "a", "event_id": {"b": 1}, "event_time": 1}',  # duplicate keys
        lambda i: orjson.dumps({**good(i), rnd.choice(["event_id", "event_time", *FEATURES]): None}),
        lambda i: b'{"event_id": "\xff\xfe", "event_time": 1}',  # invalid UTF-8
        lambda i: rnd.choice([b"", None, b"null", b"0", b'""', b"[]"]),
        lambda i: orjson.dumps({**good(i), "event_time": rnd.choice([-1e30, "2026-13-45", "", 1e30])}),
        lambda i: b"x" * 3000,  # oversized (the tests allow 2048 bytes)
        lambda i: orjson.dumps(good(i)),  # valid
    ]
    return [makers[rnd.randrange(len(makers))](i) for i in range(n)]
