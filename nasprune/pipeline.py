"""``nasprune compress``: importance -> super-network training -> profiling -> predictor ->
search -> export -> evaluation -> report, in one run directory.

Every stage writes its output under ``RUN/`` and is skipped when that output exists, so a run
killed anywhere continues where it stopped (training resumes from its checkpoint, profiling
from its store). All knobs live in one YAML file (see ``configs/demo.yaml``). Data paths may be
``builtin:NAME`` for the public-domain texts shipped with nasprune (``compressor/data/NAME.txt``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from compressor.errors import NaspruneError
from compressor.data import check_data_roles, resolve_data
from compressor.modeldir import write_json_atomic
from compressor.outputs import claim_output, mark_output

STAGES = ("importance", "train", "profile", "predictor", "search", "export", "evaluate", "report")


@dataclass
class DataConfig:
    """The three data roles never overlap (checked by :func:`compressor.data.check_data_roles`):
    calibration/training shape the weights, validation ranks sub-networks in the search (and any
    early stopping), test produces every number in the report and is read by nothing else."""

    calibration: str = "builtin:northanger_abbey"
    train: str = "builtin:northanger_abbey"
    validation: str = "builtin:sense_and_sensibility_validation"
    test: str = "builtin:persuasion_heldout"


@dataclass
class ImportanceConfig:
    tokens: int = 32768
    layer_tokens: int = 4096
    layer_metric: str = "drop-loss"
    seq_len: int = 512
    batch_size: int = 8


@dataclass
class ProfileConfig:
    engine: str = "onnxruntime"
    device: str = "cpu"
    precision: str = "fp32"
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])
    samples: int = 24
    sampler: str = "grid-params"
    threads: int = 1
    protocol: dict = field(default_factory=dict)


@dataclass
class PredictorConfig:
    folds: int = 5
    models: list[str] = field(default_factory=lambda: ["linear", "gbrt", "random_forest"])
    seed: int = 0


@dataclass
class SearchStageConfig:
    workload: str = "prefill:1x128"
    generations: int = 8
    population: int = 16
    eval_tokens: int = 4096
    seq_len: int = 256
    max_latency_ms: float | None = None
    max_params: int | None = None
    seed: int = 0


@dataclass
class ExportConfig:
    points: int = 3
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    verify: bool = True
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])
    threads: int = 1


@dataclass
class EvalConfig:
    ppl_tokens: int = 8192
    onnx_ppl_tokens: int = 512
    seq_len: int = 256
    tasks: list[str] = field(default_factory=list)
    task_files: list[str] = field(default_factory=list)
    limit: int | None = 50
    rank_points: int = 12  # searched sub-networks scored on test text to check the validation ranking (0: skip)
    rank_tokens: int = 2048


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    train: dict = field(default_factory=dict)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    search: SearchStageConfig = field(default_factory=SearchStageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @staticmethod
    def load(path: Path | None) -> "PipelineConfig":
        import yaml

        if path is None:
            return PipelineConfig()
        if not Path(path).is_file():
            raise NaspruneError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise NaspruneError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        sections = {f.name: f.type for f in fields(PipelineConfig)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise NaspruneError(f"{path}: unknown sections {unknown}; known: {sorted(sections)}")
        kwargs = {}
        for name, value in raw.items():
            default = getattr(PipelineConfig(), name)
            if isinstance(default, dict):
                kwargs[name] = dict(value or {})
                continue
            known = {f.name for f in fields(default)}
            bad = sorted(set(value or {}) - known)
            if bad:
                raise NaspruneError(f"{path}: unknown settings {bad} in '{name}'; known: {sorted(known)}")
            kwargs[name] = type(default)(**(value or {}))
        cfg = PipelineConfig(**kwargs)
        from compressor.train import TrainConfig

        TrainConfig.load(None, cfg.train)  # validate early, one line
        check_data_roles(calibration=cfg.data.calibration, train=cfg.data.train, validation=cfg.data.validation,
                         test=cfg.data.test)
        return cfg


class Pipeline:
    def __init__(self, model: str, run_dir: Path, cfg: PipelineConfig, online: bool = False, log=print):
        self.model, self.run, self.cfg, self.online, self.log = model, Path(run_dir), cfg, online, log
        # a run dir is nasprune's own: re-running continues it; a foreign non-empty dir is refused
        claim_output(self.run, "run", resume=True)
        self.run.mkdir(parents=True, exist_ok=True)
        mark_output(self.run, "run")
        self.state_path = self.run / "run.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        self.state.update({"model": model, "config": asdict(cfg)})

    # paths
    @property
    def importance_dir(self):
        return self.run / "importance"

    @property
    def supernet_dir(self):
        return self.run / "supernet"

    @property
    def store(self):
        return self.run / "profiles.sqlite"

    @property
    def predictor_dir(self):
        return self.run / "predictor"

    @property
    def search_dir(self):
        return self.run / "search"

    @property
    def bundles_dir(self):
        return self.run / "bundles"

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("done", False)

    def _mark(self, stage: str, seconds: float, **info) -> None:
        self.state["stages"][stage] = {"done": True, "seconds": round(seconds, 1), **info}
        write_json_atomic(self.state_path, self.state)

    def execute(self, stop_after: str | None = None, force: tuple[str, ...] = ()) -> dict:
        if stop_after is not None and stop_after not in STAGES:
            raise NaspruneError(f"--stop-after must be one of {', '.join(STAGES)}")
        for stage in force:
            if stage not in STAGES:
                raise NaspruneError(f"--force must name stages from {', '.join(STAGES)}")
            self.state["stages"].pop(stage, None)
        for stage in STAGES:
            if self.done(stage):
                self.log(f"[{stage}] done earlier ({self.state['stages'][stage]['seconds']}s): skipped")
            else:
                self.log(f"[{stage}] running ...")
                t = time.perf_counter()
                info = getattr(self, f"stage_{stage}")() or {}
                self._mark(stage, time.perf_counter() - t, **info)
                self.log(f"[{stage}] finished in {time.perf_counter() - t:.1f}s")
            if stage == stop_after:
                break
        times = {s: v["seconds"] for s, v in self.state["stages"].items()}
        self.log("stage times (s): " + ", ".join(f"{s} {t}" for s, t in times.items()))
        return self.state

    # ---- stages ----------------------------------------------------------------------------
    def stage_importance(self) -> dict:
        from compressor.data import load_data
        from compressor.importance import compute_importance, layer_ranking, permute
        from compressor.importance_io import save_importance
        from compressor.modeldir import load_model

        c = self.cfg.importance
        loaded = load_model(self.model, online=self.online)
        calib = load_data(loaded.tokenizer, resolve_data(self.cfg.data.calibration), c.seq_len, c.tokens, self.online)
        sn = loaded.supernet()
        scores = compute_importance(sn, calib, calib.subset(slice(0, max(1, c.layer_tokens // c.seq_len))), c.layer_metric,
                                    c.batch_size)
        ranking = layer_ranking(scores)
        save_importance(loaded, permute(sn, scores), ranking, self.importance_dir, overwrite=True)
        return {"layer_ranking": ranking, "importance_seconds": scores.info["seconds_total"]}

    def stage_train(self) -> dict:
        from compressor.train import TrainConfig, run_training

        cfg = TrainConfig.load(None, self.cfg.train)
        resume = (self.run / "supernet.train" / "checkpoint.pt").exists()
        run_training(str(self.importance_dir), resolve_data(self.cfg.data.train), self.supernet_dir, cfg, resume=resume,
                     online=self.online, log=self.log, overwrite=True)
        meta = json.loads((self.supernet_dir / "nasprune.json").read_text())
        return {"training": {k: meta["provenance"]["training"][k] for k in ("steps", "seconds", "tokens")}}

    def stage_profile(self) -> dict:
        from compressor.modeldir import load_model
        from profilers import profile_subnetworks
        from profilers.api import choose_subnetworks
        from profilers.standalone import Protocol

        c = self.cfg.profile
        loaded = load_model(str(self.supernet_dir))
        subs = choose_subnetworks(loaded.supernet().space, sampler=c.sampler, samples=c.samples)
        records = profile_subnetworks(loaded, subs, c.workloads, engine=c.engine, device=c.device, precision=c.precision,
                                      store=self.store, threads=c.threads, protocol=Protocol.from_dict(c.protocol),
                                      workdir=self.run / "profile_work")
        return {"records": len(records)}

    def stage_predictor(self) -> dict:
        from predictors.dataset import read_store, select_group
        from predictors.fit import FitConfig, fit_predictor
        from predictors.modelspace import describe_model

        c = self.cfg.predictor
        records = select_group(read_store(self.store))
        result = fit_predictor(records, describe_model(str(self.supernet_dir)),
                               FitConfig(folds=c.folds, seed=c.seed, candidates=tuple(c.models)))
        result.predictor.save(self.predictor_dir, overwrite=True)
        cv = result.predictor.manifest["cv"]
        sel = cv["models"][cv["selected"]]
        self.log(f"  predictor: {cv['selected']}, CV MAPE {sel['mape']:.2f}%, within ±10% {sel['acc10']:.1%}")
        return {"selected": cv["selected"], "cv": sel}

    def stage_search(self) -> dict:
        from compressor.modeldir import load_model
        from compressor.search import SearchConfig
        from nasprune.search_driver import run_search_cli

        c = self.cfg.search
        cfg = SearchConfig(population=c.population, generations=c.generations, seed=c.seed,
                           max_latency_ms=c.max_latency_ms, max_params=c.max_params)
        result = run_search_cli(load_model(str(self.supernet_dir)), self.predictor_dir, c.workload,
                                resolve_data(self.cfg.data.validation), self.search_dir, cfg, c.eval_tokens, c.seq_len,
                                overwrite=True)
        return {"evaluated": len(result.evaluated), "pareto_points": len(result.pareto),
                "hypervolume": [result.hypervolume[0], result.hypervolume[-1]]}

    def picks(self) -> list:
        from compressor.search_space import SubNetwork

        rows = json.loads((self.search_dir / "pareto.json").read_text())["pareto"]
        n = min(self.cfg.export.points, len(rows))
        idx = sorted({round(i * (len(rows) - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [len(rows) // 2]
        return [(str(i), SubNetwork.from_dict(rows[i]["arch"]), rows[i]) for i in idx]

    def stage_export(self) -> dict:
        from compressor.modeldir import load_model
        from deploy.pipeline_steps import export_bundles

        c = self.cfg.export
        paths = export_bundles(load_model(str(self.supernet_dir)), self.picks(), self.bundles_dir, c.precisions,
                               self.predictor_dir, c.workloads, c.verify, c.threads, log=self.log,
                               overwrite=True)
        return {"bundles": [str(p) for p in paths]}

    def stage_evaluate(self) -> dict:
        from deploy.evaluate_bundle import evaluate_run

        c = self.cfg.evaluate
        results = evaluate_run(self, c)
        write_json_atomic(self.run / "eval.json", results)
        return {"models": len(results["models"])}

    def stage_report(self) -> dict:
        from deploy.report import write_report

        path = write_report(self)
        self.log(f"  report: {path}")
        return {"report": str(path)}

