"""The one shape of a pipeline stage, and the run context every stage reads and writes through."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    """One step of ``nasprune compress``.

    ``run(ctx)`` does the work and returns its record (kept in ``run.json`` under the stage's name).
    ``reads``/``writes``: what it reads and writes, as paths under the run directory (``<p>``: one per
    profiled precision or per exported point) or config sections. The resume rule is the same for every
    stage: it is done when ``run.json`` records it done (:meth:`done`; written once ``run`` returned),
    so a run killed inside a stage reruns that stage only; ``resumes`` says how that rerun continues
    the stage's own work instead of starting it again."""

    name: str
    run: Callable[[Any], dict]
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    resumes: str = "starts again (its outputs are overwritten)"

    def done(self, ctx: RunContext) -> bool:
        return ctx.stage_record(self.name).get("done", False)


class RunContext:
    """A run directory and its config: the paths every stage reads and writes, the run's state
    (``run.json``), the log, and the decisions more than one stage takes (which points ship)."""

    def __init__(self, model: str, run_dir: Path, cfg, online: bool = False, log=print):
        self.model, self.run, self.cfg, self.online, self.log = model, Path(run_dir), cfg, online, log
        self.state_path = self.run / "run.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}

    def stage_record(self, name: str) -> dict:
        """What ``run.json`` holds for the stage ``name`` ({} before it ran)."""
        return self.state["stages"].get(name, {})

    # paths
    @property
    def importance_dir(self):
        return self.run / "importance"

    @property
    def blocks_dir(self):
        return self.run / "blocks"

    @property
    def supernet_dir(self):
        return self.run / "supernet"

    @property
    def store(self):
        return self.run / "profiles.sqlite"

    @property
    def predictor_dir(self):
        """The first profiled precision's predictor (``fp32`` in every shipped config)."""
        return self.predictor_dirs[self.cfg.profile.precisions[0]]

    @property
    def predictor_dirs(self) -> dict:
        """precision -> predictor dir (``predictor`` for the first precision, ``predictor-<precision>``)."""
        precs = self.cfg.profile.precisions
        return {p: self.run / ("predictor" if i == 0 else f"predictor-{p}") for i, p in enumerate(precs)}

    @property
    def search_dir(self):
        return self.run / "search"

    @property
    def refined_dir(self):
        return self.run / "refined"

    @property
    def bundles_dir(self):
        return self.run / "bundles"

    # decisions shared by stages
    def picks(self) -> list:
        """The front points refine and export work on, ``(name, SubNetwork, row)``:
        :func:`search.driver.pick_points` of the search's front with the ``export`` settings."""
        from search.driver import pick_points

        x = self.cfg.export
        pareto = json.loads((self.search_dir / "pareto.json").read_text())
        return pick_points(pareto, x.points, x.max_ppl_ratio, x.targets)

    def faster_precisions(self, precisions: list[str]) -> tuple[list[str], dict]:
        """``precisions`` without the quantized ones no faster than fp32 in this run's profile store
        (:func:`search.driver.faster_precisions`), and {dropped: ratio}."""
        from search.driver import faster_precisions, store_records

        records = store_records(self.store, self.cfg.profile.engine) if "fp32" in precisions else None
        return faster_precisions(precisions, records, self.log)
