"""Bad input costs the user nothing: every command answers it with one line and exit code 2.

One table of cases over every command (missing, corrupt and foreign models, bundles,
predictors, stores, configs, data, archs, workloads, names, thread counts and outputs). For
each case: exit code 2, exactly one non-empty line on stderr that names the problem, no
traceback anywhere, and every file under the case's directory and the shared fixtures is
byte-for-byte what it was (the user's files untouched, nothing half-made left behind).

Then the output-ownership rule (``compressor/core/outputs.py``), on ``extract``, the cheapest writer.

Commands run in-process (``CliRunner``, which keeps stderr apart from stdout) on tiny fixtures
built once per module, so the whole table takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from typer.testing import CliRunner

from nasprune.cli import app
from tests.conftest import synthetic_record

runner = CliRunner()

ARCH = '{"embed_dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2}'
OTHER_ARCH = '{"embed_dim": 48, "num_heads": 4, "ffn_dim": 128, "num_layers": 3}'
WORKLOAD = "prefill:1x16"


# ---- fixtures ---------------------------------------------------------------------------------
def _records(space, subs, workloads=(WORKLOAD,)) -> list[dict]:
    """Synthetic profile records (latency grows with parameters) for one predictor group."""
    from compressor.core.workload import Workload

    rng = np.random.default_rng(0)
    out = []
    for s in subs:
        for w in workloads:
            ms = 0.5 + 1e-5 * space.num_params(s) * Workload.parse(w).seq / 16 * (1 + 0.01 * rng.standard_normal())
            stats = {
                "min": ms * 0.98,
                "median": ms,
                "mean": ms,
                "p90": ms * 1.05,
                "p99": ms * 1.1,
                "std": 0.01 * ms,
                "cv": 0.01,
                "count": 10,
            }
            out.append(synthetic_record(space, s, w, ms, stats=stats))
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory, tiny_model) -> Path:
    """Shared, read-only inputs: the tiny model with its tokenizer, a bundle, a profile store, a
    predictor, a pareto.json and held-out text. Cases must not change them (checked)."""
    from compressor.elastic.modeldir import load_model
    from compressor.elastic.search_space import SubNetwork
    from deploy.bundle import build_bundle
    from predictors.fit import FitConfig, fit_predictor
    from predictors.modelspace import describe_model, space_from_description
    from profilers.store import ProfileStore

    root = tmp_path_factory.mktemp("fixtures")
    shutil.copytree(tiny_model, root / "model")
    (root / "heldout.txt").write_text("It was a truth universally acknowledged, that a tiny model needs text. " * 40)
    loaded = load_model(str(root / "model"))
    build_bundle(
        loaded, loaded.supernet(), SubNetwork.from_dict(json.loads(ARCH)), root / "bundle", log=lambda *_: None
    )
    description = describe_model(str(root / "model"))
    space = space_from_description(description)
    records = _records(space, list(space.enumerate()))
    store = ProfileStore(root / "profiles.sqlite")
    for r in records:
        store.add(r)
    fit_predictor(records, description, FitConfig(folds=2, candidates=("linear",))).predictor.save(root / "predictor")
    (root / "pareto.json").write_text(
        json.dumps({"pareto": [{"arch": json.loads(ARCH)}, {"arch": json.loads(OTHER_ARCH)}]})
    )
    return root


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (hidden ones too) -> the sha256 of its content, 'dir' or the link target."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_symlink():
                out[str(p)] = "link:" + str(p.readlink())
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---- setup helpers: each returns ``setup(tmp, fx)`` that prepares the case's files under tmp ----
Setup = Callable[[Path, Path], None]


def write(rel: str, content: str | bytes) -> Setup:
    def setup(tmp: Path, fx: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def copy(src: str, rel: str) -> Setup:
    """Copy fixture ``src`` (file or dir) to ``tmp/rel``."""

    def setup(tmp: Path, fx: Path) -> None:
        (shutil.copytree if (fx / src).is_dir() else shutil.copyfile)(fx / src, tmp / rel)

    return setup


def edit_json(rel: str, change: Callable[[dict], None]) -> Setup:
    def setup(tmp: Path, fx: Path) -> None:
        data = json.loads((tmp / rel).read_text())
        change(data)
        (tmp / rel).write_text(json.dumps(data))

    return setup


def flip_byte(rel: str) -> Setup:
    """Tamper with a file: invert its last byte (same size, different content)."""

    def setup(tmp: Path, fx: Path) -> None:
        data = bytearray((tmp / rel).read_bytes())
        data[-1] ^= 0xFF
        (tmp / rel).write_bytes(bytes(data))

    return setup


def foreign_sqlite(rel: str) -> Setup:
    def setup(tmp: Path, fx: Path) -> None:
        import sqlite3

        db = sqlite3.connect(tmp / rel)
        db.execute("CREATE TABLE contacts (name TEXT, phone TEXT)")
        db.execute("INSERT INTO contacts VALUES ('Ada', '555-0100')")
        db.commit()
        db.close()

    return setup


def both(*setups: Setup) -> Setup:
    def setup(tmp: Path, fx: Path) -> None:
        for s in setups:
            s(tmp, fx)

    return setup


def nothing(tmp: Path, fx: Path) -> None:
    pass


def model_with(config_change: Callable[[dict], None]) -> Setup:
    """A copy of the fixture model whose config.json is changed by ``config_change``."""
    return both(copy("model", "m"), edit_json("m/config.json", config_change))


FOREIGN = write("mine/thesis.tex", "my thesis, 3 years of work\n")  # a user's non-empty dir
GARBAGE_WEIGHTS = both(
    write("m/model.safetensors", b"\x00not safetensors at all" * 10),
    lambda tmp, fx: shutil.copyfile(fx / "model" / "config.json", tmp / "m" / "config.json"),
)


class Case(NamedTuple):
    id: str
    args: list[str]  # {fx}: the shared fixtures, {tmp}: this case's directory
    needle: str  # must appear in the one error line
    setup: Setup = nothing


CASES = [
    # ---- MODEL: missing, foreign, corrupt, remote code ----
    Case("info-missing-model", ["info", "{tmp}/nowhere"], "not a local dir or file"),
    Case("info-foreign-dir", ["info", "{tmp}/mine"], "no config.json", FOREIGN),
    Case("info-not-a-gguf-file", ["info", "{tmp}/model.bin"], "not a .gguf", write("model.bin", b"\x00" * 64)),
    Case(
        "info-corrupt-gguf",
        ["info", "{tmp}/model.gguf"],
        "cannot read GGUF",
        write("model.gguf", b"GGUF" + b"\x07" * 60),
    ),
    Case("info-corrupt-config", ["info", "{tmp}/m"], "config.json cannot be read", write("m/config.json", "{not json")),
    Case(
        "info-corrupt-nasprune-json",
        ["info", "{tmp}/m"],
        "nasprune.json is corrupt",
        both(copy("model", "m"), write("m/nasprune.json", "{oops")),
    ),
    Case(
        "info-remote-code",
        ["info", "{tmp}/m"],
        "remote code",
        model_with(lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})),
    ),
    Case(
        "info-remote-code-tokenizer",
        ["info", "{tmp}/m"],
        "remote code",
        both(
            copy("model", "m"),
            edit_json(
                "m/tokenizer_config.json",
                lambda c: c.update(auto_map={"AutoTokenizer": ["tok_evil.EvilTokenizer", None]}),
            ),
        ),
    ),
    Case(
        "fit-model-remote-code",
        [
            "predictor",
            "fit",
            "--store",
            "{fx}/profiles.sqlite",
            "--model",
            "{tmp}/m",
            "--models",
            "linear",
            "--folds",
            "2",
            "--out",
            "{tmp}/p",
        ],
        "remote code",
        model_with(lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"})),
    ),
    Case(
        "fit-model-corrupt-config",
        [
            "predictor",
            "fit",
            "--store",
            "{fx}/profiles.sqlite",
            "--model",
            "{tmp}/m",
            "--models",
            "linear",
            "--folds",
            "2",
            "--out",
            "{tmp}/p",
        ],
        "config.json cannot be read",
        both(copy("model", "m"), write("m/config.json", '{"model_type": "llama",')),
    ),
    Case(
        "profile-remote-code",
        ["profile", "{tmp}/m", "--store", "{tmp}/p.sqlite"],
        "remote code",
        model_with(lambda c: c.update(auto_map={"AutoConfig": "configuration_evil.EvilConfig"})),
    ),
    Case(
        "extract-garbage-weights",
        ["extract", "{tmp}/m", "--arch", ARCH, "--out", "{tmp}/sub"],
        "cannot be loaded",
        GARBAGE_WEIGHTS,
    ),
    Case(
        "importance-missing-model",
        ["importance", "{tmp}/nowhere", "--data", "{fx}/heldout.txt", "--out", "{tmp}/imp"],
        "not a local dir or file",
    ),
    Case(
        "train-garbage-weights",
        ["train", "{tmp}/m", "--data", "{fx}/heldout.txt", "--out", "{tmp}/t"],
        "cannot be loaded",
        GARBAGE_WEIGHTS,
    ),
    Case("eval-foreign-dir", ["eval", "{tmp}/mine", "--data", "{fx}/heldout.txt"], "no config.json", FOREIGN),
    # ---- data ----
    Case(
        "importance-missing-data",
        ["importance", "{fx}/model", "--data", "{tmp}/missing.txt", "--out", "{tmp}/imp"],
        "is not a file",
    ),
    Case(
        "train-missing-data",
        ["train", "{fx}/model", "--data", "{tmp}/missing.txt", "--out", "{tmp}/t"],
        "is not a file",
    ),
    Case("eval-missing-data", ["eval", "{fx}/model", "--data", "{tmp}/missing.txt"], "is not a file"),
    Case(
        "importance-bad-jsonl",
        ["importance", "{fx}/model", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/imp"],
        "not valid JSON lines",
        write("d.jsonl", '{"instruction": "hi"\n'),
    ),
    Case(
        "search-missing-data",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--workload",
            WORKLOAD,
            "--data",
            "{tmp}/missing.txt",
            "--out",
            "{tmp}/s",
        ],
        "is not a file",
    ),
    # ---- --arch ----
    Case(
        "extract-arch-not-json",
        ["extract", "{fx}/model", "--arch", "{embed_dim: 32", "--out", "{tmp}/sub"],
        "not valid JSON",
    ),
    Case(
        "extract-arch-unknown-key",
        [
            "extract",
            "{fx}/model",
            "--arch",
            '{"embed_dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layer": 2}',
            "--out",
            "{tmp}/sub",
        ],
        "unknown num_layer",
    ),
    Case(
        "extract-arch-not-in-space",
        [
            "extract",
            "{fx}/model",
            "--arch",
            '{"embed_dim": 33, "num_heads": 2, "ffn_dim": 64, "num_layers": 2}',
            "--out",
            "{tmp}/sub",
        ],
        "embed_dim=33 is not one of",
    ),
    Case(
        "predict-arch-missing-file",
        ["predict", "{fx}/predictor", "--arch", "{tmp}/arch.json", "--workload", WORKLOAD],
        "neither a JSON object nor an existing file",
    ),
    Case(
        "profile-arch-not-in-space",
        [
            "profile",
            "{fx}/model",
            "--arch",
            '{"embed_dim": 64, "num_heads": 3, "ffn_dim": 64, "num_layers": 2}',
            "--store",
            "{tmp}/p.sqlite",
        ],
        "num_heads=3 is not one of",
    ),
    # ---- workloads ----
    Case(
        "predict-bad-workload",
        ["predict", "{fx}/predictor", "--arch", ARCH, "--workload", "prefill:1x"],
        "bad workload",
    ),
    Case(
        "profile-bad-workload",
        ["profile", "{fx}/model", "--workload", "prefil:1x128", "--store", "{tmp}/p.sqlite"],
        "bad workload",
    ),
    Case(
        "check-bad-workload",
        ["check", "{fx}/bundle", "--baseline-bundle", "{fx}/bundle", "--workload", "decode:0x8"],
        "must be >= 1",
    ),
    Case(
        "search-bad-workload",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--workload",
            "generate:1x8",
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "bad workload",
    ),
    Case(
        "export-bad-workload",
        ["export", "{fx}/model", "--arch", ARCH, "--workload", "prefill", "--out", "{tmp}/b"],
        "bad workload",
    ),
    Case(
        "search-glued-workload-mix",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--workload",
            "prefill:1x16+4*decode:1x16",
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "space on each side",
    ),
    Case(
        "search-mix-term-not-fitted",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--workload",
            f"{WORKLOAD} + 4*decode:1x16",
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "not decode",
    ),
    Case(
        "export-bad-workload-mix",
        ["export", "{fx}/model", "--arch", ARCH, "--workload", "prefill:1x16 + 0*decode:1x16", "--out", "{tmp}/b"],
        "must be a positive number",
    ),
    Case(
        "export-mix-term-not-fitted",
        [
            "export",
            "{fx}/model",
            "--arch",
            ARCH,
            "--predictor",
            "{fx}/predictor",
            "--workload",
            f"{WORKLOAD} + 4*decode:1x16",
            "--out",
            "{tmp}/b",
        ],
        "not decode",
    ),
    # ---- device / engine / precision names ----
    Case(
        "profile-unknown-engine",
        ["profile", "{fx}/model", "--engine", "onnx", "--store", "{tmp}/p.sqlite"],
        "unknown engine 'onnx'",
    ),
    Case(
        "profile-unknown-device",
        ["profile", "{fx}/model", "--device", "tpu", "--store", "{tmp}/p.sqlite"],
        "unknown device 'tpu'",
    ),
    Case(
        "profile-bad-precision",
        ["profile", "{fx}/model", "--precision", "fp8", "--store", "{tmp}/p.sqlite"],
        "not 'fp8'",
    ),
    Case(
        "profile-unknown-quantization-recipe",
        ["profile", "{fx}/model", "--precision", "w3", "--store", "{tmp}/p.sqlite"],
        "not 'w3'",
    ),
    Case(
        "search-precision-without-predictor",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--precision",
            "int8",
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "no predictor for precision(s) ['int8']",
    ),
    Case(
        "search-two-predictors-one-precision",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--predictor",
            "{fx}/predictor",
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "two predictors for precision fp32",
    ),
    Case(
        "compress-search-precision-not-profiled",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "precisions ['int8'] are not profiled",
        write("c.yaml", "search:\n  precisions: [int8]\n"),
    ),
    Case(
        "compress-unknown-profile-precision",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "not 'int3'",
        write("c.yaml", "profile:\n  precisions: [fp32, int3]\n"),
    ),
    Case(
        "export-unknown-precision",
        ["export", "{fx}/model", "--pareto", "{fx}/pareto.json", "--precision", "fp64", "--out", "{tmp}/bundles"],
        "unknown precision",
    ),
    Case("generate-missing-precision", ["generate", "{fx}/bundle", "hi", "--precision", "int8"], "no int8 engine"),
    Case(
        "check-missing-precision",
        ["check", "{fx}/bundle", "--baseline-bundle", "{fx}/bundle", "--workload", WORKLOAD, "--precision", "fp64"],
        "no fp64 engine",
    ),
    Case(
        "predict-unknown-quantile",
        ["predict", "{fx}/predictor", "--arch", ARCH, "--workload", WORKLOAD, "--quantile", "p99"],
        "no 'p99' model",
    ),
    # ---- thread counts ----
    Case(
        "profile-threads-0",
        ["profile", "{fx}/model", "--threads", "0", "--store", "{tmp}/p.sqlite"],
        "--threads must be >= 1",
    ),
    Case(
        "check-threads-negative",
        ["check", "{fx}/bundle", "--baseline-bundle", "{fx}/bundle", "--workload", WORKLOAD, "--threads", "-2"],
        "--threads must be >= 1",
    ),
    Case(
        "export-threads-0",
        ["export", "{fx}/model", "--arch", ARCH, "--verify", "--threads", "0", "--out", "{tmp}/b"],
        "--threads must be >= 1",
    ),
    # ---- profile stores ----
    Case(
        "profile-store-foreign-sqlite",
        ["profile", "{fx}/model", "--arch", ARCH, "--workload", WORKLOAD, "--store", "{tmp}/contacts.db"],
        "not a nasprune profile store",
        foreign_sqlite("contacts.db"),
    ),
    Case(
        "profile-store-text-file",
        ["profile", "{fx}/model", "--arch", ARCH, "--workload", WORKLOAD, "--store", "{tmp}/notes.txt"],
        "not a nasprune profile store",
        write("notes.txt", "shopping list\n"),
    ),
    Case(
        "fit-store-foreign-sqlite",
        ["predictor", "fit", "--store", "{tmp}/contacts.db", "--out", "{tmp}/p"],
        "not a nasprune profile store",
        foreign_sqlite("contacts.db"),
    ),
    Case(
        "predictor-eval-store-text-file",
        ["predictor", "eval", "{fx}/predictor", "--store", "{tmp}/notes.txt"],
        "not a nasprune profile store",
        write("notes.txt", "shopping list\n"),
    ),
    Case(
        "predictor-eval-store-missing",
        ["predictor", "eval", "{fx}/predictor", "--store", "{tmp}/none.sqlite"],
        "does not exist",
    ),
    Case(
        "profile-import-missing-results",
        ["profile", "import", "{tmp}/results.jsonl", "--store", "{tmp}/p.sqlite"],
        "does not exist",
    ),
    Case(
        "profile-import-corrupt-results",
        ["profile", "import", "{tmp}/results.jsonl", "--store", "{tmp}/p.sqlite"],
        "is not a run_profile.py result line",
        write("results.jsonl", '{"schema": "nasprune-profile/1"}\n'),
    ),
    # ---- predictors ----
    Case(
        "predict-missing-predictor",
        ["predict", "{tmp}/nowhere", "--arch", ARCH, "--workload", WORKLOAD],
        "not a predictor directory",
    ),
    Case(
        "predict-corrupt-manifest",
        ["predict", "{tmp}/p", "--arch", ARCH, "--workload", WORKLOAD],
        "is corrupt",
        both(copy("predictor", "p"), write("p/manifest.json", '{"schema": ')),
    ),
    Case(
        "predict-tampered-estimator",
        ["predict", "{tmp}/p", "--arch", ARCH, "--workload", WORKLOAD],
        "does not match the sha256",
        both(copy("predictor", "p"), flip_byte("p/estimator.skops")),
    ),
    Case(
        "predict-other-fingerprint",
        ["predict", "{fx}/predictor", "--arch", ARCH, "--workload", WORKLOAD, "--fingerprint", "fp-my-laptop"],
        "predictor is for fingerprint_id=fp-here",
    ),
    Case(
        "predict-calibrate-without-anchor",
        ["predict", "{tmp}/p", "--arch", ARCH, "--workload", WORKLOAD, "--calibrate", "--model", "{fx}/model"],
        "has no calibration anchor",
        both(copy("predictor", "p"), edit_json("p/manifest.json", lambda m: m.pop("anchor"))),
    ),
    Case(
        "search-calibrate-without-anchor",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{tmp}/p",
            "--workload",
            WORKLOAD,
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
            "--calibrate",
        ],
        "has no calibration anchor",
        both(copy("predictor", "p"), edit_json("p/manifest.json", lambda m: m.pop("anchor"))),
    ),
    Case(
        "search-tampered-predictor",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{tmp}/p",
            "--workload",
            WORKLOAD,
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/s",
        ],
        "does not match the sha256",
        both(copy("predictor", "p"), flip_byte("p/estimator.skops")),
    ),
    Case(
        "export-missing-predictor",
        ["export", "{fx}/model", "--arch", ARCH, "--predictor", "{tmp}/nowhere", "--out", "{tmp}/b"],
        "not a predictor directory",
    ),
    # ---- bundles ----
    Case("generate-not-a-bundle", ["generate", "{fx}/model", "hello"], "not a nasprune bundle"),
    Case("generate-missing-bundle", ["generate", "{tmp}/nowhere", "hello"], "not a nasprune bundle"),
    Case(
        "check-not-a-bundle",
        ["check", "{tmp}/mine", "--baseline-bundle", "{fx}/bundle", "--workload", WORKLOAD],
        "not a nasprune bundle",
        FOREIGN,
    ),
    Case(
        "generate-corrupt-manifest",
        ["generate", "{tmp}/b", "hello"],
        "is corrupt",
        both(copy("bundle", "b"), write("b/manifest.json", "{truncated")),
    ),
    Case(
        "generate-tampered-graph",
        ["generate", "{tmp}/b", "hello"],
        "was modified",
        both(copy("bundle", "b"), flip_byte("b/onnx/fp32/prefill/model.onnx")),
    ),
    Case(
        "check-tampered-graph",
        ["check", "{tmp}/b", "--baseline-bundle", "{fx}/bundle", "--workload", WORKLOAD],
        "was modified",
        both(copy("bundle", "b"), flip_byte("b/onnx/fp32/decode/model.onnx")),
    ),
    Case(
        "check-foreign-baseline",
        ["check", "{fx}/bundle", "--baseline", "{tmp}/notes.json", "--update-baseline", "--workload", WORKLOAD],
        "not a nasprune baseline",
        write("notes.json", '{"a": 1}'),
    ),
    Case(
        "check-zero-blocks",
        ["check", "{fx}/bundle", "--baseline-bundle", "{fx}/bundle", "--blocks", "0"],
        "--blocks must be >= 1",
    ),
    Case(
        "generate-zero-tokens",
        ["generate", "{fx}/bundle", "hello", "--max-new-tokens", "0"],
        "--max-new-tokens must be >= 1",
    ),
    Case(
        "check-corrupt-baseline",
        ["check", "{fx}/bundle", "--baseline", "{tmp}/base.json", "--workload", WORKLOAD],
        "not a nasprune baseline",
        write("base.json", '{"blocks": [["fast"]], "reference_ms": [1.0]}'),
    ),
    Case(
        "check-bad-threshold",
        ["check", "{fx}/bundle", "--baseline-bundle", "{fx}/bundle", "--threshold", "ten"],
        "--threshold must look like",
    ),
    # ---- YAML configs ----
    Case(
        "compress-bad-yaml",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "not valid YAML",
        write("c.yaml", "profile: [unclosed\n"),
    ),
    Case(
        "compress-blocks-zero-steps",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'blocks': block distillation steps must be >= 1",
        write("c.yaml", "blocks:\n  enabled: true\n  steps: 0\n"),
    ),
    Case(
        "compress-export-repair-too-few-tokens",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'export': repair needs at least two windows",
        write("c.yaml", "export:\n  repair: true\n  repair_tokens: 100\n"),
    ),
    Case(
        "compress-export-negative-ppl-ratio",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'export': max_ppl_ratio must be a number > 0",
        write("c.yaml", "export:\n  max_ppl_ratio: -2\n"),
    ),
    Case(
        "compress-export-targets-and-ppl-ratio",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'export': targets and max_ppl_ratio both choose the exported points",
        write("c.yaml", "export:\n  max_ppl_ratio: 4\n  targets: [1.3]\n"),
    ),
    Case(
        "compress-export-targets-not-numbers",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'export': targets must list perplexity ratios > 0",
        write("c.yaml", "export:\n  targets: 1.3\n"),
    ),
    Case(
        "compress-refine-distill-alpha-out-of-range",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'refine': refine distill_alpha must be in [0, 1] (got 1.5)",
        write("c.yaml", "refine:\n  distill_alpha: 1.5\n"),
    ),
    Case(
        "compress-unknown-section",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "unknown sections ['profiles']",
        write("c.yaml", "profiles:\n  samples: 3\n"),
    ),
    Case(
        "compress-typo-in-protocol",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "min_iter",
        write("c.yaml", "profile:\n  protocol:\n    min_iter: 3\n"),
    ),
    Case(
        "compress-unknown-train-key",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "unknown training settings ['step']",
        write("c.yaml", "train:\n  step: 3\n"),
    ),
    Case(
        "compress-section-not-settings",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "section 'profile' must hold settings",
        write("c.yaml", "profile: fast\n"),
    ),
    Case(
        "compress-yaml-list",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "must hold YAML settings",
        write("c.yaml", "- profile\n- search\n"),
    ),
    Case(
        "compress-missing-config",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "does not exist",
    ),
    Case(
        "compress-missing-data",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "missing.txt",
        write("c.yaml", "data:\n  train: /nonexistent/missing.txt\n"),
    ),
    Case(
        "compress-bad-workload-in-config",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "bad workload",
        write("c.yaml", "search:\n  workload: prefill-1x128\n"),
    ),
    Case(
        "compress-search-mix-not-profiled",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "are not profiled",
        write("c.yaml", "search:\n  workload: prefill:1x128 + 64*decode:1x128\n"),
    ),
    Case(
        "compress-wrong-value-type",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "profile.samples must be of type int",
        write("c.yaml", "profile:\n  samples: '8'\n"),
    ),
    Case(
        "compress-unknown-precision-in-config",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--config", "{tmp}/c.yaml"],
        "unknown precision(s) ['fp64']",
        write("c.yaml", "export:\n  precisions: [fp32, fp64]\n"),
    ),
    Case(
        "compress-bad-stop-after",
        ["compress", "{fx}/model", "--out", "{tmp}/run", "--stop-after", "profiling"],
        "--stop-after must be one of",
    ),
    Case(
        "train-bad-yaml",
        ["train", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/t", "--config", "{tmp}/t.yaml"],
        "not valid YAML",
        write("t.yaml", "steps: [1\n"),
    ),
    Case(
        "train-missing-config",
        ["train", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/t", "--config", "{tmp}/t.yaml"],
        "does not exist",
    ),
    Case(
        "train-unknown-key",
        ["train", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/t", "--config", "{tmp}/t.yaml"],
        "unknown training settings ['lrate']",
        write("t.yaml", "lrate: 0.1\n"),
    ),
    Case(
        "train-unknown-strategy",
        ["train", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/t", "--strategy", "sandwhich"],
        "unknown strategy 'sandwhich'",
    ),
    # ---- --out ----
    Case(
        "extract-out-is-file",
        ["extract", "{fx}/model", "--arch", ARCH, "--out", "{tmp}/notes.txt"],
        "is an existing file",
        write("notes.txt", "my notes\n"),
    ),
    Case(
        "export-repair-missing-data",
        ["export", "{fx}/model", "--arch", ARCH, "--repair", "{tmp}/nowhere.txt", "--out", "{tmp}/b"],
        "is not a file",
    ),
    Case(
        "export-repair-eval-is-repair-data",
        [
            "export",
            "{fx}/model",
            "--arch",
            ARCH,
            "--repair",
            "{fx}/heldout.txt",
            "--repair-eval",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/b",
        ],
        "is the repair data",
    ),
    Case(
        "block-scores-width-not-in-space",
        ["block-scores", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/s", "--heads", "5"],
        "not choices of the search space",
    ),
    Case(
        "block-scores-out-foreign-dir",
        ["block-scores", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "distill-blocks-zero-steps",
        ["distill-blocks", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/b", "--steps", "0"],
        "steps must be >= 1",
    ),
    Case(
        "distill-blocks-out-foreign-dir",
        ["distill-blocks", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "refine-out-foreign-dir",
        ["refine", "{fx}/model", "--arch", ARCH, "--data", "{fx}/heldout.txt", "--out", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "refine-arch-not-in-space",
        [
            "refine",
            "{fx}/model",
            "--arch",
            '{"embed_dim": 33, "num_heads": 2, "ffn_dim": 64, "num_layers": 2}',
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/r",
        ],
        "embed_dim",
    ),
    Case(
        "refine-zero-minutes",
        ["refine", "{fx}/model", "--arch", ARCH, "--data", "{fx}/heldout.txt", "--out", "{tmp}/r", "--minutes", "0"],
        "minutes must be > 0",
    ),
    Case(
        "refine-quantization-not-a-recipe",
        [
            "refine",
            "{fx}/model",
            "--arch",
            ARCH,
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/r",
            "--quantization",
            "int9",
        ],
        "unknown precision 'int9'",
    ),
    Case(
        "refine-quantization-static",
        [
            "refine",
            "{fx}/model",
            "--arch",
            ARCH,
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/r",
            "--quantization",
            "int8-static",
        ],
        "train in float",
    ),
    Case(
        "extract-out-foreign-dir",
        ["extract", "{fx}/model", "--arch", ARCH, "--out", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "export-out-foreign-dir",
        ["export", "{fx}/model", "--arch", ARCH, "--out", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "export-out-under-file",
        ["export", "{fx}/model", "--pareto", "{fx}/pareto.json", "--out", "{tmp}/notes.txt/b"],
        "is a file, not a directory",
        write("notes.txt", "my notes\n"),
    ),
    Case(
        "fit-out-is-file",
        ["predictor", "fit", "--store", "{fx}/profiles.sqlite", "--out", "{tmp}/notes.txt"],
        "is an existing file",
        write("notes.txt", "my notes\n"),
    ),
    Case(
        "search-out-foreign-dir",
        [
            "search",
            "{fx}/model",
            "--predictor",
            "{fx}/predictor",
            "--workload",
            WORKLOAD,
            "--data",
            "{fx}/heldout.txt",
            "--out",
            "{tmp}/mine",
        ],
        "files nasprune did not write",
        FOREIGN,
    ),
    Case(
        "importance-out-other-kind",
        ["importance", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/p"],
        "a nasprune predictor output, not a model",
        copy("predictor", "p"),
    ),
    Case(
        "compress-out-is-file",
        ["compress", "{fx}/model", "--out", "{tmp}/notes.txt"],
        "is an existing file",
        write("notes.txt", "my notes\n"),
    ),
    Case(
        "profile-export-only-foreign-dir",
        ["profile", "{fx}/model", "--arch", ARCH, "--workload", WORKLOAD, "--export-only", "{tmp}/mine"],
        "files nasprune did not write",
        FOREIGN,
    ),
    # ---- --pick / pareto ----
    Case(
        "export-pick-out-of-range",
        ["export", "{fx}/model", "--pareto", "{fx}/pareto.json", "--pick", "0,5", "--out", "{tmp}/bundles"],
        "out of range",
    ),
    Case(
        "export-pick-not-a-number",
        ["export", "{fx}/model", "--pareto", "{fx}/pareto.json", "--pick", "first", "--out", "{tmp}/bundles"],
        "--pick must be comma-separated indices",
    ),
    Case(
        "export-corrupt-pareto",
        ["export", "{fx}/model", "--pareto", "{tmp}/pareto.json", "--out", "{tmp}/bundles"],
        "not a nasprune pareto.json",
        write("pareto.json", '{"front": []}'),
    ),
    # ---- other knobs ----
    Case(
        "export-pareto-not-rows",
        ["export", "{fx}/model", "--pareto", "{tmp}/pareto.json", "--out", "{tmp}/bundles"],
        "not a nasprune pareto.json",
        write("pareto.json", '{"pareto": [1, 2]}'),
    ),
    Case("eval-bad-via", ["eval", "{fx}/model", "--data", "{fx}/heldout.txt", "--via", "onnx"], "--via must be"),
    Case(
        "importance-bad-layer-metric",
        ["importance", "{fx}/model", "--data", "{fx}/heldout.txt", "--out", "{tmp}/imp", "--layer-metric", "entropy"],
        "unknown --layer-metric 'entropy'",
    ),
]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """The case's directory; nasprune's cache and the profiler lock live inside it (so both are checked)."""
    monkeypatch.setenv("NASPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NASPRUNE_PROFILE_LOCK", str(tmp_path.parent / f"{tmp_path.name}.lock"))
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, fx: Path, isolated: Path):
    tmp = isolated
    case.setup(tmp, fx)
    args = [a.replace("{fx}", str(fx)).replace("{tmp}", str(tmp)) for a in case.args]
    before = snapshot(tmp, fx)
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    shown = (
        f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
    )
    assert "Traceback" not in result.output, shown
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), shown
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.needle in lines[0], shown
    assert snapshot(tmp, fx) == before, f"files changed\n{shown}"


def test_table_covers_every_command():
    commands = {c.name for c in app.registered_commands}
    commands |= {f"{g.name} {c.name}" for g in app.registered_groups for c in g.typer_instance.registered_commands}
    covered = {" ".join(c.args[:2]) if c.args[0] == "predictor" else c.args[0] for c in CASES}
    assert commands - covered == set(), "commands without a bad-input case"
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


# ---- the output-ownership rule, on extract ------------------------------------------------------
def _extract(fx: Path, out: Path, *extra: str, arch: str = ARCH):
    return runner.invoke(app, ["extract", str(fx / "model"), "--arch", arch, "--out", str(out), *extra])


def _arch_of(out: Path) -> dict:
    return json.loads((out / "nasprune.json").read_text())["subnetwork"]["arch"]


def test_out_new_dir_is_created(fx, isolated):
    out = isolated / "new" / "sub"
    r = _extract(fx, out)
    assert r.exit_code == 0, r.output
    assert _arch_of(out) == json.loads(ARCH) and (out / ".nasprune-output.json").is_file()
    assert sorted(p.name for p in isolated.iterdir()) == ["new"]  # no temporary dir left beside it


def test_out_existing_empty_dir_is_used(fx, isolated):
    out = isolated / "empty"
    out.mkdir()
    r = _extract(fx, out)
    assert r.exit_code == 0, r.output
    assert _arch_of(out) == json.loads(ARCH)


def test_out_same_kind_needs_overwrite(fx, isolated):
    out = isolated / "sub"
    assert _extract(fx, out).exit_code == 0
    before = snapshot(isolated)
    r = _extract(fx, out, arch=OTHER_ARCH)
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert snapshot(isolated) == before
    r = _extract(fx, out, "--overwrite", arch=OTHER_ARCH)
    assert r.exit_code == 0, r.output
    assert _arch_of(out) == json.loads(OTHER_ARCH)
    assert sorted(p.name for p in isolated.iterdir()) == ["sub"]


@pytest.mark.parametrize("kind", ["foreign-dir", "file"])
def test_out_foreign_is_refused_untouched_even_with_overwrite(fx, isolated, kind):
    out = isolated / "mine"
    if kind == "file":
        out.write_text("not yours\n")
    else:
        FOREIGN(isolated, fx)
    before = snapshot(isolated)
    for extra in ((), ("--overwrite",)):
        r = _extract(fx, out, *extra)
        assert r.exit_code == 2 and "nasprune never replaces it" in r.stderr, r.output
        assert snapshot(isolated) == before
