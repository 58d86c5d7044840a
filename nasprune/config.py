"""The one YAML file of ``nasprune compress`` (see ``configs/demo.yaml``): a section per stage, each
loaded into its dataclass; ``refine:`` and ``blocks:`` load into the algorithms' own configs
(:class:`~compressor.recovery.refine.RefineConfig`, :class:`~compressor.recovery.bld.BlockDistillConfig`),
``train:`` is handed to :meth:`~compressor.recovery.train.TrainConfig.load`. Data paths may be
``builtin:NAME`` for the public-domain texts shipped with nasprune (``compressor/data/NAME.txt``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from compressor.core.data import check_data_roles
from compressor.core.errors import NaspruneError
from nasprune.stages.blocks import BlocksStageConfig
from nasprune.stages.evaluate import EvalConfig
from nasprune.stages.export import ExportConfig
from nasprune.stages.importance import ImportanceConfig
from nasprune.stages.predictor import PredictorConfig
from nasprune.stages.profile import ProfileConfig
from nasprune.stages.refine import RefineStageConfig
from nasprune.stages.search import SearchStageConfig


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
            kwargs[name] = _section(path, name, dict(value or {}), getattr(PipelineConfig(), name))
        cfg = PipelineConfig(**kwargs)
        cfg.validate(path)
        cfg.canonical_workloads()
        return cfg

    def to_dict(self) -> dict:
        """Every setting, each section as its YAML spells it (the algorithm settings of ``refine`` and
        ``blocks`` flat beside the stage's own): what ``run.json`` records as the run's config."""
        out = {}
        for f in fields(self):
            section = getattr(self, f.name)
            nested = getattr(type(section), "NESTED", None)
            if nested is None:
                out[f.name] = asdict(section) if not isinstance(section, dict) else dict(section)
                continue
            own = {k: v for k, v in asdict(section).items() if k != nested}
            inner = {k: v for k, v in asdict(getattr(section, nested)).items() if k not in type(section).FIXED}
            out[f.name] = {**own, **inner}
        return out

    def canonical_workloads(self) -> None:
        """Spell the search and export workloads (or mixes) as nasprune prints them, so the keys a bundle's
        manifest stores them under (``str(WorkloadMix)``) are the strings the report looks up."""
        from compressor.core.workload import WorkloadMix

        self.search.workload = str(WorkloadMix.parse(str(self.search.workload)))
        self.export.workloads = [str(WorkloadMix.parse(str(w))) for w in self.export.workloads]

    def validate(self, path: Path | str = "config") -> None:
        """Refuse (one line naming the file and section) values a stage would otherwise fail on
        only after the stages before it have run."""
        for section, check in _checks(self):
            try:
                check()
            except NaspruneError as e:
                raise NaspruneError(f"{path}: section '{section}': {e}") from None


def _section(path, name: str, value: dict, default):
    """Section ``name``'s settings ``value`` as the type of ``default``: unknown keys and values of the
    wrong type refused in one line each. A section with ``NESTED`` holds an algorithm's config whose
    settings (all but its ``FIXED`` ones) sit flat in the YAML beside the stage's own."""
    if isinstance(default, dict):
        return value
    nested = getattr(type(default), "NESTED", None)
    holders = {f.name: (default, f) for f in fields(default) if f.name != nested}
    if nested is not None:
        inner = getattr(default, nested)
        fixed = type(default).FIXED
        holders |= {f.name: (inner, f) for f in fields(inner) if f.name not in fixed}
    bad = sorted(set(value) - set(holders))
    if bad:
        raise NaspruneError(f"{path}: unknown settings {bad} in '{name}'; known: {sorted(holders)}")
    for key, v in value.items():
        holder, f = holders[key]
        _check_type(path, f"{name}.{key}", v, getattr(holder, key), "None" in str(f.type))
    try:  # the algorithm configs check their values on construction: one line naming the section
        if nested is None:
            return type(default)(**value)
        own = {k: v for k, v in value.items() if holders[k][0] is default}
        algo = type(inner)(**{k: v for k, v in value.items() if holders[k][0] is inner})
        return type(default)(**own, **{nested: algo})
    except NaspruneError as e:
        raise NaspruneError(f"{path}: section '{name}': {e}") from None


def _checks(cfg: PipelineConfig) -> list:
    """(section, check) pairs of :meth:`PipelineConfig.validate`, in the order they run."""
    from compressor.core.workload import Workload, WorkloadMix
    from compressor.recovery.train import TrainConfig
    from deploy.bundle import check_variants
    from predictors.fit import FitConfig
    from profilers.base import get_engine

    p, x, d = cfg.profile, cfg.export, cfg.data
    return [
        ("train", lambda: TrainConfig.load(None, cfg.train)),
        (
            "data",
            lambda: check_data_roles(calibration=d.calibration, train=d.train, validation=d.validation, test=d.test),
        ),
        ("importance", lambda: _layer_metric(cfg.importance.layer_metric)),
        ("profile", lambda: [Workload.parse(str(w)) for w in p.workloads]),
        ("profile", lambda: [get_engine(p.engine).check(p.device, prec) for prec in p.precisions]),
        ("profile", lambda: _at_least_one_precision(p.precisions)),
        ("search", lambda: _subset_of(cfg.search.precisions, p.precisions)),
        ("profile", lambda: _protocol(p.protocol)),
        ("profile", lambda: (_at_least_one("threads", p.threads), _at_least_one("samples", p.samples))),
        (
            "predictor",
            lambda: FitConfig(
                folds=cfg.predictor.folds,
                seed=cfg.predictor.seed,
                candidates=tuple(cfg.predictor.models),
                anchors=cfg.predictor.anchors,
            ),
        ),
        ("search", lambda: _profiled(WorkloadMix.parse(str(cfg.search.workload)), p.workloads)),
        ("export", lambda: check_variants(x.precisions)),
        ("export", lambda: check_variants(x.baseline_precisions)),
        ("export", lambda: [WorkloadMix.parse(str(w)) for w in x.workloads]),
        ("export", lambda: (_at_least_one("threads", x.threads), _at_least_one("points", x.points))),
        ("export", lambda: _repair_config(x.repair_tokens) if x.repair else None),
        ("export", lambda: _positive_or_none("max_ppl_ratio", x.max_ppl_ratio)),
        ("export", lambda: _targets(x.targets, x.max_ppl_ratio)),
        ("profile", lambda: _positive_or_none("minutes", p.minutes)),
        ("search", lambda: _positive_or_none("minutes", cfg.search.minutes)),
    ]


def _at_least_one(key: str, value) -> None:
    if value < 1:
        raise NaspruneError(f"{key} must be >= 1, not {value}")


def _layer_metric(value: str) -> None:
    from compressor.elastic.importance import LAYER_METRICS

    if value not in LAYER_METRICS:
        raise NaspruneError(f"layer_metric '{value}' is not one of {', '.join(LAYER_METRICS)}")


def _protocol(d: dict) -> None:
    from profilers.standalone import Protocol

    try:
        Protocol.from_dict(d)
    except (ValueError, TypeError) as e:
        raise NaspruneError(f"{e} (under 'protocol')") from None


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
