"""DDP smoke test on CPU (gloo): two processes (torchrun + accelerate) train the super-network together."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_process_gloo_training(tiny_model, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(
        (
            "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife. "
        )
        * 40
    )
    out = tmp_path / "ddp"
    # torchrun starts the two gloo processes; accelerate reads their environment. (`accelerate launch --cpu
    # --num_processes 2` starts a single process on accelerate 1.x, so it would test nothing distributed.)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nasprune",
        "train",
        str(tiny_model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--strategy",
        "grid-params",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "nasprune.json").read_text())
    assert meta["provenance"]["training"]["steps"] == 2
    assert meta["provenance"]["training"]["processes"] == 2  # really two ranks
