"""Recovery by distillation: logit knowledge distillation (KD) for super-network training.

Two teachers (``TrainConfig.teacher``):

* ``original`` (Minitron-style): the unpruned, permuted model as it is when training starts,
  frozen. Its targets are computed **once** per training token set and kept on disk by
  :class:`TeacherCache`, so a training step pays only a memory-mapped read, not a teacher
  forward, and the teacher never has to stay in memory next to the student.
* ``largest`` (in-place distillation, US-Nets / BigNAS): the largest sub-network of the *same*
  sandwich step is the teacher of the other sub-networks, with its logits detached
  (:func:`inplace_targets`), so the KD term never pushes gradient into the teacher; the largest
  itself trains on cross-entropy. Costs nothing extra: its forward runs anyway.

Why top-k + tail (:func:`kd_loss`): the exact forward KL needs the teacher's full distribution
per token, i.e. 49,152 floats per token for SmolLM2 (~100 KB in fp16; 50 GB for 2M training
tokens). Keeping the teacher's top-k tokens (default 64, > 99 % of the mass for a trained LM)
plus **one tail bucket** holding the remaining probability mass is the standard sparse-KD
approximation: the student is matched on the k tokens the teacher cares about and on how much
mass it puts elsewhere, which is exactly the KL between the two distributions coarsened to
k + 1 outcomes (a lower bound of the full KL that is tight when the tail is small). Storage is
k x (2 + 4) bytes + 4 per token (fp16 values, int32 indices, fp32 tail): 0.4 KB instead of 100 KB.

Cache layout (``ROOT/<key>/``, key = sha256 of the training token ids + attention mask, a hash
of the teacher's weights, k, seq_len, temperature, value dtype and mixed-precision mode)::

    meta.json             format, shapes, dtypes (written before the directory is renamed into place)
    topk_idx.npy          int32   [windows, seq_len, k]   teacher's top-k token ids per position
    topk_logprob.npy      fp16/32 [windows, seq_len, k]   log p_teacher(token) at the temperature
    tail_logprob.npy      fp32    [windows, seq_len]      log of the teacher's remaining mass
    progress-r<R>.json    chunks of windows filled by writer R (written atomically: tmp + os.replace)

The arrays are ``.npy`` files opened as memory maps (``np.load(..., mmap_mode=...,
allow_pickle=False)``: nothing is ever unpickled). Filling goes in chunks of windows; a chunk is
recorded as done only after its rows are flushed, so an interrupted fill resumes at the first
missing chunk and a later run or ``--resume`` pays no teacher forward for cached windows.

Distributed (accelerate DDP): every rank fills a **shard** of the missing chunks (chunk ``c`` by
rank ``c % world``) into the shared arrays, each rank recording its chunks in its own progress
file (so no two processes ever write the same file); barriers separate creation, filling and
reading, and afterwards every rank reads the windows of its own batches from the shared cache.
The cache directory must therefore be visible to every rank (the default ``$NASPRUNE_CACHE``
on a single node). Sharding keeps the fill time balanced, so the barrier after it waits about
as long as each rank's own share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from compressor.core.errors import NaspruneError

CACHE_FORMAT = "nasprune-teacher-cache/1"
VALUE_DTYPES = ("float16", "float32")
DEFAULT_CHUNK_WINDOWS = 1  # windows per chunk (the unit of progress and of DDP sharding): training reads
# windows in a random order, so a coarser chunk would make the fill compute many windows never read


# ---- losses -------------------------------------------------------------------------------------


def _no_tokens(student_logits: torch.Tensor) -> torch.Tensor:
    return student_logits.sum() * 0.0  # keeps the graph so backward() still works


def kd_loss(
    student_logits: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_logprob: torch.Tensor,
    tail_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's top-k tokens plus one tail bucket.

    ``student_logits`` ``[..., V]``; ``topk_idx`` / ``topk_logprob`` ``[..., k]`` and
    ``tail_logprob`` ``[...]`` are the teacher's log-probabilities at ``temperature``;
    ``mask`` ``[...]`` selects the supervised tokens (default: all). The student's distribution
    is coarsened the same way: its log-probs (at ``temperature``) on the k ids, and its tail =
    logsumexp of its log-probs over the *complement* of the k ids (exact, computed in log space,
    so no ``log(1 - sum p)`` cancellation when the k ids hold almost all the mass). The teacher's
    k + 1 log-probs are renormalized (they may not sum to 1 exactly after fp16 storage).

    Returns the KL summed over the k + 1 outcomes, averaged over the masked tokens, times T^2
    (Hinton et al.: keeps gradient magnitudes independent of T).
    """
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    if not bool(mask.any()):
        return _no_tokens(student_logits)
    vocab = student_logits.shape[-1]
    logq = (student_logits[mask].float() / temperature).log_softmax(-1)  # [M, V]
    idx = topk_idx[mask].long()
    q = logq.gather(-1, idx)  # [M, k]
    t = topk_logprob[mask].float()
    if idx.shape[-1] < vocab:  # the tail bucket exists
        q = torch.cat([q, logq.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)], -1)
        t = torch.cat([t, tail_logprob[mask].float()[:, None]], -1)
    t = t - t.logsumexp(-1, keepdim=True)
    p = t.exp()
    kl = torch.where(p > 0, p * (t - q), torch.zeros_like(p)).sum(-1)
    return kl.mean() * temperature**2


