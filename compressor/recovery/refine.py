"""Refine: distil one chosen sub-network on its own from the unpruned original, before export.

Why: the super-network's weights are a compromise shared by every sub-network, and rankings
flip after a short distillation of each candidate (Model-Optimizer's Minitron-vs-Puzzletron
study), so each Pareto point that will ship gets a short budget of its own. The student is the
extracted sub-network (optionally repaired in closed form first, :mod:`compressor.recovery.repair`); the
teacher is the *original* model (the parent's largest sub-network), through the same cached
top-k logits as super-network distillation (:class:`compressor.recovery.distill.TeacherCache`): on the
same data the teacher's forward is paid once for every refined point and for the sandwich run.

Layout: ``OUT.student/`` holds the extracted (repaired) starting point, ``OUT.train/`` the
resumable training work dir, ``OUT/`` the refined nasprune model dir (plain HF checkpoint) with
the refine record (budget, quality before and after) in ``nasprune.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SubNetwork


@dataclass
class RefineConfig:
    """Every setting of a refine: the one definition that ``nasprune refine``'s option defaults, the
    YAML ``refine:`` section of ``nasprune compress`` and the library read. The defaults are what the
    compress benchmarks measured (3 minutes a point at 2 x 256 tokens a step, lr 2e-4)."""

    minutes: float = 3.0  # training-time budget (the run stops at the first of minutes / steps)
    steps: int = 100_000
    batch_size: int = 2
    seq_len: int = 256
    lr: float = 2e-4
    warmup_steps: int = 2
    distill_alpha: float = 1.0  # pure logit KD (Minitron: no LM loss needed); 0: plain cross-entropy, no teacher
    distill_topk: int = 64
    distill_temperature: float = 1.0
    repair: bool = True  # closed-form repair of the student before training
    repair_tokens: int = 4096
    eval_tokens: int = 4096  # validation tokens for the before/after quality
    seed: int = 0
    # quantization-aware refine: train with the recipe the point ships in simulated (straight-through);
    # None: float training (the pipeline sets the precision the search chose for the point)
    quantization: str | None = None
    # weight of intermediate-state distillation (compressor.recovery.distill_states; runs the parent's blocks live
    # every step); 0: logit KD only
    distill_states: float = 0.0
    # block-local distillation of the chosen sub-network after repair (compressor.recovery.bld.distill_chosen_blocks):
    # optimizer steps per block on teacher-forced windows of the training data; its time comes out of
    # ``minutes``. 0: off
    block_steps: int = 0
    block_lr: float = 1e-4
    block_tokens: int = 8192

    def __post_init__(self):
        if not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise NaspruneError(f"refine minutes must be > 0 (got {self.minutes})")
        if isinstance(self.block_steps, bool) or not isinstance(self.block_steps, int) or self.block_steps < 0:
            raise NaspruneError(f"refine block_steps must be an integer >= 0 (got {self.block_steps})")
        if not (isinstance(self.block_lr, (int, float)) and math.isfinite(self.block_lr) and self.block_lr > 0):
            raise NaspruneError(f"refine block_lr must be > 0 (got {self.block_lr})")
        for name in ("steps", "batch_size", "seq_len", "repair_tokens", "eval_tokens", "block_tokens"):
            if int(getattr(self, name)) < 1:
                raise NaspruneError(f"refine {name} must be >= 1 (got {getattr(self, name)})")
        if not (isinstance(self.distill_alpha, (int, float)) and 0.0 <= self.distill_alpha <= 1.0):
            raise NaspruneError(f"refine distill_alpha must be in [0, 1] (got {self.distill_alpha})")
        ok = isinstance(self.distill_states, (int, float)) and not isinstance(self.distill_states, bool)
        if not (ok and math.isfinite(self.distill_states) and self.distill_states >= 0):
            raise NaspruneError(f"refine distill_states must be a number >= 0 (got {self.distill_states})")
        if self.quantization is not None:
            self.train_config()  # refuses a recipe QAT cannot simulate, in one line, before any model loads

    @staticmethod
    def from_dict(d: dict | None) -> RefineConfig:
        """The config of the settings ``d`` (YAML or JSON); unknown keys are refused in one line."""
        from dataclasses import fields

        d = dict(d or {})
        known = {f.name for f in fields(RefineConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NaspruneError(f"unknown refine settings {unknown}; known: {sorted(known)}")
        return RefineConfig(**d)

    @property
    def distills(self) -> bool:
        """False for pure cross-entropy (``distill_alpha`` 0): then no teacher is run, cached or paid for."""
        return self.distill_alpha > 0

    def train_config(self):
        from compressor.recovery.train import TrainConfig

        # steps bound the cosine schedule; the time budget usually stops the run first
        return TrainConfig(
            strategy="standard",
            steps=self.steps,
            max_minutes=self.minutes,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            distill="logits" if self.distills else "none",
            teacher="original",
            distill_alpha=self.distill_alpha if self.distills else 1.0,
            distill_topk=self.distill_topk,
            distill_temperature=self.distill_temperature,
            seed=self.seed,
            checkpoint_every=max(1, min(50, self.steps)),
            quantization=self.quantization,
            distill_states=self.distill_states if self.distills else 0.0,
        )


def qat_recipe(precision: str | None, quantization_aware: bool = True) -> str | None:
    """The recipe a point that ships at ``precision`` is refined with simulated (quantization-aware), or
    None (float training): dynamic and weight-only recipes train with it; float precisions, and static
    recipes (calibrated on the refined weights at export), train in float. ``compress``'s refine stage
    decides with this function, per point, from the precision the search chose."""
    from compressor.core.precisions import is_quantized, needs_calibration

    if not quantization_aware or not precision or not is_quantized(precision) or needs_calibration(precision):
        return None
    return precision


def time_step(model, cfg: RefineConfig, vocab: int) -> float:
    """Seconds of one training step of ``model`` (forward, log-softmax over the vocabulary, backward) on a
    ``batch_size x seq_len`` batch; the second of two (the first pays one-off allocation). The model's
    weights are not changed (no optimizer step)."""
    import torch

    ids = _random_batch(cfg, vocab)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)  # each backward allocates its grads anew, as in training

    model.train()
    try:
        seconds = _second_of_two(step)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return seconds


def time_teacher_window(teacher_loaded, cfg: RefineConfig) -> float:
    """Seconds per window of what the teacher cache runs on a window it has not cached yet: the teacher's
    forward and its top-k targets (:meth:`compressor.recovery.distill.TeacherCache.ensure`); the second of two."""
    import torch

    from compressor.recovery.distill import topk_targets

    teacher = teacher_loaded.supernet().eval()
    ids = _random_batch(cfg, teacher_loaded.model.config.vocab_size)
    with torch.no_grad():
        seconds = _second_of_two(lambda: topk_targets(teacher(ids, None), cfg.distill_topk, cfg.distill_temperature))
    return seconds / cfg.batch_size


def time_state_teacher(teacher_loaded, cfg: RefineConfig) -> float:
    """Seconds of the parent's blocks on one ``batch_size x seq_len`` batch (what intermediate-state
    distillation adds to every step); the second of two. Every block runs: the last one is wanted."""
    from compressor.recovery.distill_states import teacher_states

    teacher = teacher_loaded.supernet().eval()
    ids = _random_batch(cfg, teacher_loaded.model.config.vocab_size)
    last = [teacher_loaded.model.config.num_hidden_layers - 1]
    return _second_of_two(lambda: teacher_states(teacher, ids, None, last))


def _random_batch(cfg: RefineConfig, vocab: int):
    import torch

    return torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=torch.Generator().manual_seed(cfg.seed))


def _second_of_two(run) -> float:
    """Seconds of the second of two calls of ``run`` (the first pays one-off allocation)."""
    import time

    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return seconds[-1]


def planned_steps(
    cfg: RefineConfig,
    step_seconds: float,
    margin: float = 1.25,
    window_seconds: float = 0.0,
    missing=None,
) -> int:
    """The step count the ``minutes`` budget affords at ``step_seconds`` a step (plus a margin, since the
    budget, not the count, should end the run), capped by ``cfg.steps``. It bounds the cosine schedule
    (which then actually decays within the budget) and the windows whose teacher logits are cached:
    with the cap alone (100,000) every refine filled the teacher cache for the whole training text.

    ``missing(steps)`` (windows those steps read whose teacher targets are not cached yet) x
    ``window_seconds`` is paid from the same budget: the fill runs before training, and with a cheap
    student it cost more than the training itself (the demo's 22M point: 192 s of teacher fill, then
    181 s of its 3-minute training)."""
    budget = cfg.minutes * 60
    if missing is None or window_seconds <= 0:
        return max(1, min(cfg.steps, math.ceil(budget / max(step_seconds, 1e-6) * margin)))

    def cost(steps: int) -> float:
        return steps / margin * step_seconds + missing(steps) * window_seconds

    lo, hi = 1, cfg.steps  # missing() grows with steps (a prefix of one permutation): bisect the largest fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def missing_teacher_windows(teacher_loaded, data: str, train_cfg, teacher_cache_dir: Path | None, online: bool):
    """``steps -> windows`` the training run would still have to run the teacher on, read from the same
    cache (same key) that :func:`compressor.recovery.train.run_training` will fill."""
    from dataclasses import replace

    from compressor.core.data import load_data
    from compressor.elastic.modeldir import cache_dir
    from compressor.recovery.distill import TeacherCache, state_dict_hash
    from compressor.recovery.train_config import resolve_mixed_precision, windows_needed

    tokens = load_data(
        teacher_loaded.tokenizer, data, train_cfg.seq_len, train_cfg.max_train_tokens, online, train_cfg.prompt_format
    )
    cache = TeacherCache(
        Path(teacher_cache_dir) if teacher_cache_dir else cache_dir() / "teacher",
        tokens.input_ids,
        tokens.attention_mask,
        state_dict_hash(teacher_loaded.model),
        k=train_cfg.distill_topk,
        temperature=train_cfg.distill_temperature,
        precision=resolve_mixed_precision(train_cfg),
    )
    done = cache.done_windows()
    return lambda steps: int((~done[windows_needed(replace(train_cfg, steps=steps), len(tokens))]).sum())


def _validation_ppl(model, tokenizer, text: str | None, cfg: RefineConfig) -> float | None:
    if text is None:
        return None
    from compressor.elastic.evaluate import hf_logits, perplexity, token_windows

    return perplexity(hf_logits(model.eval()), token_windows(tokenizer, text, cfg.seq_len, cfg.eval_tokens))


def _quantized_validation_ppl(supernet, tokenizer, text: str | None, cfg: RefineConfig) -> float | None:
    """Validation perplexity of ``supernet``'s selected sub-network with ``cfg.quantization`` simulated."""
    if text is None or cfg.quantization is None:
        return None
    import torch

    from compressor.elastic.evaluate import perplexity, token_windows
    from compressor.elastic.quant_sim import simulate

    windows = token_windows(tokenizer, text, cfg.seq_len, cfg.eval_tokens)
    with torch.no_grad(), simulate(cfg.quantization, supernet.model):
        return perplexity(supernet.eval(), windows)


