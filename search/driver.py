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
from search.front import write_results
from search.problem import Evaluated, QualityOracle, SearchConfig, SearchResult, run_nsga2


def load_predictors(predictor_dirs, strict: bool = False) -> dict:
    """``{dir: predictor}`` for one predictor dir, a list of them, or None (no predictions): the one
    loader of the search and the export (:mod:`deploy.pipeline_steps`)."""
    if predictor_dirs is None:
        return {}
    dirs = list(predictor_dirs) if isinstance(predictor_dirs, (list, tuple)) else [predictor_dirs]
    out = {}
    for d in dirs:
        pred = load_predictor(d, strict=strict)
        if str(d) in out:  # the same dir twice is two predictors of one precision, not one
            raise NaspruneError(f"two predictors for precision {pred.group['precision']} ({d}); give one per precision")
        out[str(d)] = pred
    return out


def by_precision(loaded: dict) -> dict:
    """precision -> predictor of :func:`load_predictors`'s ``{dir: predictor}``, refusing two predictors
    of one precision or of different engines (the search's precision gene needs one per precision)."""
    out, first, first_dir = {}, None, None
    for d, pred in loaded.items():
        prec = pred.group["precision"]
        if prec in out:
            raise NaspruneError(f"two predictors for precision {prec} ({d}); give one per precision")
        key = pred.group["engine"]  # (the fingerprint id includes the precision, so it differs by design)
        if first is not None and key != first:
            raise NaspruneError(f"predictor {d} was fitted for engine {key}, {first_dir} for {first}")
        first, first_dir = first or key, first_dir or d
        out[prec] = pred
    return out


# ---- stage decisions: ``nasprune search`` and ``nasprune compress`` take them the same way -----
def faster_precisions(precisions: list[str], records: list[dict] | None, log=print) -> tuple[list[str], dict]:
    """``precisions`` without the quantized ones that measured no faster than fp32 in the profile
    ``records`` (median latency ratio over the sub-networks profiled at both >= 1), and {dropped: ratio}.

    Such a recipe can only add quality loss at no speed to the front, yet a predictor fitted on a
    few of its profiles (the minimum of a short budget) may still predict it a little faster, and
    the search then ships it (measured on an AVX2-only CPU: int8-pc7 at 1.04x of fp32). Its
    original stays a baseline. Without fp32 (nothing to compare with) or records, all are kept.
    """
    from predictors.dataset import latency_ratios

    if "fp32" not in precisions or records is None:
        return list(precisions), {}
    ratios = latency_ratios(records)
    slower = {p: round(ratios[p]["median"], 3) for p in precisions if p in ratios and ratios[p]["median"] >= 1.0}
    for p, ratio in slower.items():
        log(f"  {p} left out of the search: {ratio:.2f}x of fp32's latency here ({ratios[p]['pairs']} pairs)")
    return [p for p in precisions if p not in slower], slower


def store_records(store, engine: str) -> list[dict]:
    """The profile store's records of ``engine`` (what :func:`faster_precisions` compares)."""
    from predictors import dataset  # looked up at call time (tests plant a store)

    return dataset.read_store(store, engine=engine)


def searched_precisions(
    available: list[str], explicit: list[str] | None, store=None, engine: str | None = None, log=print
) -> tuple[list[str], dict]:
    """The precisions the search's precision gene chooses among, and {left out: latency ratio to fp32}:
    ``explicit`` as given; otherwise every ``available`` one that measured faster than fp32 in the
    profile ``store`` (:func:`faster_precisions`; no store: all of them). An empty ``explicit`` list
    searches every available one as it is."""
    if explicit is not None:
        return list(explicit or available), {}
    records = store_records(store, engine) if store is not None and "fp32" in available else None
    return faster_precisions(list(available), records, log)


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


