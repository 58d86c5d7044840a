"""Engine bundles: one directory per chosen sub-network, ready to deploy.

::

    BUNDLE/
      manifest.json          arch, params, source hash, predicted + measured latency, accuracy,
                             device fingerprint, versions, sha256 of every file
      model/                 plain HF checkpoint (tokenizer + chat template, generation config,
                             LICENSE/NOTICE of the source), loads with AutoModelForCausalLM
      onnx/fp32/{prefill,decode}/model.onnx   the shared export recipe, then ONNX Runtime's
                                              graph optimizer (fusions for the target provider)
      onnx/<recipe>/...      a quantization recipe of compressor.quant.quantize (int8, int8-pc, int8-mixed,
                             w8, w4; CPU), on request: the very function profiling timed
      onnx/fp16/...          FP16 conversion (GPU providers), on request
      tensorrt/*.plan        TensorRT engines, when TensorRT is installed

The ONNX graphs are the ones profiling times (``compressor.quant.onnx_export``), so a predictor fitted on
profiles predicts exactly what ships.
"""

from __future__ import annotations

from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.core.hashing import sha256_file
from compressor.core.outputs import MARKER
from compressor.core.precisions import BUNDLE_VARIANTS, RECIPES
from compressor.elastic.modeldir import atomic_dir_write, now, versions, write_json_atomic
from compressor.elastic.search_space import SubNetwork
from compressor.quant.quantize import quantize_graph

MANIFEST = "manifest.json"
GRAPHS = ("prefill", "decode")
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "Apache-2.0"}


def graph_paths(bundle: Path, variant: str = "fp32") -> dict[str, Path]:
    return {g: Path(bundle) / "onnx" / variant / g / "model.onnx" for g in GRAPHS}


def file_hashes(bundle: Path) -> dict[str, str]:
    return {
        str(p.relative_to(bundle)): sha256_file(p)
        for p in sorted(Path(bundle).rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MARKER)
    }


def optimize_graph(src: Path, dst: Path, provider: str = "CPUExecutionProvider") -> None:
    """ONNX Runtime's offline graph optimization (extended level: fusions valid for ``provider``)."""
    import onnxruntime as ort

    dst.parent.mkdir(parents=True, exist_ok=True)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=[provider])


def convert_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and activations (inputs/outputs kept fp32) for GPU providers."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _license_text(provenance: dict) -> str:
    source = str(provenance.get("source", "unknown"))
    known = next((lic for name, lic in KNOWN_LICENSES.items() if name in source), None)
    if known:
        return (
            f"This model is derived (structured pruning by nasprune) from {source}.\n"
            f"The source model is licensed under {known}; this derivative is distributed under the same terms.\n"
        )
    return (
        f"This model is derived (structured pruning by nasprune) from {source}.\n"
        "Its licence is the source model's licence: check the source's model card before redistributing.\n"
    )


def check_variants(variants) -> None:
    unknown = set(variants) - set(BUNDLE_VARIANTS)
    if unknown:
        raise NaspruneError(f"unknown precision(s) {sorted(unknown)}; choose from {', '.join(BUNDLE_VARIANTS)}")


def build_bundle(
    loaded,
    supernet,
    sub: SubNetwork,
    out: Path,
    variants=("fp32",),
    providers=("CPUExecutionProvider",),
    search_row: dict | None = None,
    log=print,
    overwrite: bool = False,
    model=None,
    repair: dict | None = None,
    calibration=None,
) -> Path:
    """Extract ``sub``, write the checkpoint and every requested engine variant, and the manifest.

    ``calibration``: a :class:`compressor.quant.quantize.StaticCalibration` for static INT8 variants.

    ``model``: an already extracted model of ``sub`` to ship instead (the closed-form repaired one);
    ``repair``: what was done about repair (:func:`compressor.recovery.repair.repair_and_measure`'s record, or
    why not), stored as the manifest's ``repair`` section.
    Written atomically under the ownership rule: an existing bundle is replaced only with ``overwrite``.
    """
    check_variants(variants)
    supernet.space.validate(sub)
    return atomic_dir_write(
        Path(out),
        lambda tmp: _write_bundle(
            loaded, supernet, sub, tmp, variants, providers, search_row, log, model, repair, calibration
        ),
        "bundle",
        overwrite,
    )