def _distill_blocks(model, teacher_loaded, kept: list[int], data: str, cfg: RefineConfig, online: bool) -> dict:
    """Block-local distillation of the (repaired) extracted ``model`` in place, on windows of ``data``."""
    from compressor.recovery.bld import distill_chosen_blocks
    from compressor.recovery.repair import RepairConfig, calibration_windows

    windows = calibration_windows(
        teacher_loaded.tokenizer, data, RepairConfig(tokens=cfg.block_tokens, seq_len=cfg.seq_len), online
    )
    teacher = teacher_loaded.supernet().eval()
    return distill_chosen_blocks(model, teacher, kept, windows, cfg.block_steps, lr=cfg.block_lr, seed=cfg.seed)


def _after_blocks(cfg: RefineConfig, record: dict) -> RefineConfig:
    """``cfg`` with the minutes block-local distillation already spent taken off the training budget."""
    from dataclasses import replace

    spent = float((record.get("block_distillation") or {}).get("seconds") or 0.0) / 60
    return replace(cfg, minutes=max(cfg.minutes * 0.1, cfg.minutes - spent)) if spent else cfg


def refine(
    parent: str,
    sub: SubNetwork,
    data: str,
    out: Path,
    cfg: RefineConfig | None = None,
    validation: str | None = None,
    online: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    teacher_cache_dir: Path | None = None,
    teacher: str | None = None,
) -> dict:
    """Extract ``sub`` from the model dir ``parent``, repair it, distil it for ``cfg.minutes`` on ``data``
    from ``teacher`` (default: ``parent``'s largest sub-network; the pipeline passes the permuted
    original when ``parent`` is the trained super-network), write ``out``; returns the refine record."""
    import json

    from compressor.core.outputs import claim_output
    from compressor.elastic.modeldir import load_model, write_json_atomic
    from compressor.recovery.train import run_training

    cfg = cfg or RefineConfig()
    out = Path(out)
    student_dir = out.parent / f"{out.name}.student"
    claim_output(out, "model", overwrite=overwrite or resume)
    parent_loaded = load_model(parent, online=online)
    teacher = teacher or parent
    teacher_loaded = parent_loaded if teacher == parent else load_model(teacher, online=online)
    sn = parent_loaded.supernet()
    sn.space.validate(sub)
    val_text = _validation_text(validation, online)
    record: dict = {
        "arch": sub.to_dict(),
        "parent": str(parent),
        "teacher": str(teacher),
        "data": str(data),
        "validation": validation,
        "config": asdict(cfg),
    }
    if not (resume and (student_dir / "nasprune.json").exists()):
        start = _Start(parent_loaded, teacher_loaded, sn, sub, data, val_text, cfg, online, log)
        record = start.student(record, student_dir, teacher_cache_dir)
        write_json_atomic(student_dir / "refine_start.json", record)
    else:
        record = json.loads((student_dir / "refine_start.json").read_text())
        log(f"resuming the refine of {sub} from {student_dir}")
    train_cfg = _planned_train_config(cfg, record)
    del sn, parent_loaded  # only the teacher is needed from here on
    run_training(
        str(student_dir),
        data,
        out,
        train_cfg,
        resume=resume,
        online=online,
        log=log,
        overwrite=overwrite,
        # loaded once: the one repair used (run_training would load it again); none for cross-entropy
        teacher=teacher_loaded if cfg.distills else None,
        teacher_cache_dir=teacher_cache_dir,
    )
    del teacher_loaded
    return _finish(out, student_dir, val_text, cfg, record)