def pick_points(
    pareto: dict, points: int, max_ppl_ratio: float | None = None, targets: list[float] | None = None
) -> list[tuple]:
    """The front points to refine and export, as ``(name, SubNetwork, row)`` (name: the index in the
    front) of a ``pareto.json`` mapping: one per quality budget of ``targets``, else ``points`` spread
    over the front's rows within ``max_ppl_ratio`` x the original's perplexity (:func:`eligible_points`)."""
    from compressor.elastic.search_space import SubNetwork

    rows = pareto["pareto"]
    original_ppl = (pareto.get("original") or {}).get("ppl")
    if targets:
        idx = [i for _, i in sorted(target_points(rows, original_ppl, targets), key=lambda t: t[1])]
    else:
        n = min(points, len(rows))
        pool = eligible_points(rows, original_ppl, max_ppl_ratio, n)
        spread = [round(i * (len(pool) - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [len(pool) // 2]
        idx = sorted({pool[j] for j in spread})
    return [(str(i), SubNetwork.from_dict(rows[i]["arch"]), rows[i]) for i in idx]


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
    predictors = _searched_predictors(predictor_dir, cfg, w, strict)
    windows, calib = _quality_windows(loaded, data, online, seq_len, eval_tokens, predictors, calibration_data)
    sn = loaded.supernet()
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
    after = (cfg.population if one_shot is not None else 0) + len(predictors)  # evaluations after NSGA-II
    nsga2_cfg = _nsga2_share(cfg, quality, big, after, start)
    result = run_nsga2(sn.space, quality, latency, nsga2_cfg)
    result.config = cfg  # what the user asked for (the stage's budget), not NSGA-II's share of it
    original = Evaluated(big, quality(big), float(latency([big])[0]), sn.space.num_params(big), -1)
    baselines = _baselines(sn, quality, latency, predictors, predictor, cfg, result, one_shot, windows, calib)
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


def _searched_predictors(predictor_dir, cfg: SearchConfig, w: WorkloadMix, strict: bool) -> dict:
    """precision -> predictor; ``cfg.precisions`` must each have one (several predictors and none named:
    all of them are searched, set on ``cfg``); every term of ``w`` fitted on (warn/refuse now, not after)."""
    predictors = by_precision(load_predictors(predictor_dir, strict=strict))
    if cfg.precisions:
        missing = [p for p in cfg.precisions if p not in predictors]
        if missing:
            raise NaspruneError(f"no predictor for precision(s) {missing}; fitted: {sorted(predictors)}")
    elif len(predictors) > 1:
        cfg.precisions = list(predictors)
    check_mix(predictors.values(), w, strict)
    return predictors


def _quality_windows(loaded, data, online, seq_len, eval_tokens, predictors, calibration_data):
    """The held-out windows of the quality objective and the static recipes' calibration (or None)."""
    kind, text = read_source(data, online)
    if kind != "text":
        raise NaspruneError("the search's quality objective needs held-out plain text (.txt)")
    windows = token_windows(loaded.tokenizer, text, seq_len, eval_tokens)
    static = [p for p in predictors if needs_calibration(p)]
    if static and calibration_data is None:
        raise NaspruneError(f"searching {static} (static quantization) needs calibration text (--calibration)")
    return windows, calibration_windows(loaded.tokenizer, calibration_data, online) if static else None


def _nsga2_share(cfg: SearchConfig, quality, big, evaluations_after: int, start: float) -> SearchConfig:
    """``cfg`` with NSGA-II's share of ``cfg.max_minutes``: the budget less the time spent so far and
    ``evaluations_after`` evaluations of the largest sub-network (timed once here; cached for later)."""
    if cfg.max_minutes is None:
        return cfg
    t = time.perf_counter()
    quality(big)  # cached: the original's row reuses it
    after = (time.perf_counter() - t) * evaluations_after
    left = cfg.max_minutes * 60 - (time.perf_counter() - start) - after
    return replace(cfg, max_minutes=max(left, 1e-3) / 60)


def _baselines(sn, quality, latency, predictors, predictor, cfg, result, one_shot, windows, calib) -> dict:
    """The original at every precision with a predictor, searched or not (each is an alternative the user
    has), and the untrained pruned model ``one_shot`` at the front's architectures and precisions."""
    big = sn.space.largest()
    precisions = list(predictors) if len(predictors) > 1 else cfg.precisions or [predictor.group["precision"]]
    baselines = {
        f"original {p}": Evaluated(
            big, quality(big, p), float(latency([big], p)[0]), sn.space.num_params(big), -1, precision=p
        )
        for p in precisions
    }
    if one_shot is not None:
        plain = QualityOracle(one_shot.supernet(), windows, calibration=calib)
        for i, p in enumerate(result.pareto):
            prec = p.precision or predictor.group["precision"]
            baselines[f"one-shot {i}"] = Evaluated(
                p.arch, plain(p.arch, prec), p.predicted_ms, p.params, -1, precision=p.precision
            )
    return baselines
