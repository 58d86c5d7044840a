"""Profilers on tiny models: protocol, fingerprints, engines, records, resume, CLI and the edge path.

No assertion here depends on how fast anything ran.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import load_model
from compressor.elastic.search_space import SubNetwork
from profilers import standalone
from profilers.api import choose_subnetworks, profile_subnetworks
from profilers.base import get_engine, list_engines
from profilers.records import REQUIRED
from profilers.standalone import Protocol, fingerprint_id, make_fingerprint, measure, summarize, timed
from profilers.store import ProfileStore
from tests.conftest import make_tiny

FAST = Protocol(warmup_iters=1, warmup_seconds=0.0, min_iters=3, min_seconds=0.0, max_remeasure=0, probe_seconds=0.02)
FAST_ARGS = [
    "--warmup-iters",
    "1",
    "--warmup-seconds",
    "0",
    "--min-iters",
    "3",
    "--min-seconds",
    "0",
    "--max-remeasure",
    "0",
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_lock(tmp_path, monkeypatch):
    """Tests time nothing that matters: do not queue behind real profiling runs on this machine."""
    monkeypatch.setenv("NASPRUNE_PROFILE_LOCK", str(tmp_path / "profile.lock"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny("llama-gqa").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def cli(*args, **kwargs):
    """The real command line in a fresh process (needed where a run is killed or must not share state)."""
    return subprocess.run(
        [sys.executable, "-m", "nasprune", *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kwargs
    )


def cli_inproc(*args):
    """The same Typer app in-process: seconds faster for commands that fail or finish at once."""
    from typer.testing import CliRunner

    from nasprune.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---- protocol and fingerprint ------------------------------------------------------------
def test_summarize_statistics():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["min"], s["median"], s["mean"], s["count"]) == (1.0, 2.5, 2.5, 4)
    assert s["p90"] == pytest.approx(3.7) and s["std"] == pytest.approx(1.2909944)
    assert s["cv"] == pytest.approx(s["std"] / s["mean"]) and s["p99"] <= 4.0


def test_measure_runs_warmup_then_at_least_min_iters():
    calls = []

    def step():
        calls.append(1)
        return 1.0

    samples = measure(step, Protocol(warmup_iters=4, warmup_seconds=0, min_iters=7, min_seconds=0))
    assert len(samples) == 7 and len(calls) == 11


def test_drift_triggers_remeasure_and_keeps_least_disturbed(monkeypatch):
    scores = iter([100.0, 50.0] * 10)
    monkeypatch.setattr(standalone, "reference_score", lambda seconds: next(scores))
    monkeypatch.setattr(standalone, "reference_bandwidth", lambda seconds: 10.0)
    durations = iter([5.0, 5.0, 2.0, 2.0, 9.0, 9.0])  # three attempts of two iterations
    out = timed(
        lambda: lambda: next(durations),
        Protocol(warmup_iters=0, warmup_seconds=0, min_iters=2, min_seconds=0, max_remeasure=2, retry_wait_seconds=0),
    )
    assert out["env"]["remeasured"] == 2 and out["env"]["drifted"] is True
    assert out["env"]["attempt_medians_ms"] == [5.0, 2.0, 9.0] and out["stats_ms"]["median"] == 2.0
    monkeypatch.setattr(standalone, "reference_score", lambda seconds: 100.0)
    out = timed(lambda: lambda: 1.0, Protocol(warmup_iters=0, warmup_seconds=0, min_iters=2, min_seconds=0))
    assert out["env"]["remeasured"] == 0 and not out["env"]["drifted"]
    assert set(out["env"]) >= {"load_before", "load_after", "ref_score_before", "ref_score_after", "remeasured"}
    spread = iter([1.0, 3.0] * 10)  # steady machine, but the iterations themselves disagree: re-measure
    out = timed(
        lambda: lambda: next(spread),
        Protocol(warmup_iters=0, warmup_seconds=0, min_iters=2, min_seconds=0, max_remeasure=1, retry_wait_seconds=0),
    )
    assert out["env"]["remeasured"] == 1


def test_steady_slow_phase_is_remeasured_when_the_fast_speed_is_known(monkeypatch):
    """A host slowing the whole VM by 1.4x for seconds: before/after agree, only the known
    undisturbed reference speed reveals it."""
    scores = iter([70.0, 70.0, 100.0, 100.0])
    monkeypatch.setattr(standalone, "reference_score", lambda seconds: next(scores))
    monkeypatch.setattr(standalone, "reference_bandwidth", lambda seconds: 10.0)
    durations = iter([14.0, 14.0, 10.0, 10.0])
    proto = dict(warmup_iters=0, warmup_seconds=0, min_iters=2, min_seconds=0, max_remeasure=2, retry_wait_seconds=0)
    out = timed(lambda: lambda: next(durations), Protocol(fast_ref_score=100.0, **proto))
    assert out["env"]["attempt_medians_ms"] == [14.0, 10.0] and out["stats_ms"]["median"] == 10.0
    scores, durations = iter([70.0, 70.0]), iter([14.0, 14.0])
    out = timed(lambda: lambda: next(durations), Protocol(**proto))  # unknown fast speed: accepted
    assert out["env"]["remeasured"] == 0


def test_fingerprint_id_is_identity_not_score():
    host = standalone.host_fingerprint("cpu")
    a = make_fingerprint(host, "onnxruntime", "1.0", "CPUExecutionProvider", "cpu", "fp32", 1, "r", 101.0)
    b = make_fingerprint(host, "onnxruntime", "1.0", "CPUExecutionProvider", "cpu", "fp32", 1, "r", 87.5)
    c = make_fingerprint(host, "onnxruntime", "1.0", "CPUExecutionProvider", "cpu", "fp32", 2, "r", 101.0)
    assert fingerprint_id(a) == fingerprint_id(b) != fingerprint_id(c)
    assert host["logical_cores"] and host["cpu_model"]


# ---- engines ------------------------------------------------------------------------------
def test_unavailable_engines_are_reported_with_a_reason():
    table = {(e, d): info for e, d, info in list_engines()}
    assert table[("torch", "cpu")].available and table[("onnxruntime", "cpu")].available
    trt = table[("tensorrt", "cpu")]
    assert not trt.available and "GPU" in trt.reason
    for (engine, device), info in table.items():
        assert info.reason, (engine, device)
        if not info.available:
            with pytest.raises(NaspruneError, match=f"engine {engine} is unavailable on {device}"):
                get_engine(engine).check(device, "fp32")
    with pytest.raises(NaspruneError, match="unknown engine"):
        get_engine("tvm")


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_profile_records_and_resume(tiny, engine, tmp_path):
    space = tiny.supernet().space
    subs = [space.largest(), space.smallest()]
    workloads = ["prefill:1x8", "decode:2x6", "generate:1x4+3"]
    store = ProfileStore(tmp_path / "p.sqlite")
    records = profile_subnetworks(
        tiny, subs, workloads, engine=engine, store=store, protocol=FAST, progress=False, workdir=tmp_path / "work"
    )
    assert len(records) == len(store) == 6
    for r in records:
        assert not set(REQUIRED) - set(r)
        assert r["stats_ms"]["count"] >= 3 and r["stats_ms"]["min"] <= r["stats_ms"]["median"] <= r["stats_ms"]["p99"]
        assert r["engine"] == engine and r["fingerprint"]["engine"] == engine
        assert r["graph_bytes"] > 0 and r["peak_memory_bytes"] > 0
        assert (r["tokens_per_s"] is not None) == r["workload"].startswith("generate")
        sub = SubNetwork.from_dict(r["arch"])
        assert r["params"] == space.num_params(sub)
    assert len({r["fingerprint_id"] for r in records}) == 1 and len({r["recipe_id"] for r in records}) == 1
    if engine == "onnxruntime":
        assert records[0]["provider"] == "CPUExecutionProvider"
        assert all(v <= 1e-3 for v in records[0]["export"]["parity_max_abs_diff"].values())
    assert not list((tmp_path / "work").iterdir())  # graphs deleted after timing
    again = profile_subnetworks(tiny, subs, workloads, engine=engine, store=store, protocol=FAST, progress=False)
    assert [r["key"] for r in again] == [r["key"] for r in records] and len(store) == 6
    assert [r["created_at"] for r in again] == [r["created_at"] for r in records]  # skipped, not re-measured


def test_profile_budget_keeps_the_minimum_and_stops_before_overrunning(tiny, tmp_path):
    """With no time left, exactly ``min_subnetworks`` of the list's prefix are profiled, then nothing."""
    space = tiny.supernet().space
    subs = choose_subnetworks(space, samples=4)
    store = ProfileStore(tmp_path / "p.sqlite")
    kwargs = dict(engine="torch", store=store, protocol=FAST, progress=False, workdir=tmp_path / "work")
    records = profile_subnetworks(tiny, subs, ["prefill:1x8"], max_seconds=0.0, min_subnetworks=2, **kwargs)
    assert [SubNetwork.from_dict(r["arch"]) for r in records] == subs[:2] and len(store) == 2
    everything = profile_subnetworks(tiny, subs, ["prefill:1x8"], max_seconds=600.0, **kwargs)
    assert len(everything) == len(store) == 4  # resumed: the stored two kept, the others measured


