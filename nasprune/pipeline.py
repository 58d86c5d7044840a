"""``nasprune compress``: importance -> super-network training -> profiling -> predictor ->
search -> export -> evaluation -> report, in one run directory.

Every stage writes its output under ``RUN/`` and is skipped when that output exists, so a run
killed anywhere continues where it stopped (training resumes from its checkpoint, profiling
from its store). All knobs live in one YAML file (see ``configs/demo.yaml``). Data paths may be
``builtin:NAME`` for the public-domain texts shipped with nasprune (``compressor/data/NAME.txt``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from compressor.core.data import check_data_roles, resolve_data
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output, mark_output
from compressor.elastic.modeldir import write_json_atomic

STAGES = ("importance", "blocks", "train", "profile", "predictor", "search", "refine", "export", "evaluate", "report")


@dataclass
class DataConfig:
    """The three data roles never overlap (checked by :func:`compressor.core.data.check_data_roles`):
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
    """Each precision (``fp32``, or a quantization recipe of ``compressor.quant.quantize`` on onnxruntime cpu)
    is profiled on the same sub-networks and gets its own predictor; the search's precision gene
    chooses among them."""

    engine: str = "onnxruntime"
    device: str = "cpu"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])
    samples: int = 24
    # sub-networks profiled per quantization recipe (the first of the same list; quantizing a graph costs
    # ~20-40 s here, more than exporting and timing it); null: all ``samples``
    quantized_samples: int | None = None
    sampler: str = "grid-params"
    threads: int = 1
    protocol: dict = field(default_factory=dict)
    # wall-clock budget of the stage, shared by the precisions in proportion to their sub-networks: a
    # slow host profiles fewer of them (never fewer than the predictor's folds + 1) instead of overrunning
    minutes: float | None = None


@dataclass
class PredictorConfig:
    folds: int = 5
    models: list[str] = field(default_factory=lambda: ["linear", "gbrt", "random_forest"])
    seed: int = 0
    anchors: int = 1  # calibration anchors each predictor stores (median ratio when > 1)


@dataclass
class SearchStageConfig:
    workload: str = "prefill:1x128"  # or a weighted mix, "prefill:1x512 + 128*decode:1x512" (terms profiled)
    generations: int = 8
    population: int = 16
    eval_tokens: int = 4096
    seq_len: int = 256
    max_latency_ms: float | None = None
    max_params: int | None = None
    seed: int = 0
    # default: every profiled precision that measured faster than fp32 on this host (the precision gene)
    precisions: list[str] | None = None
    one_shot_baseline: bool = True  # score the untrained pruned model at the front's architectures too
    calibrate: bool = False  # re-measure the predictor's anchor first: predictions follow the machine's drift
    minutes: float | None = None  # wall-clock budget of the whole stage (baselines included): fewer generations


@dataclass
class BlocksStageConfig:
    """Block-local distillation (:mod:`compressor.recovery.bld`) of the importance-permuted super-network on
    ``data.calibration`` before ``train``: every width of every block learns the original block's
    output from cached teacher activations; ``train`` then starts from those weights (its KD teacher
    stays the original). Off by default."""

    enabled: bool = False
    steps: int = 100  # per block
    batch_size: int = 4
    seq_len: int = 256
    tokens: int = 8192
    lr: float = 1e-4
    processes: int = 1


@dataclass
class RefineStageConfig:
    """Each exported Pareto point is distilled on its own from the original before export
    (:mod:`compressor.recovery.refine`); ``enabled: false`` ships the super-network's weights as they are."""

    enabled: bool = True
    minutes: float = 3.0  # per point
    steps: int = 100_000
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 2e-4
    repair: bool = True  # closed-form repair before training
    repair_tokens: int = 4096
    # validation tokens of each before/after perplexity (up to five per point: one-shot, repaired,
    # refined, and both quantized): on a slow CPU these, not training, dominate the stage
    eval_tokens: int = 4096
    # 1 = pure logit KD from the original (measured best out of domain); 0 = cross-entropy, no teacher
    distill_alpha: float = 1.0
    # + intermediate-state distillation with this weight (the parent's blocks run live every step); 0: off
    distill_states: float = 0.0
    # block-local distillation of each point after repair, steps per block (time from the budget); 0: off
    block_steps: int = 0
    # a point the search chose at a quantization recipe is refined with that recipe simulated in the
    # forward (straight-through rounding): its weights learn to survive the engine's quantization
    quantization_aware: bool = True


