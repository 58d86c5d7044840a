"""``predictor``: one latency predictor per profiled precision, chosen by grouped cross-validation
(``RUN/predictor`` for the first precision, ``RUN/predictor-<precision>`` for the others)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nasprune.stages.base import Stage


@dataclass
class PredictorConfig:
    folds: int = 5
    models: list[str] = field(default_factory=lambda: ["linear", "gbrt", "random_forest"])
    seed: int = 0
    anchors: int = 1  # calibration anchors each predictor stores (median ratio when > 1)


def run(ctx) -> dict:
    from compressor.core.precisions import is_quantized
    from predictors.dataset import read_store, select_group
    from predictors.fit import FitConfig, fit_predictor
    from predictors.modelspace import describe_model

    c = ctx.cfg.predictor
    store = read_store(ctx.store)
    info, reference = {}, None
    # float precisions first: a quantized precision (profiled on fewer sub-networks) may then be
    # predicted as a ratio to the fp32 predictor, if that cross-validates better (predictors.models)
    order = sorted(ctx.predictor_dirs.items(), key=lambda item: is_quantized(item[0]))
    for precision, directory in order:
        result = fit_predictor(
            select_group(store, precision=precision, engine=ctx.cfg.profile.engine),
            describe_model(str(ctx.supernet_dir)),
            FitConfig(folds=c.folds, seed=c.seed, candidates=tuple(c.models), anchors=c.anchors),
            reference=reference if is_quantized(precision) else None,
        )
        if precision == "fp32":
            reference = result.predictor
        result.predictor.save(directory, overwrite=True)
        cv = result.predictor.manifest["cv"]
        sel = cv["models"][cv["selected"]]
        ctx.log(
            f"  predictor {precision}: {cv['selected']}, CV MAPE {sel['mape']:.2f}%, within ±10% {sel['acc10']:.1%}"
        )
        info[precision] = {"selected": cv["selected"], "cv": sel}
    first = info[ctx.cfg.profile.precisions[0]]
    return {**first, "precisions": info}


STAGE = Stage(
    name="predictor",
    run=run,
    reads=("profiles.sqlite", "supernet/ (its description)"),
    writes=("predictor/", "predictor-<p>/"),
)
