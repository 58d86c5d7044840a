"""The ``nasprune`` command line: one CLI drives every stage.

Hub access is off (``HF_HUB_OFFLINE=1``) unless ``--online`` is given. Every user-facing problem
is a :class:`NaspruneError` and prints as one line (``error: ...``) with exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

if "--online" not in sys.argv:  # before any Hugging Face import reads the environment
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from compressor.errors import NaspruneError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a decoder LLM into a Pareto front of faster sub-networks and ship them as engines.")
console = Console()
err_console = Console(stderr=True)
STATE = {"online": False}


def handles_errors(fn):
    """Turn expected failures into one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NaspruneError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            err_console.print(f"[bold red]error:[/] {e.strerror or e}: {e.filename}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; run the same command again to resume where it stopped")
            raise typer.Exit(130) from None

    return wrapper


@app.callback()
def _global(online: bool = typer.Option(False, "--online", help="Allow Hugging Face hub downloads (models, datasets, lm-eval tasks).")):
    STATE["online"] = online


def quiet_transformers() -> None:
    """Our own progress bars and one-line errors only: silence transformers' bars and warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _load(model: str):
    from compressor.modeldir import load_model

    quiet_transformers()
    with console.status(f"loading {model} ..."):
        return load_model(model, online=STATE["online"])


@app.command()
@handles_errors
def info(model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Architecture, search-space choices, number of sub-networks, min/max parameters."""
    loaded = _load(model)
    sn = loaded.supernet()
    space, dims = sn.space, sn.family.dims
    smallest, largest = space.smallest(), space.largest()
    data = {
        "model": model,
        "path": str(loaded.path) if loaded.path else None,
        "architecture": (loaded.model.config.architectures or [type(loaded.model).__name__])[0],
        "family": sn.family.name,
        "dims": dims.__dict__,
        "gqa": {"query_heads_per_kv_group": dims.q_per_group, "kv_groups": dims.num_kv_heads},
        "search_space": space.to_dict(),
        "layer_ranking": space.layer_ranking,
        "importance_permuted": loaded.meta.importance is not None,
        "params": {"min": space.num_params(smallest), "max": space.num_params(largest),
                   "smallest": smallest.to_dict(), "largest": largest.to_dict()},
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(f"[bold]{data['architecture']}[/] ({sn.family.name}) from {data['path'] or model}")
    console.print(f"  vocab {dims.vocab_size}, hidden {dims.hidden_size}, {dims.num_layers} layers, FFN {dims.intermediate_size}, "
                  f"{dims.num_heads} query heads in {dims.num_kv_heads} KV groups (head_dim {dims.head_dim}), "
                  f"tied embeddings: {dims.tied_embeddings}")
    table = Table(title="search space")
    table.add_column("dimension")
    table.add_column("choices")
    for dim, values in space.choices.items():
        shown = ", ".join(map(str, values))
        if dim == "num_heads":
            shown += f"   (KV heads: {', '.join(str(h // dims.q_per_group) for h in values)})"
        table.add_row(dim, shown)
    console.print(table)
    console.print(f"  sub-networks: {space.size:,}   params: {data['params']['min']:,} .. {data['params']['max']:,}")
    console.print(f"  layer ranking: {'importance' if loaded.meta.layer_ranking else 'identity (no importance yet)'}")
    for note in space.notes:
        console.print(f"  note: {note}")


@app.command()
@handles_errors
def extract(model: str = typer.Argument(..., help="dir, .gguf, hub id (--online) or 'default'"),
            arch: str = typer.Option(..., "--arch", help='JSON object {"embed_dim":..,"num_heads":..,"ffn_dim":..,"num_layers":..} or a file'),
            out: Path = typer.Option(..., "--out", help="Output nasprune model dir (plain HF checkpoint + nasprune.json)")):
    """Extract one sub-network as a standalone smaller model that plain transformers loads."""
    from compressor.extract import save_extracted
    from compressor.search_space import SubNetwork

    sub = SubNetwork.parse(arch)
    loaded = _load(model)
    sn = loaded.supernet()
    sn.space.validate(sub)
    with console.status(f"extracting {sub} ..."):
        path, n = save_extracted(loaded, sn, sub, out)
    console.print(f"wrote {path}: {sub} ({sn.space.num_kv_heads(sub)} KV heads), {n:,} params "
                  f"({n / sn.space.num_params(sn.space.largest()):.1%} of the super-network)")


def _register_stage_commands() -> None:
    """Each stage package adds its own commands (one module per stage keeps this file small)."""
    # --- stage command registrations (one line per stage) ---
    from profilers.cli import register as register_profile; register_profile(app)  # noqa: E702
    from compressor.commands import register as register_compressor; register_compressor(app)  # noqa: E702
    from predictors.cli import register as register_predictors; register_predictors(app, sys.modules[__name__])  # noqa: E702
    from deploy.cli import register as register_deploy; register_deploy(app)  # noqa: E702
    # --- end of stage command registrations ---


_register_stage_commands()


def main():
    app()


if __name__ == "__main__":
    # Run the importable module's app, so stage commands share one STATE (not this __main__ copy's).
    from compressor.cli import main as _main

    _main()
