"""`nasprune compress` end to end on a tiny model with the small test tokenizer (configs/smoke.yaml)."""

import json
from pathlib import Path

from nasprune.pipeline import STAGES, Pipeline, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_compress_runs_every_stage_and_resumes(tiny_model, tmp_path):
    cfg = PipelineConfig.load(ROOT / "configs" / "smoke.yaml")
    run = tmp_path / "run"
    logs = []
    Pipeline(str(tiny_model), run, cfg, log=logs.append).execute(stop_after="predictor")  # "killed" here
    state = json.loads((run / "run.json").read_text())
    upto = STAGES.index("predictor") + 1
    assert list(state["stages"]) == list(STAGES[:upto])
    logs.clear()
    Pipeline(str(tiny_model), run, cfg, log=logs.append).execute()
    skipped = [line for line in logs if "done earlier" in line]
    assert len(skipped) == upto  # importance..predictor not redone
    state = json.loads((run / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    assert state["stages"]["blocks"]["enabled"] and len(state["stages"]["blocks"]["blocks"]) == 4  # BLD ran
    assert "block_distillation" in json.loads((run / "supernet" / "nasprune.json").read_text())["provenance"]
    pareto = json.loads((run / "search" / "pareto.json").read_text())
    assert pareto["pareto"]
    # precision gene: one predictor per profiled precision, every point carries a profiled precision
    assert (run / "predictor").is_dir() and (run / "predictor-int8").is_dir()
    assert set(pareto["predictors"]) == {"fp32", "int8"}
    assert {p["precision"] for p in pareto["pareto"]} <= {"fp32", "int8"}
    labels = {b["label"] for b in pareto["baselines"]}
    assert {"original fp32", "original int8"} <= labels and any(x.startswith("one-shot") for x in labels)
    bundles = sorted(p for p in (run / "bundles").iterdir() if (p / "manifest.json").exists())
    assert bundles
    manifest = json.loads((bundles[0] / "manifest.json").read_text())
    assert {"fp32", "int8"} <= set(manifest["engines"])
    assert manifest["latency"]["measured"]["fp32"]["prefill:1x32"]["stats_ms"]["median"] > 0
    assert manifest["accuracy"]["ppl"] > 1 and manifest["accuracy"]["engine_ppl"]["int8"] > 1
    assert "predicted_ms" in manifest["latency"]["measured"]["fp32"]["prefill:1x32"]
    # refined points were repaired by refine, before training; export says so and does not repair again
    assert manifest["repair"]["applied"] == "before refine" and manifest["repair"]["ppl_after"] is not None
    report = (run / "report.md").read_text()
    assert "Pareto front" in report and (run / "pareto.png").exists()
    front = json.loads((run / "front.json").read_text())  # baselines on the test front, with dominance
    kinds = {p["kind"] for p in front["points"]}
    assert {"nasprune", "original", "one-shot"} <= kinds
    assert {(r["kind"], r["variant"]) for r in front["dominance"]} >= {("original", "fp32"), ("original", "int8")}
    assert "Original-model baselines dominated" in report


def test_overlapping_data_roles_are_refused(tmp_path):
    import pytest

    from compressor.core.data import PACKAGE_DATA, check_data_roles
    from compressor.core.errors import NaspruneError

    novel = (PACKAGE_DATA / "northanger_abbey.txt").read_text()
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(novel[100_000:130_000])  # a test "file" that is really part of the training novel
    with pytest.raises(NaspruneError, match="data roles overlap: test"):
        check_data_roles(
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:sense_and_sensibility_validation",
            str(excerpt),
        )
    with pytest.raises(NaspruneError, match="data roles overlap: validation"):
        check_data_roles(
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:northanger_abbey",
            "builtin:persuasion_heldout",
        )
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  test: {excerpt}\n")
    with pytest.raises(NaspruneError, match="overlap"):
        PipelineConfig.load(config)
    # the built-in roles are disjoint
    check_data_roles(
        "builtin:northanger_abbey",
        "builtin:northanger_abbey",
        "builtin:sense_and_sensibility_validation",
        "builtin:persuasion_heldout",
    )


def test_dominance_table_marks_what_beats_each_baseline():
    from deploy.report import dominance, front_points

    def bundle(ms32, ms8, ppl, eng32, eng8):
        return {
            "accuracy": {"ppl": ppl, "engine_ppl": {"fp32": eng32, "int8": eng8}},
            "latency": {
                "measured": {
                    "fp32": {"w": {"stats_ms": {"median": ms32}}},
                    "int8": {"w": {"stats_ms": {"median": ms8}}},
                }
            },
        }

    points = front_points(
        {"original-x": bundle(400, 220, 40.0, 41.0, 65.6), "0-small": bundle(200, 90, 60.0, 60, 66)}, "w"
    )
    by_name = {(p["name"], p["variant"]): p for p in points}
    assert abs(by_name[("original-x", "int8")]["ppl"] - 64.0) < 1e-9  # 40 x 65.6 / 41
    rows = {f"{r['name']} {r['variant']}": r["dominated_by"] for r in dominance(points)}
    assert rows["original-x fp32"] == []  # nothing is as good as the original in fp32
    assert rows["original-x int8"] == ["0-small fp32"]  # its int8 (ppl 66) is faster but worse than 64


def test_dominance_needs_a_real_latency_gap_or_the_same_graph():
    """A gap within the machine's drift is no speed-up; the same graph at the same precision is a latency tie,
    won on perplexity alone (the QAT-refined original vs its PTQ twin); a manifest without an arch never ties."""
    from deploy.report import LATENCY_TOLERANCE, dominance

    full, small = {"embed_dim": 576, "num_layers": 30}, {"embed_dim": 448, "num_layers": 24}

    def pt(name, variant, ms, ppl, arch, kind="nasprune"):
        return {"name": name, "variant": variant, "ms": ms, "ppl": ppl, "arch": arch, "kind": kind,
                "baseline": kind != "nasprune"}  # fmt: skip

    base = pt("original", "int8-pc", 100.0, 60.0, full, "original")
    near = 100.0 * (1 - LATENCY_TOLERANCE / 2)
    cases = {
        "qat-twin-slower-by-noise": (pt("q", "int8-pc", 103.0, 50.0, full), True),
        "qat-twin-no-better": (pt("q", "int8-pc", 90.0, 60.0, full), False),
        "same-arch-other-precision": (pt("q", "int8-mixed", near, 50.0, full), False),
        "smaller-within-drift": (pt("s", "int8-pc", near, 55.0, small), False),
        "smaller-clearly-faster": (pt("s", "int8-pc", 80.0, 60.0, small), True),
        "clearly-faster-but-worse": (pt("s", "int8-pc", 80.0, 61.0, small), False),
        "no-arch-recorded": (pt("q", "int8-pc", 100.0, 50.0, None), False),
    }
    for case, (point, expected) in cases.items():
        (row,) = dominance([base, point])
        assert bool(row["dominated_by"]) is expected, case


def test_fastest_within_a_quality_budget_for_nasprune_and_for_quantizing_alone():
    """Per budget r: the fastest point of each kind at test ppl <= r x the original fp32's, with its speed-up
    over the original fp32; one-shot baselines are neither; no original fp32, no table."""
    from deploy.report import fastest_within

    def pt(name, variant, ms, ppl, kind):
        return {"name": name, "variant": variant, "ms": ms, "ppl": ppl, "kind": kind, "baseline": kind != "nasprune"}

    points = [
        pt("original", "fp32", 400.0, 40.0, "original"),
        pt("original", "int8-mixed", 200.0, 42.0, "original"),
        pt("original", "int8", 130.0, 75.0, "original"),
        pt("0-a", "int8-mixed", 160.0, 50.0, "nasprune"),
        pt("0-a", "fp32", 300.0, 48.0, "nasprune"),
        pt("1-b", "int8-pc", 100.0, 70.0, "nasprune"),
        pt("one-shot 1-b", "int8-pc", 100.0, 41.0, "one-shot"),  # a baseline, never counted
    ]
    rows = {r["budget"]: r for r in fastest_within(points, (1.1, 1.3, 2.0))}
    assert rows[1.1]["nasprune"] is None and rows[1.1]["original"]["variant"] == "int8-mixed"
    assert rows[1.3]["nasprune"]["name"] == "0-a" and rows[1.3]["nasprune"]["variant"] == "int8-mixed"
    assert abs(rows[1.3]["nasprune"]["speedup"] - 2.5) < 1e-9 and abs(rows[1.3]["original"]["speedup"] - 2.0) < 1e-9
    assert rows[2.0]["nasprune"]["name"] == "1-b" and rows[2.0]["original"]["variant"] == "int8"
    assert fastest_within(points[1:], (1.3,)) == []


def test_export_picks_only_points_that_could_replace_the_original():
    """``export.max_ppl_ratio`` keeps the 22M-at-30x end of the front out of refine and export; when too
    few points qualify, the lowest-perplexity ones are taken; without it, the whole front."""
    from nasprune.pipeline import eligible_points

    rows = [{"ppl": p} for p in (1200.0, 900.0, 110.0, 95.0, 70.0, 60.0)]  # front order: fast -> slow
    assert eligible_points(rows, 30.0, None, 2) == [0, 1, 2, 3, 4, 5]
    assert eligible_points(rows, 30.0, 3.5, 2) == [3, 4, 5]  # <= 105
    assert eligible_points(rows, 30.0, 2.0, 2) == [4, 5]  # only 60 qualifies: topped up with 70
    assert eligible_points(rows, None, 2.0, 2) == [0, 1, 2, 3, 4, 5]  # no original to compare with


def test_export_targets_ship_the_fastest_point_within_each_quality_budget():
    """``export.targets``: per budget r, the fastest front point at <= r x the original's validation
    perplexity, at whatever precision; a budget nothing meets gets the best point; duplicates once."""
    from nasprune.pipeline import target_points

    rows = [
        {"ppl": 90.0, "predicted_ms": 20.0, "precision": "int8-pc"},
        {"ppl": 60.0, "predicted_ms": 50.0, "precision": "int8-pc"},
        {"ppl": 38.0, "predicted_ms": 80.0, "precision": "int8-mixed"},
        {"ppl": 36.0, "predicted_ms": 150.0, "precision": "fp32"},
        {"ppl": 30.0, "predicted_ms": 160.0, "precision": "fp32"},
    ]
    assert target_points(rows, 30.0, [1.3, 2.0]) == [(1.3, 2), (2.0, 1)]
    assert target_points(rows, 30.0, [1.3, 1.35]) == [(1.3, 2)]  # the same row once
    assert target_points(rows, 30.0, [1.25]) == [(1.25, 3)]  # 38 > 37.5: the next fastest, 36
    assert target_points(rows, 30.0, [0.5]) == [(0.5, 4)]  # nothing that good: the closest the front comes
    assert target_points(rows, None, [2.0]) == [(2.0, 4)]
    assert target_points([], 30.0, [2.0]) == []