def test_choose_subnetworks_includes_largest(tiny):
    space = tiny.supernet().space
    subs = choose_subnetworks(space, sampler="grid-params", samples=5)
    assert subs[0] == space.largest() and len(set(subs)) == len(subs) == 5
    assert choose_subnetworks(space, archs=['{"embed_dim":64,"num_heads":4,"ffn_dim":96,"num_layers":4}']) == [
        space.largest()
    ]


# ---- CLI -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--workload", "prefill:1x"], "bad workload 'prefill:1x'"),
        (["--workload", "train:1x8"], "bad workload 'train:1x8'"),
        (
            ["--engine", "tensorrt", "--device", "cpu"],
            "engine tensorrt is unavailable on cpu: TensorRT runs on NVIDIA GPUs",
        ),
        (["--engine", "tvm"], "unknown engine 'tvm'"),
        (["--engine", "onnxruntime", "--device", "cpu"], "pass --store PATH"),
        (["--export-only", "edge", "--engine", "torch"], "--export-only writes ONNX graphs"),
    ],
)
def test_cli_errors_are_one_line(tiny_dir, args, needle):
    assert needle in one_line_error(cli_inproc("profile", tiny_dir, *args))


def test_cli_engine_not_installed_is_one_line(tiny_dir):
    missing = [(e, d, info) for e, d, info in list_engines() if not info.available and d == "cuda"]
    if not missing:
        pytest.skip("every engine is installed and has a GPU here")
    engine, device, info = missing[0]
    error = one_line_error(
        cli_inproc("profile", tiny_dir, "--engine", engine, "--device", device, "--store", "x.sqlite")
    )
    assert f"engine {engine} is unavailable on {device}: {info.reason}" in error