def _write_bundle(
    loaded,
    supernet,
    sub: SubNetwork,
    out: Path,
    variants,
    providers,
    search_row,
    log,
    model=None,
    repair=None,
    calibration=None,
) -> None:
    import tempfile

    from compressor.elastic.extract import extract, save_extracted
    from compressor.quant.onnx_export import ExportRecipe, export_graphs, recipe_id

    model_dir, n_params = save_extracted(
        loaded, supernet, sub, out / "model", model=model, repair=repair if model is not None else None
    )
    (model_dir / "LICENSE").write_text(_license_text(loaded.meta.provenance))
    small = extract(supernet, sub) if model is None else model.eval()
    engines: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        raw = export_graphs(small, Path(tmp) / "raw", ExportRecipe())
        log(f"  exported {sub}: parity {raw.parity}")
        for g in GRAPHS:
            optimize_graph(raw.paths[g], graph_paths(out, "fp32")[g], providers[0])
        engines["fp32"] = {
            "recipe": raw.recipe,
            "recipe_id": raw.recipe_id,
            "parity": raw.parity,
            "optimization": f"ORT_ENABLE_EXTENDED for {providers[0]}",
        }
        # static variants calibrate the decode graph on the KV caches of this model's fp32 prefill graph
        cal = calibration.with_prefill(raw.paths["prefill"]) if calibration is not None else None
        for variant in (v for v in variants if v in RECIPES):  # the profiled recipe, applied to the shipped weights
            done = {g: quantize_graph(raw.paths[g], graph_paths(out, variant)[g], variant, cal) for g in GRAPHS}
            recipe = {**raw.recipe, "quantization": RECIPES[variant].to_dict()}
            engines[variant] = {
                "recipe": recipe,
                "recipe_id": recipe_id(recipe),
                "quantization": RECIPES[variant].summary,
                "nodes_kept_float": {g: d["nodes_kept_float"] for g, d in done.items()},
                **({"calibration": done["prefill"]["calibration"]} if "calibration" in done["prefill"] else {}),
            }
        if "fp16" in variants:
            for g in GRAPHS:
                convert_fp16(raw.paths[g], graph_paths(out, "fp16")[g])
            engines["fp16"] = {"recipe": raw.recipe, "recipe_id": raw.recipe_id, "conversion": "float16, fp32 I/O"}
        engines.update(_tensorrt_engines(out, raw, log))
    manifest = {
        "format": "nasprune-bundle/1",
        "arch": sub.to_dict(),
        "num_kv_heads": supernet.space.num_kv_heads(sub),
        "params": n_params,
        "source": {
            "model": str(loaded.path or loaded.source),
            **{k: loaded.meta.provenance.get(k) for k in ("source", "source_sha256")},
        },
        "search": search_row,
        "repair": repair,
        "engines": engines,
        "latency": {"predicted": {}, "measured": {}},
        "accuracy": {},
        "versions": _versions(),
        "created_at": now(),
    }
    manifest["files"] = file_hashes(out)
    write_json_atomic(out / MANIFEST, manifest)


def _tensorrt_engines(out: Path, raw, log) -> dict:
    """Build FP16 TensorRT engines from the raw graphs where TensorRT and a GPU are present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        log(f"  TensorRT engine skipped: tensorrt is not installed ({e.name})")
        return {}
    from profilers.engine_tensorrt import build_engine

    engines = {}
    (out / "tensorrt").mkdir(exist_ok=True)
    for g, path in raw.paths.items():
        shapes = _trt_shapes(g, path)
        plan = build_engine(str(path), True, shapes)
        (out / "tensorrt" / f"{g}.plan").write_bytes(bytes(plan))
    engines["tensorrt-fp16"] = {"recipe_id": raw.recipe_id, "files": [f"tensorrt/{g}.plan" for g in raw.paths]}
    return engines


def _trt_shapes(graph: str, path: Path) -> dict:
    """Optimization profiles covering batch 1-4 and sequence 1-2048 (min, opt, max)."""
    import onnx

    shapes = {}
    for inp in onnx.load(str(path), load_external_data=False).graph.input:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.name in ("input_ids", "attention_mask"):
            seq_opt = 1 if graph == "decode" and inp.name == "input_ids" else 128
            seq_max = 1 if graph == "decode" and inp.name == "input_ids" else 2048
            shapes[inp.name] = ((1, 1), (1, seq_opt), (4, seq_max))
        else:  # past KV: [B, kv_heads, P, head_dim]
            shapes[inp.name] = ((1, dims[1], 1, dims[3]), (1, dims[1], 128, dims[3]), (4, dims[1], 2047, dims[3]))
    return shapes


def _versions() -> dict:
    import onnx
    import onnxruntime

    return {**versions(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def read_manifest(bundle: Path) -> dict:
    import json

    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise NaspruneError(f"{bundle} is not a nasprune bundle (no {MANIFEST}); create one with nasprune export")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise NaspruneError(f"{path} is corrupt ({e.msg}); re-create the bundle with nasprune export") from None


def engine_manifest(bundle: Path, variant: str) -> dict:
    """The manifest of a bundle whose ``variant`` engine exists and is as exported: every file of it
    matches its sha256 in the manifest (a modified or truncated graph is refused before it is run)."""
    manifest = read_manifest(bundle)
    engines = manifest.get("engines") or {}
    if variant not in engines:
        raise NaspruneError(
            f"bundle {bundle} has no {variant} engine (has {', '.join(engines) or 'none'}); "
            f"re-export it with --precision {variant}"
        )
    prefix = f"onnx/{variant}/"
    for rel, digest in (manifest.get("files") or {}).items():
        if not rel.startswith(prefix):
            continue
        path = Path(bundle) / rel
        if not path.is_file():
            raise NaspruneError(f"bundle file {path} is missing; re-create the bundle with nasprune export")
        if sha256_file(path) != digest:
            raise NaspruneError(
                f"bundle file {path} was modified (sha256 differs from {MANIFEST}); "
                "re-create the bundle with nasprune export"
            )
    return manifest


def update_manifest(bundle: Path, **sections) -> dict:
    """Merge sections (latency, accuracy, ...) into the manifest atomically."""
    manifest = read_manifest(bundle)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = _deep_merge(manifest[key], value)
        else:
            manifest[key] = value
    write_json_atomic(Path(bundle) / MANIFEST, manifest)
    return manifest


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