def _validation_text(validation: str | None, online: bool) -> str | None:
    if validation is None:
        return None
    from compressor.core.data import read_source, resolve_data

    kind, text = read_source(resolve_data(validation), online)
    if kind != "text":
        raise NaspruneError(f"refine validation data {validation} must be plain text (.txt)")
    return text


class _Start:
    """The start of a refine: the one-shot student, its repair and block-local distillation, each with
    its validation perplexity, saved as ``OUT.student``; then the step plan for the budget."""

    def __init__(self, parent_loaded, teacher_loaded, sn, sub, data, val_text, cfg: RefineConfig, online, log):
        self.parent, self.teacher, self.sn, self.sub = parent_loaded, teacher_loaded, sn, sub
        self.data, self.val_text, self.cfg, self.online, self.log = data, val_text, cfg, online, log

    def ppl(self, model) -> float | None:
        return _validation_ppl(model, self.parent.tokenizer, self.val_text, self.cfg)

    def student(self, record: dict, student_dir: Path, teacher_cache_dir: Path | None) -> dict:
        from compressor.elastic.extract import extract, save_extracted

        cfg, sn, sub = self.cfg, self.sn, self.sub
        plain = extract(sn, sub)
        record["ppl_one_shot"] = self.ppl(plain)
        if cfg.quantization is not None:
            with sn.selected(sub):
                record["ppl_one_shot_quantized"] = _quantized_validation_ppl(
                    sn, self.parent.tokenizer, self.val_text, cfg
                )
        model, repair = self.repaired(plain, record) if cfg.repair else (plain, None)
        if cfg.block_steps > 0:
            kept = sn.space.kept_layers(sub)
            record["block_distillation"] = _distill_blocks(model, self.teacher, kept, self.data, cfg, self.online)
            record["ppl_blocks"] = self.ppl(model)
            self.log(
                f"  block-local distillation: {cfg.block_steps} steps x {len(kept)} blocks in "
                f"{record['block_distillation']['seconds']:.0f} s"
            )
        save_extracted(self.parent, sn, sub, student_dir, overwrite=True, model=model, repair=repair)
        self.plan(model, record, teacher_cache_dir)
        return record

    def repaired(self, plain, record: dict):
        """The closed-form repaired student and its repair record (targets from the teacher)."""
        from compressor.recovery.repair import RepairConfig, calibration_windows, repair_model

        repair_start = time.perf_counter()
        rcfg = RepairConfig(tokens=self.cfg.repair_tokens, seq_len=self.cfg.seq_len)
        windows = calibration_windows(self.parent.tokenizer, self.data, rcfg, self.online)
        model, report = repair_model(
            self.parent,
            self.sub,
            windows,
            rcfg,
            log=self.log,
            teacher_loaded=None if self.teacher is self.parent else self.teacher,
        )
        record["repair_seconds"] = time.perf_counter() - repair_start
        record["ppl_repaired"] = self.ppl(model)
        return model, {"data": str(self.data), **report.summary()}

    def plan(self, model, record: dict, teacher_cache_dir: Path | None) -> None:
        """Time one step (and the teacher's work per new window); the steps the budget affords."""
        cfg, teacher = self.cfg, self.teacher
        record["step_seconds_timed"] = time_step(model, cfg, model.config.vocab_size)
        if cfg.distills and cfg.distill_states > 0:  # the parent's blocks run live every step
            record["state_teacher_seconds_timed"] = time_state_teacher(teacher, cfg)
            record["step_seconds_timed"] += record["state_teacher_seconds_timed"]
        if cfg.distills:
            record["teacher_window_seconds_timed"] = time_teacher_window(teacher, cfg)
            missing = missing_teacher_windows(teacher, self.data, cfg.train_config(), teacher_cache_dir, self.online)
        else:
            record["teacher_window_seconds_timed"], missing = 0.0, lambda steps: 0
        steps = planned_steps(
            _after_blocks(cfg, record),
            record["step_seconds_timed"],
            window_seconds=record["teacher_window_seconds_timed"],
            missing=missing,
        )
        record["steps_planned"] = steps
        record["teacher_fill_planned_seconds"] = missing(steps) * record["teacher_window_seconds_timed"]
        self.log(
            f"  one step {record['step_seconds_timed']:.2f}s, teacher {record['teacher_window_seconds_timed']:.2f}s "
            f"per new window: {steps} steps planned for {cfg.minutes:g} min "
            f"(~{record['teacher_fill_planned_seconds']:.0f} s of it filling the teacher cache)"
        )


