import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nasprune.cli import app
from tests.conftest import make_tiny

runner = CliRunner()


@pytest.fixture
def tiny_dir(tmp_path):
    model = make_tiny("llama-gqa")
    model.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_info_json_has_documented_keys(tiny_dir):
    r = runner.invoke(app, ["info", str(tiny_dir), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert set(data["search_space"]["choices"]) == {"embed_dim", "num_heads", "ffn_dim", "num_layers"}
    assert data["params"]["min"] < data["params"]["max"]


def test_extract_writes_loadable_dir(tiny_dir, tmp_path):
    arch = '{"embed_dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2}'
    r = runner.invoke(app, ["extract", str(tiny_dir), "--arch", arch, "--out", str(tmp_path / "sub")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "sub" / "nasprune.json").read_text())
    assert meta["subnetwork"]["arch"]["embed_dim"] == 32 and meta["subnetwork"]["num_kv_heads"] == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            [
                "extract",
                "{d}",
                "--arch",
                '{"embed_dim": 33, "num_heads": 2, "ffn_dim": 32, "num_layers": 2}',
                "--out",
                "{o}",
            ],
            "embed_dim=33 is not one of",
        ),
        (["extract", "{d}", "--arch", "{broken", "--out", "{o}"], "not valid JSON"),
        (["info", "some-org/some-model"], "pass --online"),
        (["info", "{o}"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_dir, tmp_path, args, needle):
    args = [a.replace("{d}", str(tiny_dir)).replace("{o}", str(tmp_path / "nowhere.gguf")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "nasprune", *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_unsupported_checkpoint_is_one_line(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "g"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "nasprune", "info", str(tmp_path / "g")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unsupported architecture" in proc.stderr and "Traceback" not in proc.stderr
