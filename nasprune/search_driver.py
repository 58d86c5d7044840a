"""The search stage's driver: loads the predictor (a higher layer than the pymoo problem in
``compressor.search``), builds the quality oracle on validation text, runs NSGA-II, writes results.
"""

from __future__ import annotations

import warnings

from compressor.data import read_source
from compressor.errors import NaspruneError
from compressor.evaluate import token_windows
from compressor.outputs import claim_output
from compressor.search import Evaluated, QualityOracle, SearchConfig, SearchResult, run_nsga2, write_results
from compressor.workload import Workload
from predictors import load_predictor


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
) -> SearchResult:
    """Load the predictor, build the quality oracle on held-out text, search, write the results."""
    claim_output(out, "search", overwrite=overwrite)  # before minutes of search, not after
    w = Workload.parse(workload)
    predictor = load_predictor(predictor_dir, strict=strict)
    kind, text = read_source(data, online)
    if kind != "text":
        raise NaspruneError("the search's quality objective needs held-out plain text (.txt)")
    windows = token_windows(loaded.tokenizer, text, seq_len, eval_tokens)
    sn = loaded.supernet()
    quality = QualityOracle(sn, windows)

    def latency(subs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # extrapolation is reported once below, not per generation
            return predictor.predict_ms(subs, w)

    result = run_nsga2(sn.space, quality, latency, cfg)
    big = sn.space.largest()
    original = Evaluated(big, quality(big), float(latency([big])[0]), sn.space.num_params(big), -1)
    outside = predictor.out_of_range([p.arch for p in result.pareto], w)
    write_results(
        result,
        out,
        sn.space,
        w,
        original,
        {
            "predictor": str(predictor_dir),
            "predictor_group": predictor.group,
            "model": str(loaded.path or loaded.source),
            "eval_tokens": int(windows.numel()),
            "extrapolated": outside,
        },
        overwrite=overwrite,
    )
    return result
