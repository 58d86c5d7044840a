"""The search stage's driver: loads the predictors (a higher layer than the pymoo problem in
``search.problem``), builds the quality oracle on validation text, runs NSGA-II, writes results.

One predictor per precision. Given predictors for several precisions (``fp32`` and quantization
recipes, each fitted on profiles of that recipe's real graphs), the search gets a precision gene
whose choices are exactly those precisions: a (sub-network, precision) pair without a predictor
is never proposed. The original model at every one of those precisions is scored by the same
objectives and written as the baselines the front has to beat.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

from compressor.core.data import read_source
from compressor.core.errors import NaspruneError
from compressor.core.outputs import claim_output
from compressor.core.precisions import needs_calibration
from compressor.core.workload import WorkloadMix
from compressor.elastic.evaluate import token_windows
from compressor.quant.quantize import calibration_windows
from predictors import load_predictor
from predictors.calibration import calibrate_if
from predictors.mix import check_mix, mix_out_of_range, predict_mix_ms
from search.problem import Evaluated, QualityOracle, SearchConfig, SearchResult, run_nsga2, write_results


def load_predictors(predictor_dirs, strict: bool = False) -> dict:
    """precision -> predictor, refusing two predictors of one precision or of different engines."""
    dirs = [predictor_dirs] if not isinstance(predictor_dirs, (list, tuple)) else list(predictor_dirs)
    out, first = {}, None
    for d in dirs:
        pred = load_predictor(d, strict=strict)
        prec = pred.group["precision"]
        if prec in out:
            raise NaspruneError(f"two predictors for precision {prec} ({d}); give one per precision")
        key = pred.group["engine"]  # (the fingerprint id includes the precision, so it differs by design)
        if first is not None and key != first:
            raise NaspruneError(f"predictor {d} was fitted for engine {key}, {dirs[0]} for {first}")
        first = first or key
        out[prec] = pred
    return out


def run_search_cli(
    loaded,
    predictor_dir,
    workload: str,
    data: str,
    out,
    cfg: SearchConfig,
    eval_tokens: int,
    seq_len: int,
    online: bool = False,
    strict: bool = False,
    overwrite: bool = False,
    calibrate: bool = False,
    one_shot=None,
    calibration_data: str | None = None,
) -> SearchResult:
    """Load the predictor(s), build the quality oracle on held-out text, search, write the results.

    ``predictor_dir``: one predictor dir, or a list of them (one per precision: the precision gene).
    ``workload``: one workload or a weighted mix (``prefill:1x512 + 128*decode:1x512``, see
    :class:`~compressor.core.workload.WorkloadMix`); a mix's predicted latency is the weighted sum of
    the predictor's per-workload predictions.
    ``one_shot``: the untrained pruned model (the importance-permuted original, a loaded model) whose
    sub-networks at the front's architectures and precisions are written as baselines too: what
    pruning without nasprune's training would give at the same latency.
    ``calibration_data``: the text static quantization recipes calibrate on (required when one is
    searched; the same text the bundle's engine will be calibrated on, never the validation text).
    ``cfg.max_minutes`` bounds the whole call: the predictors' re-calibration and the baselines
    scored after NSGA-II (one evaluation per front point at most) come out of it, estimated from
    the time of one evaluation of the largest sub-network, so NSGA-II gets the rest (>= 1 generation)."""
    start = time.perf_counter()
    claim_output(out, "search", overwrite=overwrite)  # before minutes of search, not after
    w = WorkloadMix.parse(workload)  # one workload, or a weighted mix: latency = sum(weight x prediction)
    predictors = load_predictors(predictor_dir, strict=strict)
    if cfg.precisions:
        missing = [p for p in cfg.precisions if p not in predictors]
        if missing:
            raise NaspruneError(f"no predictor for precision(s) {missing}; fitted: {sorted(predictors)}")
    elif len(predictors) > 1:
        cfg.precisions = list(predictors)
    check_mix(predictors.values(), w, strict)  # every term fitted on (warn/refuse now, not after the search)
    kind, text = read_source(data, online)
    if kind != "text":
        raise NaspruneError("the search's quality objective needs held-out plain text (.txt)")
    windows = token_windows(loaded.tokenizer, text, seq_len, eval_tokens)
    sn = loaded.supernet()
    static = [p for p in predictors if needs_calibration(p)]
    if static and calibration_data is None:
        raise NaspruneError(f"searching {static} (static quantization) needs calibration text (--calibration)")
    calib = calibration_windows(loaded.tokenizer, calibration_data, online) if static else None
    quality = QualityOracle(sn, windows, calibration=calib)
    # drift-proof: predictions x (anchor sub-network measured now / at fit time), see predictors.calibration
    calibration = {}
    for prec in list(predictors):
        predictors[prec], calibration[prec] = calibrate_if(predictors[prec], loaded, list(w.workloads), calibrate)
    if len(predictors) == 1:
        calibration = next(iter(calibration.values()))
    predictor = predictors[cfg.precisions[0]] if cfg.precisions else next(iter(predictors.values()))

    def latency(subs, precision=None):
        chosen = predictor if precision is None else predictors[precision]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # extrapolation is reported once below, not per generation
            return predict_mix_ms(chosen, subs, w)

    big = sn.space.largest()
    nsga2_cfg = cfg
    if cfg.max_minutes is not None:
        t = time.perf_counter()
        quality(big)  # cached: the original's row below reuses it
        after = (time.perf_counter() - t) * ((cfg.population if one_shot is not None else 0) + len(predictors))
        left = cfg.max_minutes * 60 - (time.perf_counter() - start) - after
        nsga2_cfg = replace(cfg, max_minutes=max(left, 1e-3) / 60)
    result = run_nsga2(sn.space, quality, latency, nsga2_cfg)
    result.config = cfg  # what the user asked for (the stage's budget), not NSGA-II's share of it
    original = Evaluated(big, quality(big), float(latency([big])[0]), sn.space.num_params(big), -1)
    # the original at every precision with a predictor, searched or not: each is an alternative the user has
    baseline_precisions = list(predictors) if len(predictors) > 1 else cfg.precisions or [predictor.group["precision"]]
    baselines = {
        f"original {p}": Evaluated(
            big, quality(big, p), float(latency([big], p)[0]), sn.space.num_params(big), -1, precision=p
        )
        for p in baseline_precisions
    }
    if one_shot is not None:
        plain = QualityOracle(one_shot.supernet(), windows, calibration=calib)
        for i, p in enumerate(result.pareto):
            prec = p.precision or predictor.group["precision"]
            baselines[f"one-shot {i}"] = Evaluated(
                p.arch, plain(p.arch, prec), p.predicted_ms, p.params, -1, precision=p.precision
            )
    outside = mix_out_of_range(predictor, [p.arch for p in result.pareto], w)
    write_results(
        result,
        out,
        sn.space,
        w,
        original,
        {
            "predictor": str(predictor_dir) if not isinstance(predictor_dir, (list, tuple)) else None,
            "predictors": {p: pred.group for p, pred in predictors.items()},
            "predictor_group": predictor.group,
            "model": str(loaded.path or loaded.source),
            "eval_tokens": int(windows.numel()),
            "workload_terms": [{"workload": str(m.workload), "weight": m.weight} for m in w.members],
            "extrapolated": outside,
            "calibration": calibration,
            "nsga2_minutes": nsga2_cfg.max_minutes,
        },
        overwrite=overwrite,
        baselines=baselines,
    )
    return result
