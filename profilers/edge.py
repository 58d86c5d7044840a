"""Edge devices: export graphs plus a standalone runner here, time them there, import the results.

``export_for_device`` writes ``DIR/graphs/<sub-network>/{prefill,decode}/model.onnx``,
``DIR/jobs.json`` (protocol and one job per sub-network x workload, each carrying everything a
record needs besides the measurement), ``DIR/run_profile.py`` (a copy of ``profilers/standalone.py``)
and ``DIR/standalone_ort.py`` (a copy of the ONNX Runtime runner it imports): they need only Python
3.10+, numpy and onnxruntime. On the device,
``python run_profile.py DIR`` appends one JSON line per timed job to ``DIR/results.jsonl`` and
resumes where it stopped. ``import_results`` turns those lines into store records; the device
fingerprint in each line was taken on the device, so the records carry the device's identity.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.elastic.modeldir import now
from profilers import standalone, standalone_ort
from profilers.api import make_plan
from profilers.base import graphs_for
from profilers.records import build_record, graph_bytes_for, validate_record
from profilers.standalone import Protocol
from profilers.store import ProfileStore

RUNNER = "run_profile.py"


def export_for_device(
    loaded,
    subs,
    workloads,
    out_dir,
    precision: str = "fp32",
    threads: int = 1,
    exporter: str = "torchscript",
    protocol: Protocol | None = None,
    progress=None,
) -> dict:
    """Write graphs, jobs.json and the runner into ``out_dir``; returns the manifest."""
    from compressor.core.outputs import claim_output, mark_output
    from compressor.elastic.extract import extract

    out = Path(out_dir)
    claim_output(out, "profile-export", overwrite=True)  # only ever replaces an earlier export of its own
    plan = make_plan(loaded, workloads, "onnxruntime", "cpu", precision, threads, exporter)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "profile-export")
    supernet = loaded.supernet()
    space = supernet.space
    jobs = []
    for sub in subs:
        space.validate(sub)
        directory = out / "graphs" / str(sub)
        artifacts = plan.engine.prepare(
            extract(supernet, sub), directory, plan.recipe, graphs_for(plan.workloads), plan.provider
        )
        files = {k: str(Path(v).relative_to(out)) for k, v in artifacts.files.items()}
        for w in plan.workloads:
            job = plan.job(space, sub, w, files, graph_bytes_for(artifacts.graph_bytes, w), artifacts.export)
            job["id"] = f"{sub}|{w}"  # the key needs the device's fingerprint: made at import
            jobs.append(job)
        if progress:
            progress(sub)
    manifest = {
        "schema": standalone.SCHEMA,
        "created_at": now(),
        "model": plan.model,
        "protocol": (protocol or Protocol()).to_dict(),
        "jobs": jobs,
    }
    (out / "jobs.json").write_text(json.dumps(manifest, indent=1))
    shutil.copyfile(standalone.__file__, out / RUNNER)
    shutil.copyfile(standalone_ort.__file__, out / Path(standalone_ort.__file__).name)  # RUNNER's sibling import
    return manifest


def import_results(results, store: ProfileStore | str | Path) -> tuple[int, int]:
    """Add the measurements in a runner's results file; returns (new records, lines read).

    Every line is read and checked before the store is opened (or created at a path): a missing or
    corrupt results file changes nothing."""
    path = Path(results)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise NaspruneError(f"results file {path} does not exist; pass the results.jsonl written by {RUNNER}")
    records = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            if line.get("schema") != standalone.SCHEMA:
                raise KeyError("schema")
            result = line["result"]
            result["fingerprint_id"] = standalone.fingerprint_id(result["fingerprint"])
            record = build_record(line["job"], result, line["protocol"], line["created_at"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise NaspruneError(
                f"{path}:{n} is not a {RUNNER} result line ({type(e).__name__}: {e}); "
                "pass the results.jsonl the runner wrote"
            ) from None
        validate_record(record)
        records.append(record)
    if not isinstance(store, ProfileStore):
        store = ProfileStore(store)
    return sum(store.add(r) for r in records), len(records)