def eligible_points(rows: list[dict], original_ppl: float | None, max_ppl_ratio: float | None, n: int) -> list[int]:
    """Indices (front order) of the front rows the export may pick from: those whose perplexity is
    <= ``max_ppl_ratio`` x the original's, topped up with the next-lowest-perplexity rows to ``n``."""
    everything = list(range(len(rows)))
    if max_ppl_ratio is None or original_ppl is None:
        return everything
    by_quality = sorted(everything, key=lambda i: rows[i]["ppl"])
    keep = [i for i in by_quality if rows[i]["ppl"] <= max_ppl_ratio * original_ppl]
    keep = keep if len(keep) >= n else by_quality[:n]
    return sorted(keep)


def target_points(rows: list[dict], original_ppl: float | None, targets: list[float]) -> list[tuple[float, int]]:
    """For every quality budget ``r`` in ``targets``: (r, index of the fastest front row whose validation
    perplexity is <= r x the original's), at whatever precision the search chose for it. A budget
    nothing meets gets the lowest-perplexity row (the closest the front comes); without an original
    to compare with, every budget does. Budgets that land on the same row keep it once."""
    if not rows:
        return []
    best = min(range(len(rows)), key=lambda i: rows[i]["ppl"])
    out: list[tuple[float, int]] = []
    for r in targets:
        ok = [i for i, row in enumerate(rows) if original_ppl is not None and row["ppl"] <= r * original_ppl]
        i = min(ok, key=lambda i: (rows[i]["predicted_ms"], rows[i]["ppl"])) if ok else best
        if i not in (j for _, j in out):
            out.append((r, i))
    return out


@dataclass
class ExportConfig:
    points: int = 3
    # engine variants of every exported point, plus the precision the search chose for it
    precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    # the original's variants (plus every profiled precision): the user's alternatives, e.g. plain int8
    baseline_precisions: list[str] = field(default_factory=lambda: ["fp32", "int8"])
    verify: bool = True
    workloads: list[str] = field(default_factory=lambda: ["prefill:1x128"])  # workloads or mixes; first: report's
    threads: int = 1
    # also export the unpruned original at every precision: the user's alternative, measured the same way
    baseline: bool = True
    # closed-form repair (compressor/recovery/repair.py) of each exported point on data.calibration, perplexity
    # before/after on data.validation in the manifest; points the refine stage refined are never
    # repaired again (refine repairs before training; the manifest says so)
    repair: bool = False
    repair_tokens: int = 4096
    repair_eval_tokens: int = 2048
    # pick the points among the front's points whose validation perplexity (search) is <= this x the
    # original's (at least ``points`` of them: the lowest-perplexity ones when fewer qualify); None: the
    # whole front. The front's fast end (e.g. a 22M model at 30x the original's perplexity) is no
    # alternative to the original at any precision: refining and shipping it spends minutes on nothing
    max_ppl_ratio: float | None = None
    # quality budgets instead of ``points``/``max_ppl_ratio``: for each ratio r, ship the fastest front point
    # (any searched precision) whose validation perplexity is <= r x the original's: "the fastest model
    # within 1.3x of the original" is the question a user with a latency target asks. The search scores
    # the super-network's weights before refine, which takes 1.2-1.5x off, so a budget is conservative
    targets: list[float] | None = None