def test_cli_error_is_one_line_in_a_real_process(tiny_dir):
    assert "bad workload" in one_line_error(cli("profile", tiny_dir, "--workload", "decode:0x8"))


def test_cli_list_engines():
    proc = cli_inproc("profile", "--list-engines")
    assert proc.exit_code == 0, proc.stderr
    assert "tensorrt" in proc.stdout and "CPUExecutionProvider" in proc.stdout and "why not" in proc.stdout


def test_killed_run_resumes_without_duplicates_or_losses(tiny_dir, tmp_path):
    store_path = tmp_path / "p.sqlite"
    args = [
        "profile",
        tiny_dir,
        "--engine",
        "onnxruntime",
        "--samples",
        "4",
        "--workload",
        "prefill:1x8",
        "--workload",
        "decode:1x8",
        "--store",
        store_path,
        "--workdir",
        tmp_path / "work",
        *FAST_ARGS,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nasprune", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and proc.poll() is None
        and (not store_path.exists() or len(ProfileStore(store_path)) < 2)
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its timing worker, mid-run
    proc.wait()
    before = {r["key"]: r for r in ProfileStore(store_path).records()}
    assert 2 <= len(before) < 8, "the run should have been killed part-way"
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    after = ProfileStore(store_path).records()
    assert len(after) == len({r["key"] for r in after}) == 8
    for r in after:
        if r["key"] in before:
            assert r == before[r["key"]]  # what was stored before the kill is untouched
    assert "already stored" in done.stdout


def test_edge_export_run_and_import(tiny_dir, tmp_path):
    out = tmp_path / "edge"
    proc = cli(
        "profile",
        tiny_dir,
        "--export-only",
        out,
        "--samples",
        "2",
        "--workload",
        "prefill:1x8",
        "--workload",
        "generate:1x4+2",
        *FAST_ARGS,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "run_profile.py").exists() and len(json.loads((out / "jobs.json").read_text())["jobs"]) == 4
    assert (out / "standalone_ort.py").exists()  # the ONNX Runtime runner run_profile.py imports
    # the runner must work with neither torch nor transformers nor nasprune importable
    blocker = (
        "import sys, runpy; [sys.modules.__setitem__(m, None) for m in "
        "('torch', 'transformers', 'compressor', 'profilers')]; sys.argv = ['run_profile.py', sys.argv[1]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    run = subprocess.run([sys.executable, "-c", blocker, str(out)], cwd=out, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    rerun = subprocess.run([sys.executable, str(out / "run_profile.py"), str(out)], capture_output=True, text=True)
    assert rerun.returncode == 0 and "0 to time, 4 already" in rerun.stdout
    store = tmp_path / "p.sqlite"
    imported = cli("profile", "import", out / "results.jsonl", "--store", store)
    assert imported.returncode == 0 and "imported 4 new record(s)" in imported.stdout, imported.stderr
    again = cli("profile", "import", out / "results.jsonl", "--store", store)
    assert "imported 0 new record(s) from 4" in again.stdout
    records = ProfileStore(store).records()
    assert {r["workload"] for r in records} == {"prefill:1x8", "generate:1x4+2"}
    assert all(r["engine"] == "onnxruntime" and r["export"]["parity_max_abs_diff"] for r in records)


def test_import_of_garbage_is_one_line(tmp_path):
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"not": "a result"}\n')
    error = one_line_error(cli_inproc("profile", "import", bad, "--store", tmp_path / "s.sqlite"))
    assert "is not a run_profile.py result line" in error


# ---- GPU engines: run where the packages and a GPU exist -------------------------------------
@pytest.mark.parametrize(
    "engine, precision",
    [
        ("torch", "fp32"),
        ("torch", "fp16"),
        ("onnxruntime", "fp32"),
        ("onnxruntime", "fp16"),
        ("tensorrt", "fp32"),
        ("tensorrt", "fp16"),
    ],
)
def test_cuda_engines(tiny, engine, precision, tmp_path):
    info = get_engine(engine).availability("cuda")
    if not info.available:
        pytest.skip(f"{engine} on cuda unavailable here: {info.reason}")
    space = tiny.supernet().space
    records = profile_subnetworks(
        tiny,
        [space.largest()],
        ["prefill:2x8", "decode:1x8", "generate:1x4+3"],
        engine=engine,
        device="cuda",
        precision=precision,
        store=tmp_path / "p.sqlite",
        protocol=FAST,
        progress=False,
    )
    assert len(records) == 3 and all(r["device"] == "cuda" and r["stats_ms"]["count"] >= 3 for r in records)
    assert records[0]["fingerprint"]["host"]["gpu"]["name"]


def test_onnxruntime_tensorrt_provider(tiny, tmp_path):
    ort = get_engine("onnxruntime")
    if not ort.availability("cuda").available:
        pytest.skip(f"onnxruntime on cuda unavailable here: {ort.availability('cuda').reason}")
    try:
        ort.provider("cuda", "tensorrt")
    except NaspruneError as e:
        pytest.skip(str(e))
    records = profile_subnetworks(
        tiny,
        [tiny.supernet().space.largest()],
        ["prefill:1x8"],
        engine="onnxruntime",
        device="cuda",
        provider="tensorrt",
        store=tmp_path / "p.sqlite",
        protocol=FAST,
        progress=False,
    )
    assert records[0]["provider"] == "TensorrtExecutionProvider"


def test_fast_ref_score_is_the_best_seen_and_only_used_when_remeasuring():
    from profilers.api import with_fast_ref_score

    records = [{"env": {"ref_score_before": 120.0, "ref_score_after": 148.0}}, {"env": {"ref_score_before": 90.0}}]
    assert with_fast_ref_score(Protocol(), records).fast_ref_score == 148.0
    assert with_fast_ref_score(Protocol(fast_ref_score=150.0), records).fast_ref_score == 150.0
    assert with_fast_ref_score(Protocol(max_remeasure=0), records).fast_ref_score is None