def kd_loss_full(
    student_logits: torch.Tensor,
    teacher_logprob: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Full-vocabulary forward KL(teacher || student), ``teacher_logprob`` already at the
    temperature (see :func:`inplace_targets`); averaged over masked tokens, times T^2."""
    if mask is None:
        mask = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    if not bool(mask.any()):
        return _no_tokens(student_logits)
    logq = (student_logits[mask].float() / temperature).log_softmax(-1)
    kl = F.kl_div(logq, teacher_logprob[mask].float(), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature**2


def inplace_targets(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The in-place teacher's log-probs at the temperature, **detached**: the KD term of the
    smaller sub-networks must not send gradient into the largest sub-network (its graph was
    already consumed by its own cross-entropy backward; BigNAS / US-Nets treat it as a constant)."""
    return (teacher_logits.detach().float() / temperature).log_softmax(-1)


def topk_targets(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(top-k ids, top-k log-probs, tail log-prob) of ``logits [..., V]`` at ``temperature``."""
    vocab = logits.shape[-1]
    if k > vocab:
        raise NaspruneError(f"distill_topk ({k}) exceeds the vocabulary ({vocab}); use at most {vocab}")
    logp = (logits.float() / temperature).log_softmax(-1)
    values, idx = logp.topk(k, dim=-1)
    if k < vocab:
        tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    else:
        tail = torch.full(logp.shape[:-1], float("-inf"), device=logp.device)
    return idx, values, tail


# ---- hashing ------------------------------------------------------------------------------------


def state_dict_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes, bytes).

    Used instead of :func:`compressor.elastic.modeldir.weights_hash` because the teacher is the model *in
    memory*: importance permutation (``prepare_model``, benchmarks) changes the weights without
    touching the files, so a hash of the files would not identify it. It costs about the same as
    hashing the safetensors (one pass over the weights).
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def cache_key(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    teacher_hash: str,
    k: int,
    temperature: float,
    value_dtype: str,
    precision: str,
) -> str:
    h = hashlib.sha256()
    ids = np.ascontiguousarray(input_ids.cpu().numpy().astype(np.int64))
    mask = np.ascontiguousarray(attention_mask.cpu().numpy().astype(np.int8))
    h.update(
        json.dumps(
            {
                "format": CACHE_FORMAT,
                "shape": list(ids.shape),
                "teacher": teacher_hash,
                "k": int(k),
                "seq_len": int(ids.shape[1]),
                "temperature": float(temperature),
                "dtype": value_dtype,
                "precision": precision,
            },
            sort_keys=True,
        ).encode()
    )
    h.update(ids.data)
    h.update(mask.data)
    return h.hexdigest()


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


# ---- the cache ----------------------------------------------------------------------------------


class TeacherCache:
    """The frozen teacher's top-k log-probs + tail per training token, on disk (memory-mapped).

    ``ensure(windows, teacher)`` fills the chunks covering ``windows`` that are not cached yet
    (``teacher(input_ids, attention_mask) -> logits`` runs only for those); ``fetch(idx, device)``
    returns the targets of a batch of windows and accounts the time it took in
    ``fetch_seconds`` (``take_fetch_seconds()`` returns and resets the per-step total), so the
    trainer can log the teacher's cost per step. ``teacher_windows`` counts the windows this
    object ran the teacher on (0 when everything was cached).
    """

    def __init__(
        self,
        root: Path,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        teacher_hash: str,
        k: int = 64,
        temperature: float = 1.0,
        value_dtype: str = "float16",
        chunk_windows: int | None = None,
        precision: str = "no",
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] | None = None,
    ):
        chunk_windows = DEFAULT_CHUNK_WINDOWS if chunk_windows is None else chunk_windows
        if value_dtype not in VALUE_DTYPES:
            raise NaspruneError(f"teacher cache value dtype must be float16 or float32 (got {value_dtype})")
        if k < 1 or chunk_windows < 1:
            raise NaspruneError(f"teacher cache needs k >= 1 and chunk_windows >= 1 (got {k}, {chunk_windows})")
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.n, self.seq_len = input_ids.shape
        self.k, self.temperature, self.value_dtype = int(k), float(temperature), value_dtype
        self.chunk = int(chunk_windows)
        self.num_chunks = math.ceil(self.n / self.chunk)
        self.rank, self.world = rank, world
        self.barrier = barrier or (lambda: None)
        self.key = cache_key(input_ids, attention_mask, teacher_hash, k, temperature, value_dtype, precision)
        self.dir = Path(root) / self.key
        self.teacher_windows = 0
        self.fill_seconds = 0.0
        self.fetch_seconds = 0.0
        self._step_fetch = 0.0
        self._arrays: dict[str, np.ndarray] | None = None
        self._done = np.zeros(self.num_chunks, dtype=bool)

    # -- layout
    def _shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {
            "topk_idx": ((self.n, self.seq_len, self.k), "int32"),
            "topk_logprob": ((self.n, self.seq_len, self.k), self.value_dtype),
            "tail_logprob": ((self.n, self.seq_len), "float32"),
        }

    def _meta(self) -> dict:
        return {
            "format": CACHE_FORMAT,
            "windows": self.n,
            "seq_len": self.seq_len,
            "k": self.k,
            "temperature": self.temperature,
            "chunk_windows": self.chunk,
            "arrays": {name: {"shape": list(s), "dtype": d} for name, (s, d) in self._shapes().items()},
        }

    def _create(self) -> None:
        """Create the (sparse) arrays in a temporary dir, then rename it into place atomically."""
        if (self.dir / "meta.json").exists():
            return
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.dir.parent / f".{self.key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            for name, (shape, dtype) in self._shapes().items():
                arr = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                del arr
            _write_json_atomic(tmp / "meta.json", self._meta())
            try:
                os.rename(tmp, self.dir)
            except OSError:  # another process created it first
                if not (self.dir / "meta.json").exists():
                    raise NaspruneError(
                        f"teacher cache {self.dir} exists without meta.json; delete it to rebuild"
                    ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _open(self, mode: str) -> None:
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise NaspruneError(
                f"teacher cache {self.dir} is unreadable ({type(e).__name__}); delete it to rebuild"
            ) from None
        if meta.get("format") != CACHE_FORMAT or meta.get("chunk_windows") != self.chunk:
            raise NaspruneError(f"teacher cache {self.dir} has another format or chunking; delete it to rebuild")
        arrays = {}
        for name, (shape, dtype) in self._shapes().items():
            try:
                arr = np.load(self.dir / f"{name}.npy", mmap_mode=mode, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise NaspruneError(
                    f"teacher cache array {self.dir / name}.npy is corrupt ({e}); delete {self.dir}"
                ) from None
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise NaspruneError(
                    f"teacher cache array {self.dir / name}.npy has shape {arr.shape} {arr.dtype}, "
                    f"expected {shape} {dtype}; delete {self.dir}"
                )
            arrays[name] = arr
        self._arrays = arrays

    def _progress_path(self) -> Path:
        return self.dir / f"progress-r{self.rank}.json"

    def _read_done(self) -> np.ndarray:
        done = np.zeros(self.num_chunks, dtype=bool)
        for path in self.dir.glob("progress-r*.json"):
            try:
                chunks = json.loads(path.read_text()).get("done_chunks", [])
            except (OSError, json.JSONDecodeError, AttributeError):
                continue  # never trust a damaged record: those chunks are simply recomputed
            for c in chunks:
                if isinstance(c, int) and 0 <= c < self.num_chunks:
                    done[c] = True
        return done

    def done_windows(self) -> np.ndarray:
        """Per window, whether its targets are cached already (from the progress records only: nothing is
        opened or created), so a caller can price what ``ensure`` would still run the teacher on."""
        done = self._read_done() if self.dir.is_dir() else np.zeros(self.num_chunks, dtype=bool)
        return np.repeat(done, self.chunk)[: self.n]

    def chunks_of(self, windows) -> np.ndarray:
        if windows is None:
            return np.arange(self.num_chunks)
        return np.unique(np.asarray(windows, dtype=np.int64) // self.chunk)

    # -- filling
    def ensure(
        self,
        windows,
        teacher: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch_size: int = 8,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] | None = None,
    ) -> dict:
        """Make sure the chunks covering ``windows`` (all when None) are cached; compute this
        rank's share of the missing ones with ``teacher``. Collective under DDP (every rank calls it)."""
        t0 = time.perf_counter()
        needed = self.chunks_of(windows)
        if self.rank == 0:
            self._create()
        self.barrier()
        done = self._read_done()
        mine = [int(c) for c in needed if not done[c] and c % self.world == self.rank]
        if mine:
            self._open("r+")
            own = self.dir / f"progress-r{self.rank}.json"
            recorded = set()
            if own.exists():
                with contextlib.suppress(OSError, json.JSONDecodeError, AttributeError):
                    recorded = {c for c in json.loads(own.read_text()).get("done_chunks", []) if isinstance(c, int)}
            if log:
                log(
                    f"teacher cache: computing {len(mine)} of {len(needed)} chunks ({self.chunk} windows each) "
                    f"in {self.dir}"
                )
            per_group = max(1, batch_size // self.chunk)  # one teacher forward fills several (scattered) chunks
            for g in range(0, len(mine), per_group):
                group = mine[g : g + per_group]
                self._fill_chunks(group, teacher, batch_size, device)
                recorded.update(group)
                _write_json_atomic(own, {"done_chunks": sorted(recorded), "chunk_windows": self.chunk})
        self._arrays = None
        self.barrier()
        self._open("r")  # re-open read-only: sees every rank's rows
        self._done = self._read_done()
        missing = [int(c) for c in needed if not self._done[c]]
        if missing:
            raise NaspruneError(
                f"teacher cache {self.dir} is missing chunks {missing[:5]} after filling; "
                "check that every rank sees the same cache directory"
            )
        self.fill_seconds += time.perf_counter() - t0
        return {
            "cache_dir": str(self.dir),
            "chunks": len(needed),
            "chunks_computed": len(mine),
            "teacher_windows": self.teacher_windows,
            "seconds": round(time.perf_counter() - t0, 3),
        }

    def _fill_chunks(self, chunks: list[int], teacher, batch_size: int, device) -> None:
        a = self._arrays
        rows = np.concatenate([np.arange(c * self.chunk, min(self.n, (c + 1) * self.chunk)) for c in chunks])
        for s in range(0, len(rows), batch_size):
            sel = rows[s : s + batch_size]
            ids = self.input_ids[torch.as_tensor(sel)].to(device)
            mask = self.attention_mask[torch.as_tensor(sel)].to(device)
            with torch.no_grad():
                logits = teacher(ids, mask)
                idx, values, tail = topk_targets(logits, self.k, self.temperature)
            self.teacher_windows += len(sel)
            a["topk_idx"][sel] = idx.to("cpu", torch.int32).numpy()
            a["topk_logprob"][sel] = values.to("cpu").numpy().astype(self.value_dtype)
            a["tail_logprob"][sel] = tail.to("cpu", torch.float32).numpy()
        for arr in a.values():
            arr.flush()  # rows on disk before the chunks are recorded as done

    # -- reading
    def fetch(self, idx, device: torch.device | str = "cpu"):
        """(top-k ids int64, top-k log-probs fp32, tail log-prob fp32) of windows ``idx`` on ``device``."""
        t0 = time.perf_counter()
        if self._arrays is None:
            raise NaspruneError("teacher cache used before ensure(); call ensure() first")
        idx = np.asarray(idx, dtype=np.int64)
        if not self._done[idx // self.chunk].all():
            raise NaspruneError(
                f"teacher cache {self.dir} has no targets for windows {idx.tolist()}; "
                "call ensure() with every window the run reads"
            )
        order = np.argsort(idx, kind="stable")  # sequential reads; undone below
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_idx = idx[order]
        a = self._arrays
        out = tuple(
            torch.from_numpy(np.ascontiguousarray(a[name][sorted_idx][inverse]))
            for name in ("topk_idx", "topk_logprob", "tail_logprob")
        )
        top_idx = out[0].to(device).long()
        top_lp = out[1].to(device).float()
        tail = out[2].to(device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        self.fetch_seconds += dt
        self._step_fetch += dt
        return top_idx, top_lp, tail

    def take_fetch_seconds(self) -> float:
        """Seconds spent in ``fetch`` since the last call (the teacher's cost of one step)."""
        dt, self._step_fetch = self._step_fetch, 0.0
        return dt