def _planned_train_config(cfg: RefineConfig, record: dict):
    """The training config of the plan in ``record`` (a resumed run keeps the plan it started with); the
    teacher fill comes out of the same budget (the training clock starts after it)."""
    from dataclasses import replace

    steps = int(record.get("steps_planned") or cfg.steps)
    train_cfg = cfg.train_config()
    fill_minutes = float(record.get("teacher_fill_planned_seconds") or 0.0) / 60
    budget = _after_blocks(cfg, record).minutes
    return replace(
        train_cfg,
        steps=steps,
        checkpoint_every=max(1, min(train_cfg.checkpoint_every, steps)),
        max_minutes=max(cfg.minutes * 0.1, budget - fill_minutes),
    )


def _finish(out: Path, student_dir: Path, val_text: str | None, cfg: RefineConfig, record: dict) -> dict:
    """Quality of the refined model at ``out``; the refine record written into its ``nasprune.json``."""
    from compressor.elastic.modeldir import ModelMeta, load_model, write_json_atomic

    refined = load_model(str(out))
    record["ppl_refined"] = _validation_ppl(refined.model, refined.tokenizer, val_text, cfg)
    if cfg.quantization is not None:
        record["ppl_refined_quantized"] = _quantized_validation_ppl(
            refined.supernet(), refined.tokenizer, val_text, cfg
        )
    record["training"] = {k: refined.meta.provenance.get("training", {}).get(k) for k in ("steps", "seconds", "tokens")}
    meta = ModelMeta.read(out)
    meta.subnetwork = {**(ModelMeta.read(student_dir).subnetwork or {}), "refine": record}
    write_json_atomic(out / "nasprune.json", asdict(meta))
    return record