@dataclass
class EvalConfig:
    ppl_tokens: int = 8192
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
    refine: RefineStageConfig = field(default_factory=RefineStageConfig)
    blocks: BlocksStageConfig = field(default_factory=BlocksStageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    @staticmethod
    def load(path: Path | None) -> PipelineConfig:
        """The config in the YAML file ``path`` (defaults for None). Everything a stage will read is
        checked here, in one line per problem: unknown sections and settings (typos), wrong value
        types, bad workloads and names, overlapping data roles; not hours later in that stage."""
        from compressor.core.yamlconfig import read_yaml_mapping

        if path is None:
            return PipelineConfig()
        raw = read_yaml_mapping(path)
        sections = {f.name: f.type for f in fields(PipelineConfig)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise NaspruneError(f"{path}: unknown sections {unknown}; known: {sorted(sections)}")
        kwargs = {}
        for name, value in raw.items():
            if value is not None and not isinstance(value, dict):
                raise NaspruneError(f"{path}: section '{name}' must hold settings (key: value), not {value!r}")
            default = getattr(PipelineConfig(), name)
            if isinstance(default, dict):
                kwargs[name] = dict(value or {})
                continue
            known = {f.name for f in fields(default)}
            bad = sorted(set(value or {}) - known)
            if bad:
                raise NaspruneError(f"{path}: unknown settings {bad} in '{name}'; known: {sorted(known)}")
            optional = {f.name for f in fields(default) if "None" in str(f.type)}
            for key, v in (value or {}).items():
                _check_type(path, f"{name}.{key}", v, getattr(default, key), key in optional)
            kwargs[name] = type(default)(**(value or {}))
        cfg = PipelineConfig(**kwargs)
        cfg.validate(path)
        cfg.canonical_workloads()
        return cfg

    def canonical_workloads(self) -> None:
        """Spell the search and export workloads (or mixes) as nasprune prints them, so the keys a bundle's
        manifest stores them under (``str(WorkloadMix)``) are the strings the report looks up."""
        from compressor.core.workload import WorkloadMix

        self.search.workload = str(WorkloadMix.parse(str(self.search.workload)))
        self.export.workloads = [str(WorkloadMix.parse(str(w))) for w in self.export.workloads]

    def blocks_config(self):
        from dataclasses import asdict as _asdict

        from compressor.recovery.bld import BlockDistillConfig

        return BlockDistillConfig(**{k: v for k, v in _asdict(self.blocks).items() if k != "enabled"})

    def refine_config(self):
        from compressor.recovery.refine import RefineConfig

        r = self.refine
        return RefineConfig(
            minutes=r.minutes,
            steps=r.steps,
            batch_size=r.batch_size,
            seq_len=r.seq_len,
            lr=r.lr,
            repair=r.repair,
            repair_tokens=r.repair_tokens,
            distill_alpha=r.distill_alpha,
            distill_states=r.distill_states,
            block_steps=r.block_steps,
            eval_tokens=r.eval_tokens,
        )

    def validate(self, path: Path | str = "config") -> None:
        """Refuse (one line naming the file and section) values a stage would otherwise fail on
        only after the stages before it have run."""
        from compressor.core.workload import Workload, WorkloadMix
        from compressor.elastic.importance import LAYER_METRICS
        from compressor.recovery.train import TrainConfig
        from deploy.bundle import check_variants
        from predictors.fit import FitConfig
        from profilers.base import get_engine
        from profilers.standalone import Protocol

        def at_least_one(key: str, value) -> None:
            if value < 1:
                raise NaspruneError(f"{key} must be >= 1, not {value}")

        def layer_metric(value: str) -> None:
            if value not in LAYER_METRICS:
                raise NaspruneError(f"layer_metric '{value}' is not one of {', '.join(LAYER_METRICS)}")

        def protocol(d: dict) -> None:
            try:
                Protocol.from_dict(d)
            except (ValueError, TypeError) as e:
                raise NaspruneError(f"{e} (under 'protocol')") from None

        p, x = self.profile, self.export
        checks = [
            ("train", lambda: TrainConfig.load(None, self.train)),
            (
                "data",
                lambda: check_data_roles(
                    calibration=self.data.calibration,
                    train=self.data.train,
                    validation=self.data.validation,
                    test=self.data.test,
                ),
            ),
            ("importance", lambda: layer_metric(self.importance.layer_metric)),
            ("profile", lambda: [Workload.parse(str(w)) for w in p.workloads]),
            ("profile", lambda: [get_engine(p.engine).check(p.device, prec) for prec in p.precisions]),
            ("profile", lambda: _at_least_one_precision(p.precisions)),
            ("search", lambda: _subset_of(self.search.precisions, p.precisions)),
            ("profile", lambda: protocol(p.protocol)),
            ("profile", lambda: (at_least_one("threads", p.threads), at_least_one("samples", p.samples))),
            (
                "predictor",
                lambda: FitConfig(
                    folds=self.predictor.folds,
                    seed=self.predictor.seed,
                    candidates=tuple(self.predictor.models),
                    anchors=self.predictor.anchors,
                ),
            ),
            ("search", lambda: _profiled(WorkloadMix.parse(str(self.search.workload)), p.workloads)),
            ("export", lambda: check_variants(x.precisions)),
            ("export", lambda: check_variants(x.baseline_precisions)),
            ("export", lambda: [WorkloadMix.parse(str(w)) for w in x.workloads]),
            ("export", lambda: (at_least_one("threads", x.threads), at_least_one("points", x.points))),
            ("refine", lambda: self.refine_config()),
            ("blocks", lambda: self.blocks_config()),
            ("export", lambda: _repair_config(x.repair_tokens) if x.repair else None),
            ("export", lambda: _positive_or_none("max_ppl_ratio", x.max_ppl_ratio)),
            ("export", lambda: _targets(x.targets, x.max_ppl_ratio)),
            ("profile", lambda: _positive_or_none("minutes", p.minutes)),
            ("search", lambda: _positive_or_none("minutes", self.search.minutes)),
        ]
        for section, check in checks:
            try:
                check()
            except NaspruneError as e:
                raise NaspruneError(f"{path}: section '{section}': {e}") from None


def _positive_or_none(key: str, value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise NaspruneError(f"{key} must be a number > 0 (or absent), not {value!r}")


def _targets(targets: list[float] | None, max_ppl_ratio: float | None) -> None:
    if targets is None:
        return
    numbers = isinstance(targets, list) and all(
        isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in targets
    )
    if not targets or not numbers:
        raise NaspruneError(f"targets must list perplexity ratios > 0, at least one, not {targets!r}")
    if max_ppl_ratio is not None:
        raise NaspruneError("targets and max_ppl_ratio both choose the exported points: set one of them")


def _at_least_one_precision(precisions: list[str]) -> None:
    if not precisions or len(set(precisions)) != len(precisions):
        raise NaspruneError(f"precisions must list distinct precisions, at least one, not {precisions}")


def _profiled(mix, profiled: list[str]) -> None:
    """The search predicts every term of its workload mix: each must be a profiled workload."""
    from compressor.core.workload import Workload

    have = {Workload.parse(str(w)) for w in profiled}
    missing = [str(w) for w in mix.workloads if w not in have]
    if missing:
        raise NaspruneError(
            f"workload(s) {missing} of the search workload '{mix}' are not profiled; add them to "
            f"profile.workloads (now {profiled})"
        )


def _subset_of(searched: list[str] | None, profiled: list[str]) -> None:
    missing = [p for p in searched or [] if p not in profiled]
    if missing:
        raise NaspruneError(f"precisions {missing} are not profiled (profile.precisions: {profiled})")


def _repair_config(tokens: int):
    from compressor.recovery.repair import RepairConfig

    return RepairConfig(tokens=tokens)


def _check_type(path, key: str, value, default, optional: bool) -> None:
    """A setting must have its default's type (an int is a fine float; null is fine where the field is
    optional): a quoted number, or one word where a list is expected, is refused at load."""
    if value is None and optional or default is None:
        return
    want = float if isinstance(default, float) else type(default)
    if want is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if not ok:
        raise NaspruneError(f"{path}: {key} must be of type {want.__name__} (like {default!r}), not {value!r}")


def host_safe_config(cfg: PipelineConfig, flags: set[str] | None = None) -> tuple[PipelineConfig, dict[str, str]]:
    """``cfg`` with every precision this CPU would compute as garbage replaced by its safe counterpart
    (:func:`compressor.quant.quantize.host_precision`), and {replaced: why}.

    Profiling, search and export all run on this host, so a (recipe, host) pair that saturates here
    must never be profiled, proposed or shipped; the same YAML keeps the full-range recipe on a VNNI
    CPU. Only the CPU device of onnxruntime has such pairs.
    """
    from compressor.quant.quantize import host_precision

    if cfg.profile.device != "cpu" or cfg.profile.engine != "onnxruntime":
        return cfg, {}
    why: dict[str, str] = {}

    def safe(precisions):
        if precisions is None:
            return None
        out = []
        for p in precisions:
            q, reason = host_precision(p, flags)
            if reason:
                why[p] = f"{p} -> {q}: {reason}"
            out.append(q)
        return list(dict.fromkeys(out))

    cfg = replace(
        cfg,
        profile=replace(cfg.profile, precisions=safe(cfg.profile.precisions)),
        search=replace(cfg.search, precisions=safe(cfg.search.precisions)),
        export=replace(
            cfg.export,
            precisions=safe(cfg.export.precisions),
            baseline_precisions=safe(cfg.export.baseline_precisions),
        ),
    )
    return cfg, why


class Pipeline:
    def __init__(self, model: str, run_dir: Path, cfg: PipelineConfig, online: bool = False, log=print):
        cfg, substituted = host_safe_config(cfg)
        for reason in substituted.values():
            log(f"precision {reason}")
        self.model, self.run, self.cfg, self.online, self.log = model, Path(run_dir), cfg, online, log
        for role in ("calibration", "train", "validation", "test"):
            ref = getattr(cfg.data, role)
            if not online and not Path(resolve_data(ref)).expanduser().is_file():
                raise NaspruneError(
                    f"data.{role} '{ref}' is not a file; give a .txt or Alpaca .jsonl (or builtin:NAME), "
                    "or a hub dataset name with --online"
                )
        # a run dir is nasprune's own: re-running continues it; a foreign non-empty dir is refused.
        # Nothing is written before execute() has checked its arguments too.
        claim_output(self.run, "run", resume=True)
        self.state_path = self.run / "run.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"stages": {}}
        self.state.update({"model": model, "config": asdict(cfg), "host_substitutions": substituted})

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
        self.run.mkdir(parents=True, exist_ok=True)
        mark_output(self.run, "run")
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
        from compressor.core.data import load_data
        from compressor.elastic.importance import compute_importance, layer_ranking, permute
        from compressor.elastic.importance_io import save_importance
        from compressor.elastic.modeldir import load_model

        c = self.cfg.importance
        loaded = load_model(self.model, online=self.online)
        calib = load_data(loaded.tokenizer, resolve_data(self.cfg.data.calibration), c.seq_len, c.tokens, self.online)
        sn = loaded.supernet()
        scores = compute_importance(
            sn, calib, calib.subset(slice(0, max(1, c.layer_tokens // c.seq_len))), c.layer_metric, c.batch_size
        )
        ranking = layer_ranking(scores)
        save_importance(loaded, permute(sn, scores), ranking, self.importance_dir, overwrite=True)
        return {"layer_ranking": ranking, "importance_seconds": scores.info["seconds_total"]}

    @property
    def blocks_dir(self):
        return self.run / "blocks"

    def stage_blocks(self) -> dict:
        """BLD of the permuted super-network (skipped unless ``blocks: enabled: true``)."""
        if not self.cfg.blocks.enabled:
            return {"enabled": False}
        from compressor.recovery.bld import distill_blocks_to

        _, report = distill_blocks_to(
            str(self.importance_dir),
            resolve_data(self.cfg.data.calibration),
            self.blocks_dir,
            self.cfg.blocks_config(),
            online=self.online,
            log=self.log,
            overwrite=True,
        )
        worst = max(report["blocks"], key=lambda r: r["loss_last"])
        self.log(f"  {len(report['blocks'])} blocks in {report['seconds']:.0f}s; worst block {worst['layer']}")
        return {"enabled": True, "bld_seconds": report["seconds"], "blocks": report["blocks"]}

    def stage_train(self) -> dict:
        from compressor.recovery.train import TrainConfig, run_training

        cfg = TrainConfig.load(None, self.cfg.train)
        resume = (self.run / "supernet.train" / "checkpoint.pt").exists()
        bld = self.state["stages"].get("blocks", {}).get("enabled", False) and self.blocks_dir.is_dir()
        original_teaches = bld and cfg.distill == "logits" and cfg.teacher == "original"
        run_training(
            str(self.blocks_dir if bld else self.importance_dir),
            resolve_data(self.cfg.data.train),
            self.supernet_dir,
            cfg,
            resume=resume,
            teacher_cache_dir=self.run / "teacher",
            online=self.online,
            log=self.log,
            overwrite=True,
            teacher=str(self.importance_dir) if original_teaches else None,  # KD from the original, not BLD's
        )
        meta = json.loads((self.supernet_dir / "nasprune.json").read_text())
        return {"training": {k: meta["provenance"]["training"][k] for k in ("steps", "seconds", "tokens")}}

    def stage_profile(self) -> dict:
        from compressor.core.precisions import FLOAT_PRECISIONS
        from compressor.elastic.modeldir import load_model
        from profilers import profile_subnetworks
        from profilers.api import choose_subnetworks
        from profilers.standalone import Protocol

        c = self.cfg.profile
        loaded = load_model(str(self.supernet_dir))
        subs = choose_subnetworks(loaded.supernet().space, sampler=c.sampler, samples=c.samples)
        plan = {  # same sub-networks at every precision (the store resumes per group)
            p: subs if p in FLOAT_PRECISIONS or not c.quantized_samples else subs[: c.quantized_samples]
            for p in c.precisions
        }
        start, counts = time.perf_counter(), {}
        for i, (precision, chosen) in enumerate(plan.items()):
            share = None
            if c.minutes is not None:  # what is left, split by the sub-networks still to do
                left = c.minutes * 60 - (time.perf_counter() - start)
                share = left * len(chosen) / sum(len(v) for v in list(plan.values())[i:])
            self.log(f"  profiling {len(chosen)} sub-networks at {precision}")
            records = profile_subnetworks(
                loaded,
                chosen,
                c.workloads,
                engine=c.engine,
                device=c.device,
                precision=precision,
                store=self.store,
                threads=c.threads,
                protocol=Protocol.from_dict(c.protocol),
                workdir=self.run / "profile_work",
                max_seconds=share,
                min_subnetworks=self.cfg.predictor.folds + 1,
            )
            counts[precision] = len(records) // len(c.workloads)
            if counts[precision] < len(chosen):
                self.log(
                    f"  {precision}: {counts[precision]} of {len(chosen)} within its {share:.0f}s of profile.minutes"
                )
        return {"records": counts}

    def stage_predictor(self) -> dict:
        from compressor.core.precisions import is_quantized
        from predictors.dataset import read_store, select_group
        from predictors.fit import FitConfig, fit_predictor
        from predictors.modelspace import describe_model

        c = self.cfg.predictor
        store = read_store(self.store)
        info, reference = {}, None
        # float precisions first: a quantized precision (profiled on fewer sub-networks) may then be
        # predicted as a ratio to the fp32 predictor, if that cross-validates better (predictors.models)
        order = sorted(self.predictor_dirs.items(), key=lambda item: is_quantized(item[0]))
        for precision, directory in order:
            result = fit_predictor(
                select_group(store, precision=precision, engine=self.cfg.profile.engine),
                describe_model(str(self.supernet_dir)),
                FitConfig(folds=c.folds, seed=c.seed, candidates=tuple(c.models), anchors=c.anchors),
                reference=reference if is_quantized(precision) else None,
            )
            if precision == "fp32":
                reference = result.predictor
            result.predictor.save(directory, overwrite=True)
            cv = result.predictor.manifest["cv"]
            sel = cv["models"][cv["selected"]]
            self.log(
                f"  predictor {precision}: {cv['selected']}, CV MAPE {sel['mape']:.2f}%, within ±10% {sel['acc10']:.1%}"
            )
            info[precision] = {"selected": cv["selected"], "cv": sel}
        first = info[self.cfg.profile.precisions[0]]
        return {**first, "precisions": info}

    def stage_search(self) -> dict:
        from compressor.elastic.modeldir import load_model
        from search.driver import run_search_cli
        from search.problem import SearchConfig

        c = self.cfg.search
        precisions, slower = list(c.precisions or self.cfg.profile.precisions), {}
        if c.precisions is None:
            precisions, slower = self.faster_precisions(precisions)
        cfg = SearchConfig(
            population=c.population,
            generations=c.generations,
            seed=c.seed,
            max_latency_ms=c.max_latency_ms,
            max_params=c.max_params,
            precisions=precisions,
            max_minutes=c.minutes,
        )
        result = run_search_cli(
            load_model(str(self.supernet_dir)),
            list(self.predictor_dirs.values()),
            c.workload,
            resolve_data(self.cfg.data.validation),
            self.search_dir,
            cfg,
            c.eval_tokens,
            c.seq_len,
            overwrite=True,
            calibrate=c.calibrate,
            one_shot=load_model(str(self.importance_dir)) if c.one_shot_baseline else None,
            calibration_data=resolve_data(self.cfg.data.calibration),
        )
        return {
            "evaluated": len(result.evaluated),
            "pareto_points": len(result.pareto),
            "hypervolume": [result.hypervolume[0], result.hypervolume[-1]],
            "generations": len(result.hypervolume),
            "precisions": precisions,
            "not_faster_than_fp32": slower,
        }

    def faster_precisions(self, precisions: list[str]) -> tuple[list[str], dict]:
        """``precisions`` without the quantized ones that measured no faster than fp32 here (median
        latency ratio over the sub-networks profiled at both >= 1), and {dropped: ratio}.

        Such a recipe can only add quality loss at no speed to the front, yet a predictor fitted on a
        few of its profiles (the minimum of a short budget) may still predict it a little faster, and
        the search then ships it (measured on an AVX2-only CPU: int8-pc7 at 1.04x of fp32). Its
        original stays a baseline; an explicit ``search.precisions`` is searched as given.
        """
        from predictors.dataset import latency_ratios, read_store

        if "fp32" not in precisions:
            return precisions, {}
        ratios = latency_ratios(read_store(self.store, engine=self.cfg.profile.engine))
        slower = {p: round(ratios[p]["median"], 3) for p in precisions if p in ratios and ratios[p]["median"] >= 1.0}
        for p, ratio in slower.items():
            self.log(f"  {p} left out of the search: {ratio:.2f}x of fp32's latency here ({ratios[p]['pairs']} pairs)")
        return [p for p in precisions if p not in slower], slower

    def picks(self) -> list:
        from compressor.elastic.search_space import SubNetwork

        pareto = json.loads((self.search_dir / "pareto.json").read_text())
        rows = pareto["pareto"]
        original_ppl = (pareto.get("original") or {}).get("ppl")
        if self.cfg.export.targets:
            return [
                (str(i), SubNetwork.from_dict(rows[i]["arch"]), rows[i])
                for _, i in sorted(target_points(rows, original_ppl, self.cfg.export.targets), key=lambda t: t[1])
            ]
        n = min(self.cfg.export.points, len(rows))
        pool = eligible_points(rows, original_ppl, self.cfg.export.max_ppl_ratio, n)
        spread = [round(i * (len(pool) - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [len(pool) // 2]
        idx = sorted({pool[j] for j in spread})
        return [(str(i), SubNetwork.from_dict(rows[i]["arch"]), rows[i]) for i in idx]

    @property
    def refined_dir(self):
        return self.run / "refined"

    def stage_refine(self) -> dict:
        """Distil each point that will be exported on its own (repair first); quality before/after on
        the validation text (the test text stays unread until the evaluate stage)."""
        if not self.cfg.refine.enabled:
            self.log("  refine disabled: exporting the super-network's weights")
            return {"enabled": False}
        from dataclasses import replace

        from compressor.core.precisions import is_quantized, needs_calibration
        from compressor.recovery.refine import refine

        records = {}
        for name, sub, row in self.picks():
            precision = (row or {}).get("precision") or "fp32"
            # static recipes are calibrated on the refined weights at export: their points train in float
            trainable = is_quantized(precision) and not needs_calibration(precision)
            qat = precision if self.cfg.refine.quantization_aware and trainable else None
            how = f", {qat} simulated" if qat else ""
            self.log(f"  refining {sub} for {self.cfg.refine.minutes:g} min{how}")
            resume = (self.refined_dir / f"{name}-{sub}.train" / "checkpoint.pt").exists()
            rec = refine(
                str(self.supernet_dir),
                sub,
                resolve_data(self.cfg.data.train),
                self.refined_dir / f"{name}-{sub}",
                replace(self.cfg.refine_config(), quantization=qat),
                validation=resolve_data(self.cfg.data.validation),
                online=self.online,
                resume=resume,
                overwrite=True,
                log=lambda *_: None,
                teacher=str(self.importance_dir),
                teacher_cache_dir=self.run / "teacher",
            )
            shown = ", ".join(
                f"{k.removeprefix('ppl_')} {rec[k]:.2f}"
                for k in ("ppl_one_shot", "ppl_repaired", "ppl_refined")
                if rec.get(k)
            )
            self.log(f"    validation perplexity {shown} ({rec['training']['steps']} steps)")
            records[f"{name}-{sub}"] = {
                k: rec.get(k)
                for k in (
                    "ppl_one_shot",
                    "ppl_repaired",
                    "ppl_refined",
                    "ppl_one_shot_quantized",
                    "ppl_refined_quantized",
                    "training",
                )
            }
            records[f"{name}-{sub}"]["quantization"] = qat
        return {"enabled": True, "points": records}

    def export_variants(self, picks=None) -> list[str]:
        """Engine variants of the bundles: the configured ones plus every precision the exported points
        were chosen at (``picks`` None: the original baseline, at every profiled precision too)."""
        if picks is None:
            return list(dict.fromkeys([*self.cfg.export.baseline_precisions, *self.cfg.profile.precisions]))
        chosen = [row.get("precision") for _, _, row in picks if row]
        return list(dict.fromkeys([*self.cfg.export.precisions, *(p for p in chosen if p)]))

    def stage_export(self) -> dict:
        from compressor.elastic.modeldir import load_model
        from deploy.pipeline_steps import export_bundles

        c = self.cfg.export
        picks = self.picks()
        refined = self.cfg.refine.enabled and self.state["stages"].get("refine", {}).get("enabled", False)
        baseline = []
        if c.baseline:  # the original (permuted: same function) as a bundle at every precision, name "original-..."
            original = load_model(str(self.importance_dir))
            baseline = export_bundles(
                original,
                [("original", original.supernet().space.largest(), None)],
                self.bundles_dir,
                self.export_variants(None),
                list(self.predictor_dirs.values()),
                c.workloads,
                c.verify,
                c.threads,
                log=self.log,
                overwrite=True,
                calibration_data=resolve_data(self.cfg.data.calibration),
            )
            del original
        if not refined:
            supernet, fix = load_model(str(self.supernet_dir)), None
            if c.repair:  # targets from the original (same permutation), never the trained super-network
                from deploy.pipeline_steps import repair_for_export

                fix = repair_for_export(
                    supernet,
                    resolve_data(self.cfg.data.calibration),
                    c.repair_tokens,
                    resolve_data(self.cfg.data.validation),
                    c.repair_eval_tokens,
                    self.online,
                    teacher=load_model(str(self.importance_dir)),
                    log=self.log,
                )
            paths = export_bundles(
                supernet,
                picks,
                self.bundles_dir,
                self.export_variants(picks),
                list(self.predictor_dirs.values()),
                c.workloads,
                c.verify,
                c.threads,
                log=self.log,
                overwrite=True,
                repair=fix,
                calibration_data=resolve_data(self.cfg.data.calibration),
            )
            return {
                "bundles": [str(p) for p in paths],
                "baseline": [str(p) for p in baseline],
                "refined": False,
                "repair": "at export" if c.repair else "off",
            }
        paths = []
        for name, sub, row in picks:  # each refined model is a standalone checkpoint whose largest is ``sub``
            directory = self.refined_dir / f"{name}-{sub}"
            note = self._refined_repair_note(directory)
            paths += export_bundles(
                load_model(str(directory)),
                [(name, sub, row)],
                self.bundles_dir,
                self.export_variants([(name, sub, row)]),
                list(self.predictor_dirs.values()),
                c.workloads,
                c.verify,
                c.threads,
                log=self.log,
                overwrite=True,
                repair=lambda _sub, note=note: (None, note),
                calibration_data=resolve_data(self.cfg.data.calibration),
            )
        return {
            "bundles": [str(p) for p in paths],
            "baseline": [str(p) for p in baseline],
            "refined": True,
            "repair": "before refine" if self.cfg.refine.repair else "off",
        }

    def _refined_repair_note(self, directory: Path) -> dict:
        """The manifest's ``repair`` section of a refined point: refine repaired it (or not) before its
        training, so export never repairs it again (the refined weights are no longer the pruned ones
        the closed form corrects)."""
        from compressor.elastic.modeldir import ModelMeta

        rec = (ModelMeta.read(directory).subnetwork or {}).get("refine", {})
        repaired = bool((rec.get("config") or {}).get("repair"))
        return {
            "applied": "before refine" if repaired else "none (refine ran without repair)",
            "data": rec.get("data") if repaired else None,
            "ppl_before": rec.get("ppl_one_shot"),
            "ppl_after": rec.get("ppl_repaired"),
            "ppl_refined": rec.get("ppl_refined"),
            "ppl_on": rec.get("validation"),
            "note": "not repaired at export: the refine stage owns this point's repair"
            + ("" if not self.cfg.export.repair else " (export.repair ignored for refined points)"),
        }

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
