"""CLI commands of the compressor stages: the model commands (info, extract, importance, eval;
:mod:`compressor.cli.model`) and the recovery commands (train, refine, distill-blocks, block-scores;
:mod:`compressor.cli.recovery`).

``register(app)`` adds them to the one ``nasprune`` app (assembled in ``nasprune.cli``); the
shared console, ``--online`` state and one-line error handler come from ``compressor.core.console``.
"""

from __future__ import annotations

import typer

from compressor.cli.model import evaluate, extract, importance, info
from compressor.cli.recovery import block_scores, distill_blocks, refine, train
from compressor.core.console import handles_errors


def register(app: typer.Typer) -> None:
    app.command("info")(handles_errors(info))
    app.command("extract")(handles_errors(extract))
    app.command("importance")(handles_errors(importance))
    app.command("train")(handles_errors(train))
    app.command("eval")(handles_errors(evaluate))
    app.command("refine")(handles_errors(refine))
    app.command("distill-blocks")(handles_errors(distill_blocks))
    app.command("block-scores")(handles_errors(block_scores))
