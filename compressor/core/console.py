"""The CLI kit every stage's commands share: one console, the ``--online`` state, the error handler.

This module is a leaf (it imports nothing of nasprune's but the error type), so each package's
``cli.py`` can use it without importing the orchestration that assembles the ``nasprune`` app:
the packages stay one chain (compressor -> profilers -> predictors -> search -> deploy -> nasprune).
``compressor.elastic.modeldir.load_for_cli`` is the model loader with this console's spinner.

Every user-facing problem is a :class:`NaspruneError` and prints as one line (``error: ...``)
with exit code 2; so do missing files and permission problems. Nothing else is caught: a bug
still shows its traceback.
"""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console
from rich.markup import escape

from compressor.core.errors import NaspruneError

console = Console()
err_console = Console(stderr=True)
STATE = {"online": False}


def offline_by_default(argv: list[str]) -> None:
    """Hub access is off unless ``--online``; must run before any Hugging Face import reads the environment."""
    if "--online" not in argv:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def one_line(text: str) -> str:
    """Collapse a message to one line (a multi-line library message would break the one-line promise)."""
    return " ".join(str(text).split())


def handles_errors(fn):
    """Turn expected failures into one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NaspruneError as e:
            err_console.print(f"[bold red]error:[/] {escape(one_line(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
            err_console.print(
                f"[bold red]error:[/] {escape(one_line(e.strerror or e))}: {escape(str(e.filename))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; run the same command again to resume where it stopped")
            raise typer.Exit(130) from None

    return wrapper


def quiet_transformers() -> None:
    """Our own progress bars and one-line errors only: silence transformers' bars and warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
