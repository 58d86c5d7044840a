"""Profile store: append-only, idempotent adds, filters, JSONL round trip, concurrent writers,
and records that survive a writer killed mid-stream."""

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from compressor.core.errors import NaspruneError
from profilers.store import ProfileStore


def fake_record(i: int, engine: str = "onnxruntime", workload: str = "prefill:1x8") -> dict:
    return {
        "schema": "nasprune-profile/1",
        "key": f"k{i:05d}-{engine}-{workload}",
        "model": {"source": "tiny", "sha256": "0" * 64},
        "arch": {"embed_dim": 64, "num_heads": 4, "ffn_dim": 96, "num_layers": 1 + i % 4},
        "params": 1000 + i,
        "workload": workload,
        "engine": engine,
        "device": "cpu",
        "provider": "CPUExecutionProvider" if engine == "onnxruntime" else None,
        "precision": "fp32",
        "recipe_id": "r1",
        "export_recipe": {"format": "x"},
        "fingerprint_id": "f1",
        "fingerprint": {"host": {}},
        "stats_ms": {
            "min": 1.0,
            "median": 1.5,
            "mean": 1.6,
            "p90": 2.0,
            "p99": 2.2,
            "std": 0.1,
            "cv": 0.06,
            "count": 10,
        },
        "tokens_per_s": None,
        "peak_memory_bytes": 1,
        "graph_bytes": 2,
        "kv_cache_bytes": 3,
        "env": {
            "load_before": 0.1,
            "load_after": 0.2,
            "ref_score_before": 10.0,
            "ref_score_after": 10.1,
            "remeasured": 0,
        },
        "created_at": "2026-01-01T00:00:00+00:00",
    }


def test_add_has_len_and_duplicates(tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    assert len(store) == 0 and not store.has("k00000-onnxruntime-prefill:1x8")
    assert store.add(fake_record(0)) is True
    assert store.add(fake_record(0)) is False  # append-only: the first measurement stays
    assert store.has(fake_record(0)["key"]) and len(store) == 1
    assert store.records()[0] == fake_record(0)


def test_filters(tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    for i in range(6):
        store.add(fake_record(i, engine="torch" if i % 2 else "onnxruntime", workload=f"prefill:1x{8 * (1 + i % 3)}"))
    assert len(store.records(engine="torch")) == 3
    assert len(store.records(engine="torch", workload="prefill:1x16")) == 1
    assert len(store.records(provider=None)) == 3  # NULL matches None
    assert len(store.records(fingerprint_id="f1", recipe_id="r1", precision="fp32")) == 6
    assert store.records(params=1003)[0]["key"].startswith("k00003")
    assert store.records(schema="nasprune-profile/1")  # non-column fields filter after decoding


def test_invalid_records_are_refused(tmp_path):
    store = ProfileStore(tmp_path / "p.sqlite")
    bad = fake_record(1)
    del bad["stats_ms"]
    with pytest.raises(NaspruneError, match="lacks stats_ms"):
        store.add(bad)
    with pytest.raises(NaspruneError, match="schema"):
        store.add({**fake_record(2), "schema": "other/9"})
    assert len(store) == 0


def test_jsonl_round_trip_is_portable(tmp_path):
    a = ProfileStore(tmp_path / "a.sqlite")
    for i in range(5):
        a.add(fake_record(i))
    assert a.export_jsonl(tmp_path / "a.jsonl") == 5
    b = ProfileStore(tmp_path / "b.sqlite")
    b.add(fake_record(0))
    assert b.import_jsonl(tmp_path / "a.jsonl") == 4  # the one already there is skipped
    assert sorted(r["key"] for r in b.records()) == sorted(r["key"] for r in a.records())
    copied = tmp_path / "copied.sqlite"  # the file itself is the portable artifact
    copied.write_bytes((tmp_path / "a.sqlite").read_bytes())
    assert len(ProfileStore(copied)) == 5


def test_not_a_store_is_one_line_error(tmp_path):
    (tmp_path / "junk.sqlite").write_text("not a database at all" * 100)
    with pytest.raises(NaspruneError):
        ProfileStore(tmp_path / "junk.sqlite")
    with pytest.raises(NaspruneError, match="is a directory"):
        ProfileStore(tmp_path)


def _writer(path, start, count, result_queue):
    store = ProfileStore(path)
    added = sum(store.add(fake_record(i)) for i in range(start, start + count))
    result_queue.put(added)


def test_concurrent_writers(tmp_path):
    """Two processes append overlapping key ranges at once: every key once, nothing lost."""
    path = tmp_path / "p.sqlite"
    ProfileStore(path)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, s, 60, q)) for s in (0, 30)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    added = [q.get(timeout=10) for _ in procs]
    store = ProfileStore(path)
    assert len(store) == 90 and sum(added) == 90
    assert len({r["key"] for r in store.records()}) == 90


def test_writer_killed_mid_stream_leaves_whole_records(tmp_path):
    """SIGKILL a process appending as fast as it can: the store stays intact, every row decodes."""
    path = tmp_path / "p.sqlite"
    ProfileStore(path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); from tests.test_store import fake_record; "
        "from profilers.store import ProfileStore; s = ProfileStore(sys.argv[1])\n"
        "for i in range(100000): s.add(fake_record(i))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), root])
    deadline = time.time() + 60
    while time.time() < deadline and len(ProfileStore(path)) < 20:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = ProfileStore(path)
    n = len(store)
    assert n >= 20
    records = store.records()
    assert [r["key"] for r in records] == [fake_record(i)["key"] for i in range(n)]  # a prefix, in order
    assert all(json.dumps(r) for r in records)
    assert store.add(fake_record(n)) is True  # and it keeps accepting records
