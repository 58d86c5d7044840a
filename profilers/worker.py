"""The timing process: ``python -m profilers.worker JOBS.json``.

Timing runs in a fresh process so that nothing the parent did (exporting, extracting, allocator
state, imported libraries) colours the numbers, and so that the parent can enforce the
machine-wide lock and isolation per job. Each finished job is written at once as one JSON line
on the original stdout (``{"id", "result"}`` or ``{"id", "error"}``); everything else any library
prints, C level included, goes to stderr. The parent stores each line as it arrives, so a killed
run keeps every finished job.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(argv: list[str]) -> int:
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (ORT, TensorRT, transformers) must not corrupt the result stream
    spec = json.loads(open(argv[0]).read())
    from profilers.base import get_engine
    from profilers.standalone import Protocol

    protocol = Protocol.from_dict(spec["protocol"])
    for job in spec["jobs"]:
        try:
            result = get_engine(job["engine"]).run_job(job, protocol)
            line = {"id": job["id"], "result": result}
        except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
            traceback.print_exc()
            line = {"id": job["id"], "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        results.write(json.dumps(line) + "\n")
        results.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
