"""``nasprune compress``: importance -> (blocks) -> super-network training -> profiling -> predictor ->
search -> refine -> export -> evaluation -> report, in one run directory.

Every stage (one file each in :mod:`nasprune.stages`, all of the shape :class:`~nasprune.stages.base.Stage`)
writes its output under ``RUN/`` and is skipped once ``RUN/run.json`` records it done, so a run killed
anywhere continues where it stopped (training resumes from its checkpoint, profiling from its store,
refine per point). All knobs live in one YAML file (:mod:`nasprune.config`, see ``configs/demo.yaml``).
"""

from __future__ import annotations

import time
from pathlib import Path

from compressor.core.data import resolve_data
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output, mark_output
from compressor.elastic.modeldir import write_json_atomic
from nasprune.config import DataConfig, PipelineConfig, host_safe_config
from nasprune.stages import blocks, evaluate, export, importance, predictor, profile, refine, report, search, train
from nasprune.stages.base import RunContext, Stage
from nasprune.stages.blocks import BlocksStageConfig
from nasprune.stages.evaluate import EvalConfig
from nasprune.stages.export import ExportConfig
from nasprune.stages.importance import ImportanceConfig
from nasprune.stages.predictor import PredictorConfig
from nasprune.stages.profile import ProfileConfig
from nasprune.stages.refine import RefineStageConfig
from nasprune.stages.search import SearchStageConfig
from search.driver import eligible_points, target_points

# the stages in the order they run
STAGE_LIST: tuple[Stage, ...] = tuple(
    m.STAGE for m in (importance, blocks, train, profile, predictor, search, refine, export, evaluate, report)
)
STAGES = tuple(s.name for s in STAGE_LIST)

__all__ = [
    "STAGES",
    "STAGE_LIST",
    "BlocksStageConfig",
    "DataConfig",
    "EvalConfig",
    "ExportConfig",
    "ImportanceConfig",
    "Pipeline",
    "PipelineConfig",
    "PredictorConfig",
    "ProfileConfig",
    "RefineStageConfig",
    "SearchStageConfig",
    "eligible_points",
    "host_safe_config",
    "target_points",
]


class Pipeline(RunContext):
    """A compress run: the run context (:class:`~nasprune.stages.base.RunContext`) and the runner."""

    def __init__(self, model: str, run_dir: Path, cfg: PipelineConfig, online: bool = False, log=print):
        cfg, substituted = host_safe_config(cfg)
        for reason in substituted.values():
            log(f"precision {reason}")
        for role in ("calibration", "train", "validation", "test"):
            ref = getattr(cfg.data, role)
            if not online and not Path(resolve_data(ref)).expanduser().is_file():
                raise NaspruneError(
                    f"data.{role} '{ref}' is not a file; give a .txt or Alpaca .jsonl (or builtin:NAME), "
                    "or a hub dataset name with --online"
                )
        # a run dir is nasprune's own: re-running continues it; a foreign non-empty dir is refused.
        # Nothing is written before execute() has checked its arguments too.
        claim_output(Path(run_dir), "run", resume=True)
        super().__init__(model, run_dir, cfg, online, log)
        self.state.update({"model": model, "config": cfg.to_dict(), "host_substitutions": substituted})

    def done(self, stage: str) -> bool:
        return _by_name(stage).done(self)

    def _mark(self, stage: str, seconds: float, **info) -> None:
        self.state["stages"][stage] = {"done": True, "seconds": round(seconds, 1), **info}
        write_json_atomic(self.state_path, self.state)

    def run_stage(self, name: str) -> dict:
        """Run the stage ``name`` now (done or not; nothing is recorded): its record."""
        return _by_name(name).run(self) or {}

    def __getattr__(self, name: str):
        """``stage_<name>()``: :meth:`run_stage` of that stage (the methods the stages once were)."""
        if name.startswith("stage_") and name[len("stage_") :] in STAGES:
            return lambda: self.run_stage(name[len("stage_") :])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def export_variants(self, picks=None) -> list[str]:
        return export.export_variants(self, picks)

    def execute(self, stop_after: str | None = None, force: tuple[str, ...] = ()) -> dict:
        if stop_after is not None and stop_after not in STAGES:
            raise NaspruneError(f"--stop-after must be one of {', '.join(STAGES)}")
        for name in force:
            if name not in STAGES:
                raise NaspruneError(f"--force must name stages from {', '.join(STAGES)}")
            self.state["stages"].pop(name, None)
        self.run.mkdir(parents=True, exist_ok=True)
        mark_output(self.run, "run")
        for stage in STAGE_LIST:
            if stage.done(self):
                self.log(f"[{stage.name}] done earlier ({self.stage_record(stage.name)['seconds']}s): skipped")
            else:
                self.log(f"[{stage.name}] running ...")
                t = time.perf_counter()
                info = stage.run(self) or {}
                self._mark(stage.name, time.perf_counter() - t, **info)
                self.log(f"[{stage.name}] finished in {time.perf_counter() - t:.1f}s")
            if stage.name == stop_after:
                break
        times = {s: v["seconds"] for s, v in self.state["stages"].items()}
        self.log("stage times (s): " + ", ".join(f"{s} {t}" for s, t in times.items()))
        return self.state


def _by_name(name: str) -> Stage:
    for stage in STAGE_LIST:
        if stage.name == name:
            return stage
    raise NaspruneError(f"no stage '{name}'; stages: {', '.join(STAGES)}")
