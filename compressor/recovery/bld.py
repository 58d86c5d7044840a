"""Block-local distillation (BLD) of the elastic super-network: every width of every block in one pass.

NVIDIA Puzzle / Model-Optimizer's "Matryoshka elastic bypass": each transformer block learns, from
the *original* model's hidden state entering it, to reproduce the original block's output; a
prefix width (embedding channels, heads in whole KV groups, FFN neurons) is sampled per block per
step, so all widths of all blocks train at once. Blocks never see each other, so the work splits
over processes (or machines) with no communication; the result is the same whatever the split,
because block ``i`` draws its widths and batches from its own RNG seeded by ``(seed, i)``.

Loss (Puzzle's normalized MSE, on the block's *contribution* to the residual stream)::

    L_i = ||(y - x) - (t - x)||^2 / ||t - x||^2      on the first k_embed channels

``x`` is the original residual entering block ``i`` (its first k channels are the student's
input), ``t`` the original residual after it, ``y`` the student block's output. Normalizing the
whole residual instead would be dominated by ``x`` itself, which passes through unchanged.

Teacher activations are computed once (one forward of the original over the calibration tokens)
and kept on disk as fp16 ``.npy`` files (``allow_pickle=False``) that every process memory-maps;
recomputing them on the fly would cost a teacher forward of up to ``i`` blocks per step of block
``i`` (measured in ``benchmarks/recovery.py``'s notes). Layer dropping is not trained here (a block
cannot learn to stand in for a missing one from local signals): the end-to-end distillation stage
after BLD handles the depth choices.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.core.errors import NaspruneError


@dataclass
class BlockDistillConfig:
    """Every setting of block-local distillation: the one definition that ``nasprune distill-blocks``'s
    option defaults, the YAML ``blocks:`` section of ``nasprune compress`` and the library read."""

    steps: int = 100  # optimizer steps per block
    batch_size: int = 4  # windows per step
    seq_len: int = 256
    tokens: int = 8192  # calibration tokens whose teacher activations are cached
    lr: float = 1e-4
    processes: int = 1
    seed: int = 0
    # CPU threads per process; None: the machine's cores split over the processes (one process: torch's own)
    threads: int | None = None

    def __post_init__(self):
        if self.threads is not None and int(self.threads) < 1:
            raise NaspruneError(f"block distillation threads must be >= 1 (got {self.threads})")
        for name in ("steps", "batch_size", "seq_len", "tokens", "processes"):
            if int(getattr(self, name)) < 1:
                raise NaspruneError(f"block distillation {name} must be >= 1 (got {getattr(self, name)})")
        if self.tokens < self.seq_len * self.batch_size:
            raise NaspruneError(
                f"block distillation needs tokens >= seq_len x batch_size ({self.seq_len * self.batch_size})"
            )
        if not self.lr > 0:
            raise NaspruneError(f"block distillation lr must be > 0 (got {self.lr})")

    @staticmethod
    def from_dict(d: dict | None) -> BlockDistillConfig:
        """The config of the settings ``d`` (YAML or JSON); unknown keys are refused in one line."""
        from dataclasses import fields

        d = dict(d or {})
        known = {f.name for f in fields(BlockDistillConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NaspruneError(f"unknown block distillation settings {unknown}; known: {sorted(known)}")
        return BlockDistillConfig(**d)


# ---- teacher activations ------------------------------------------------------------------
def cache_teacher_activations(supernet, windows: torch.Tensor, directory: Path) -> dict:
    """Residual entering every block and after the last one, of the full model, as fp16 .npy files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    start = time.perf_counter()
    sn = supernet.eval()
    n_layers = len(sn.family.layers(sn.model))
    n, t = windows.shape
    d = sn.family.dims.hidden_size
    arrays = [
        np.lib.format.open_memmap(directory / f"h{i}.npy", mode="w+", dtype=np.float16, shape=(n, t, d))
        for i in range(n_layers + 1)
    ]
    with torch.no_grad(), sn.selected(sn.space.largest()):
        for b in range(0, n, 4):
            ids = windows[b : b + 4]
            x, cos_sin = sn._embed(ids)
            arrays[0][b : b + len(ids)] = x.numpy().astype(np.float16)
            for i, layer in enumerate(sn.family.layers(sn.model)):
                x = sn.family.block(layer, x, cos_sin, None, sn._shape)
                arrays[i + 1][b : b + len(ids)] = x.numpy().astype(np.float16)
    for a in arrays:
        a.flush()
    meta = {"windows": n, "seq_len": t, "hidden": d, "layers": n_layers, "seconds": time.perf_counter() - start}
    tmp = meta_path.with_name(f".meta.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)  # written last: a directory with meta.json is complete
    return meta


def _open(directory: Path, i: int) -> np.ndarray:
    return np.load(Path(directory) / f"h{i}.npy", mmap_mode="r", allow_pickle=False)


# ---- one block ----------------------------------------------------------------------------
def block_loss(supernet, layer_index: int, x: torch.Tensor, t: torch.Tensor, sub) -> torch.Tensor:
    """Normalized MSE of block ``layer_index`` at the widths of ``sub`` on teacher input ``x`` / output ``t``."""
    sn = supernet
    shape = sn._shape_of(sub)
    k = sub.embed_dim
    xk, tk = x[..., :k], t[..., :k]
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    cos_sin = sn.family.rotary(sn.model)(xk, positions)
    y = sn.family.block(sn.family.layers(sn.model)[layer_index], xk, cos_sin, None, shape)
    target = tk - xk
    return ((y - xk) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


def _optimize_block(sn, layer_index: int, steps: int, lr: float, draw) -> tuple[list[float], list[float]]:
    """AdamW on block ``layer_index``'s parameters alone; ``draw(step) -> (x, t, sub)`` supplies each step's
    teacher input, teacher output and widths. Returns the losses of the first tenth and of the rest."""
    layer = sn.family.layers(sn.model)[layer_index]
    params = [p for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    first, last = [], []
    layer.train()
    for step in range(steps):
        x, t, sub = draw(step)
        loss = block_loss(sn, layer_index, x, t, sub)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        (first if step < max(1, steps // 10) else last).append(float(loss.detach()))
    layer.eval()
    for p in params:
        p.requires_grad_(False)
    return first, last


def train_block(supernet, layer_index: int, acts: Path, cfg: BlockDistillConfig) -> dict:
    """Train one block over sampled widths; returns its loss curve summary. Deterministic in (seed, block)."""
    sn = supernet
    space = sn.space
    rng = np.random.default_rng([cfg.seed, layer_index])
    torch.manual_seed(cfg.seed * 100_003 + layer_index)
    x_all, t_all = _open(acts, layer_index), _open(acts, layer_index + 1)
    n = x_all.shape[0]
    bounds = space.gene_upper_bounds()

    def draw(step):
        idx = np.sort(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
        x = torch.from_numpy(np.asarray(x_all[idx], dtype=np.float32))
        t = torch.from_numpy(np.asarray(t_all[idx], dtype=np.float32))
        return x, t, space.decode([int(rng.integers(0, b + 1)) for b in bounds])

    first, last = _optimize_block(sn, layer_index, cfg.steps, cfg.lr, draw)
    return {"layer": layer_index, "loss_first": float(np.mean(first)), "loss_last": float(np.mean(last or first))}


# ---- one chosen sub-network (refine) --------------------------------------------------------
@torch.no_grad()
def teacher_residuals(teacher, windows: torch.Tensor, wanted: set[int], chunk: int = 4) -> dict[int, torch.Tensor]:
    """The teacher's (a :class:`compressor.elastic.supernet.SuperNetwork`, run at its largest sub-network)
    residual stream ``h_i`` for every ``i`` in ``wanted``: ``h_0`` is the embedding output, ``h_{i+1}``
    the stream after layer ``i``. Kept in memory (fp32): one sub-network needs at most depth + 1 of them."""
    out: dict[int, list] = {i: [] for i in sorted(wanted)}
    with teacher.selected(teacher.space.largest()):
        for b in range(0, len(windows), chunk):
            for i, (x, y) in enumerate(teacher.block_io(windows[b : b + chunk])):
                if i == 0 and 0 in out:
                    out[0].append(x)
                if i + 1 in out:
                    out[i + 1].append(y)
                if i + 1 >= max(out):
                    break  # the deeper blocks are not wanted
    return {i: torch.cat(parts) for i, parts in out.items()}


def distill_chosen_blocks(
    student_model,
    teacher,
    kept: list[int],
    windows: torch.Tensor,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
) -> dict:
    """Block-local distillation of *one* extracted sub-network (in place), Puzzle's BLD of the chosen
    child: the student's block ``j`` (the parent's layer ``kept[j]``) reads the teacher's residual entering
    that layer (first ``embed_dim`` channels) and learns to produce the teacher's residual where the
    student's next block reads it, i.e. before the parent's next kept layer (the last block: after the
    parent's last layer). A block thereby absorbs the layers dropped after it, which matrix-prefix BLD over
    all widths (:func:`train_block`) cannot train. All of the block's weights move, not only the two
    output projections closed-form repair refits. Blocks are independent (teacher-forced inputs).

    Why before refine's end-to-end KD: a block-local step costs one block's forward and backward, no LM
    head or 49k-way softmax (session 11: 0.19 s per block step of 1,024 tokens, so ~4.6 s for all 24
    blocks, vs ~4.5 s per KD step of 512 tokens). Measured with ``benchmarks/refine_recipe.py
    --block-steps``: the cheaper tokens do not buy end-to-end quality; at equal minutes BLD + KD equals
    KD alone after repair, and from the one-shot weights it saves KD only 6-20 % of its minutes, less than
    repair's head start (session 15, ``--no-repair``; README), so refine leaves it off."""
    from compressor.elastic.supernet import SuperNetwork
    from compressor.recovery.distill_states import teacher_layer_targets

    start = time.perf_counter()
    depth = len(teacher.family.layers(teacher.model))
    targets = [t + 1 for t in teacher_layer_targets(kept, depth)]
    states = teacher_residuals(teacher, windows, set(kept) | set(targets))
    fill = time.perf_counter() - start
    student = SuperNetwork(student_model)
    if len(student.family.layers(student.model)) != len(kept):
        raise NaspruneError(f"the student has {len(student.family.layers(student.model))} blocks, kept {len(kept)}")
    sub = student.space.largest()
    n = len(windows)
    blocks = []
    for j, (i, t_index) in enumerate(zip(kept, targets)):
        rng = np.random.default_rng([seed, j])
        torch.manual_seed(seed * 100_003 + j)
        x_all, t_all = states[i], states[t_index]

        def draw(step, rng=rng, x_all=x_all, t_all=t_all):
            idx = torch.from_numpy(np.sort(rng.choice(n, size=min(batch_size, n), replace=False)))
            return x_all[idx], t_all[idx], sub

        first, last = _optimize_block(student, j, steps, lr, draw)
        blocks.append(
            {
                "block": j,
                "parent_layer": i,
                "target_state": t_index,
                "loss_first": float(np.mean(first)),
                "loss_last": float(np.mean(last or first)),
            }
        )
    student_model.eval()
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "windows": n,
        "teacher_seconds": fill,
        "seconds": time.perf_counter() - start,
        "blocks": blocks,
    }


# ---- all blocks, split over processes -----------------------------------------------------
def _worker(model_dir: str, acts: str, cfg: BlockDistillConfig, rank: int, out: str, threads: int) -> None:
    from safetensors.torch import save_file

    from compressor.elastic.modeldir import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir)
    sn = loaded.supernet()
    n_layers = len(sn.family.layers(sn.model))
    mine = [i for i in range(n_layers) if i % cfg.processes == rank]
    reports = [train_block(sn, i, Path(acts), cfg) for i in mine]
    state = {}
    for i in mine:
        prefix = f"{i}."
        for name, p in sn.family.layers(sn.model)[i].named_parameters():
            state[prefix + name] = p.detach().contiguous()
    save_file(state, f"{out}/blocks-r{rank}.safetensors")
    Path(f"{out}/blocks-r{rank}.json").write_text(json.dumps(reports))


def distill_blocks(model_dir: str, windows: torch.Tensor, work: Path, cfg: BlockDistillConfig, log=print):
    """BLD of every block of the super-network at ``model_dir``; returns (loaded model with trained blocks, report).

    ``work`` holds the teacher activations (reused by later runs on the same windows) and the
    per-process results. With ``cfg.processes > 1`` the blocks are trained in that many spawned
    processes (torch.multiprocessing), one CPU thread each share of the machine's cores."""
    from safetensors.torch import load_file

    from compressor.elastic.modeldir import load_model

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model_dir)
    sn = loaded.supernet()
    # keyed by the calibration tokens and the teacher's weights: a stale cache is never read
    from compressor.core.hashing import sha256_parts
    from compressor.recovery.distill import state_dict_hash

    key = sha256_parts([windows.numpy().tobytes(), state_dict_hash(sn.model)]).hexdigest()[:16]
    acts = work / "teacher" / key
    fill = cache_teacher_activations(sn, windows, acts)
    log(f"teacher activations: {fill['windows']} windows x {fill['seq_len']} tokens, {fill['layers'] + 1} states")
    start = time.perf_counter()
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.processes)
    if cfg.processes == 1:
        before = torch.get_num_threads()
        try:
            _worker(model_dir, str(acts), cfg, 0, str(work), cfg.threads or before)
        finally:
            torch.set_num_threads(before)  # the worker ran in this process: leave its thread count as it was
    else:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(model_dir, str(acts), cfg, r, str(work), threads))
            for r in range(cfg.processes)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise NaspruneError(f"block distillation worker(s) {failed} failed; see their output above")
    seconds = time.perf_counter() - start
    layers = sn.family.layers(sn.model)
    reports = []
    for r in range(cfg.processes):
        for key, value in load_file(str(work / f"blocks-r{r}.safetensors")).items():
            i, name = key.split(".", 1)
            layers[int(i)].get_parameter(name).data.copy_(value)
        reports += json.loads((work / f"blocks-r{r}.json").read_text())
    report = {
        "config": asdict(cfg),
        "seconds": seconds,
        "teacher_fill_seconds": fill["seconds"],
        "blocks": sorted(reports, key=lambda r: r["layer"]),
    }
    return loaded, report


def distill_blocks_to(
    model_dir: str, data: str, out: Path, cfg: BlockDistillConfig, online: bool = False, log=print, overwrite=False
) -> tuple[Path, dict]:
    """BLD of the model dir ``model_dir`` on calibration ``data``, written as the nasprune model dir ``out``
    (``OUT.blocks/`` keeps the teacher activations, reused by a rerun on the same tokens). Shared by
    ``nasprune distill-blocks`` and the ``blocks:`` stage of ``nasprune compress``."""
    from compressor.core.outputs import claim_output, mark_output
    from compressor.elastic.modeldir import ModelMeta, load_model, save_model_dir
    from compressor.recovery.repair import RepairConfig, calibration_windows

    out = Path(out)
    claim_output(out, "model", overwrite=overwrite)
    work = out.parent / f"{out.name}.blocks"
    claim_output(work, "training", resume=True)
    loaded = load_model(model_dir, online=online)
    if loaded.path is None or loaded.tokenizer is None:
        raise NaspruneError(f"block distillation needs a local model dir with a tokenizer (got {model_dir})")
    windows = calibration_windows(loaded.tokenizer, data, RepairConfig(tokens=cfg.tokens, seq_len=cfg.seq_len), online)
    work.mkdir(parents=True, exist_ok=True)
    mark_output(work, "training")  # a rerun (--overwrite) reuses its cached teacher activations
    trained, report = distill_blocks(str(loaded.path), windows, work, cfg, log=log)
    meta = ModelMeta(
        **{
            **asdict(loaded.meta),
            "provenance": {**loaded.meta.provenance, "block_distillation": {"data": data, **report}},
            "block_scores": None,  # measured on the weights before BLD: stale now
        }
    )
    meta.provenance.pop("created_at", None)
    return save_model_dir(trained.model, loaded.tokenizer, meta, out, overwrite=overwrite), report
