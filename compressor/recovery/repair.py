"""Closed-form repair of an extracted sub-network: no training, one calibration pass.

Pruning removes heads, FFN neurons, embedding channels and layers; what the removed parts
contributed to the residual stream is lost. Two classic closed-form fixes, applied to each kept
block's two output projections (attention ``o_proj``, FFN ``down_proj``):

* **bias compensation** (FLAP, CASIA-IVA-Lab/FLAP ``lib/prune.py``): the calibration mean of what
  the removed channels wrote becomes a bias of the output projection;
* **ridge refit** (LIAR-style least squares; regularized because plain least squares overfits
  small calibration sets, as RCPU reports): the kept weights ``W`` (and the bias) are refitted so
  that, on the *pruned* model's own inputs ``X``, the projection reproduces the *original*
  model's output ``Y`` on the kept channels::

      min_W,b ||Y - X W^T - b||^2 + lam * s * ||W - W0||^2,   s = trace(Xc^T Xc) / d_in

  solved per projection in float64 from centred second moments. ``lam`` is chosen per projection
  on held-out calibration tokens among a grid, and "keep W0" and "bias only" are candidates too,
  so repair never makes a projection's held-out reconstruction worse than the candidates it had.

Why sequential in one pass: the whole calibration set runs as one batch through the student, and a
forward pre-hook refits each projection when the pass reaches it, so every projection is fitted on
inputs produced by the already-repaired projections before it (what it will see at inference).
The teacher's targets come from one pass of the original model (hooks on the same projections).

A model that gains biases needs a config that declares them: Llama's ``attention_bias`` /
``mlp_bias`` can; Mistral, Qwen2 and Phi-3 configs cannot, so there repair refits weights only
(``bias`` is reported as False). Zero biases added for q/k/v/gate/up by those flags are exact.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from compressor.core.data import calibration_windows as token_calibration_windows
from compressor.core.errors import NaspruneError
from compressor.elastic.search_space import SubNetwork

#: family name -> (attention output projection, FFN output projection, the norm that reads the
#: post-attention residual), relative to a decoder layer
TARGETS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"),
    # Qwen3: Llama's residual layout (its q/k norms sit before attention, untouched by the refit); its
    # config declares attention_bias but no mlp_bias, so it is refit-only. Gemma 2/3 and OLMo 2 normalize
    # each projection's output before the residual add (post-norms), so the residual target of
    # down_proj is not a linear function of its weights there: not supported.
    "qwen3": ("self_attn.o_proj", "mlp.down_proj", "post_attention_layernorm"),
}


@dataclass
class RepairConfig:
    tokens: int = 4096  # calibration tokens (one batch; activations of one pass stay in memory)
    seq_len: int = 256
    lambdas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    holdout: float = 0.25  # share of calibration tokens that choose lambda
    bias: bool = True  # bias compensation where the family's config can declare biases
    refit: bool = True  # ridge refit of the kept weights (False: bias compensation only)
    # what down_proj is fitted to: "local" = the original layer's own FFN output; "residual" = whatever
    # makes the block's output residual equal the original's residual at the next *kept* layer, so a
    # block also absorbs the dropped layers after it and the drift accumulated before it
    target: str = "residual"

    def __post_init__(self):
        if self.tokens < 2 * self.seq_len:
            raise NaspruneError(
                f"repair needs at least two windows of calibration text (tokens {self.tokens} < "
                f"2 x seq_len {self.seq_len})"
            )
        if not 0 < self.holdout < 0.9:
            raise NaspruneError(f"repair holdout must be in (0, 0.9) (got {self.holdout})")
        if self.target not in ("local", "residual"):
            raise NaspruneError(f"repair target must be local or residual (got {self.target!r})")
        if any(lam <= 0 for lam in self.lambdas):
            raise NaspruneError("repair lambdas must be > 0")


@dataclass
class ProjectionReport:
    layer: int
    name: str
    choice: str
    rel_error_before: float  # held-out ||Y - f(X)||^2 / ||Y||^2 with the pruned weights
    rel_error_after: float
    fit_error_before: float  # the same on the tokens it was fitted on
    fit_error_after: float


@dataclass
class RepairReport:
    tokens: int
    seconds: float
    bias: bool
    config: dict
    projections: list[ProjectionReport] = field(default_factory=list)

    def summary(self) -> dict:
        p = self.projections
        mean = (lambda xs: sum(xs) / len(xs)) if p else (lambda xs: float("nan"))
        return {
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
            "bias": self.bias,
            "config": self.config,
            "projections": len(p),
            "mean_rel_error_before": mean([x.rel_error_before for x in p]),
            "mean_rel_error_after": mean([x.rel_error_after for x in p]),
            "choices": {c: sum(x.choice == c for x in p) for c in sorted({x.choice for x in p})},
        }


def _with_biases(model, family: str):
    """The same model with Llama's attention/MLP biases declared (zeros except what repair writes)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if not (hasattr(config, "attention_bias") and hasattr(config, "mlp_bias")):
        return model, False
    if config.attention_bias and config.mlp_bias:
        return model, True
    d = config.to_dict()
    d.update(attention_bias=True, mlp_bias=True)
    new = AutoModelForCausalLM.from_config(type(config).from_dict(d))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.endswith(".bias") for name in missing if name != "lm_head.weight"):
        raise NaspruneError(
            f"cannot add biases to this {family} checkpoint (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); run repair with bias disabled"
        )
    with torch.no_grad():
        for name in missing:
            if name.endswith(".bias"):
                new.get_parameter(name).zero_()
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = model.generation_config
    return new.eval(), True


def _base(model):
    """The decoder without the LM head: repair needs hidden states, not 49k-wide logits."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _rel(err: torch.Tensor, y: torch.Tensor) -> float:
    return float(err.pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))


def _fit(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, lam: float, with_bias: bool):
    """Ridge towards ``w0`` (float64). x: [N, d_in], y: [N, d_out]; returns (W, b)."""
    if with_bias:
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
    else:
        mx = my = None
        xc, yc = x, y - (b0 if b0 is not None else 0)
    gram = xc.T @ xc
    scale = lam * float(gram.diagonal().mean().clamp_min(1e-12))
    rhs = xc.T @ yc + scale * w0.T
    w = torch.linalg.solve(gram + scale * torch.eye(gram.shape[0], dtype=gram.dtype), rhs).T
    b = (my - mx @ w.T) if with_bias else b0
    return w, b


def _predict(x, w, b):
    return x @ w.T + (b if b is not None else 0)


def _choose(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor | None, cfg: RepairConfig, with_bias: bool
):
    """Pick keep / bias-only / ridge(lam) on held-out tokens; refit the choice on all tokens."""
    n = x.shape[0]
    cut = int(n * (1 - cfg.holdout))
    fit_x, fit_y, hold_x, hold_y = x[:cut], y[:cut], x[cut:], y[cut:]
    candidates = {"keep": lambda fx, fy: (w0, b0)}
    if with_bias:
        candidates["bias"] = lambda fx, fy: (w0, fy.mean(0) - fx.mean(0) @ w0.T)
    if cfg.refit:
        for lam in cfg.lambdas:
            candidates[f"ridge:{lam:g}"] = lambda fx, fy, lam=lam: _fit(fx, fy, w0, b0, lam, with_bias)
    scores = {}
    for name, make in candidates.items():
        w, b = make(fit_x, fit_y)
        scores[name] = _rel(hold_y - _predict(hold_x, w, b), hold_y)
    best = min(scores, key=scores.get)
    w, b = candidates[best](x, y)
    return best, w, b, scores["keep"], scores[best]


def calibration_windows(tokenizer, data: str, cfg: RepairConfig, online: bool = False) -> torch.Tensor:
    """Full windows ``[N, seq_len]`` of calibration tokens from a .txt or Alpaca .jsonl (rows joined as text):
    :func:`compressor.core.data.calibration_windows` sized by ``cfg`` (``cfg.tokens`` in windows of
    ``cfg.seq_len``, at least two); kept here for the repair callers (cli, refine, bld, benchmarks)."""
    return calibration_and_heldout(tokenizer, data, cfg, online, 0)[0]


def calibration_and_heldout(
    tokenizer, data: str, cfg: RepairConfig, online: bool = False, eval_tokens: int = 2048
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(calibration windows, held-out windows or None): the first ``cfg.tokens`` tokens of ``data``
    calibrate; the next ``eval_tokens`` (never fitted on) measure perplexity before/after repair
    when no separate validation text is given. None when ``data`` has no window left over."""
    windows = token_calibration_windows(tokenizer, data, cfg.seq_len, cfg.tokens + eval_tokens, online)
    n_cal = cfg.tokens // cfg.seq_len
    calib, heldout = windows[:n_cal], windows[n_cal:]
    if len(calib) < 2:
        raise NaspruneError(f"repair data {data} has fewer than two windows of {cfg.seq_len} tokens; give more text")
    return calib, (heldout if len(heldout) else None)


def check_repairable(parent_loaded) -> None:
    """Refuse (one line, before any long work) a family repair does not support."""
    family = parent_loaded.supernet().family.name
    if family not in TARGETS:
        raise NaspruneError(
            f"repair is not available for the {family} family yet (supported: {', '.join(TARGETS)}); "
            "export without repair"
        )


def repair_and_measure(
    parent_loaded,
    sub: SubNetwork,
    windows: torch.Tensor,
    cfg: RepairConfig,
    eval_windows: torch.Tensor | None,
    eval_source: str,
    data: str,
    log=None,
    teacher_loaded=None,
) -> tuple[object, dict]:
    """:func:`repair_model`, plus perplexity of the plain and the repaired extraction on ``eval_windows``
    (text never fitted on). Returns (repaired model, the record bundles and model dirs store)."""
    from compressor.elastic.evaluate import hf_logits, perplexity
    from compressor.elastic.extract import extract

    model, report = repair_model(parent_loaded, sub, windows, cfg, log=log, teacher_loaded=teacher_loaded)
    record: dict = {"applied": "at export", "data": str(data), **report.summary()}
    if eval_windows is None:
        record.update(ppl_before=None, ppl_after=None, ppl_on=f"not measured: {eval_source}")
        return model, record
    plain = extract(parent_loaded.supernet(), sub).eval()
    record["ppl_before"] = perplexity(hf_logits(plain), eval_windows)
    record["ppl_after"] = perplexity(hf_logits(model.eval()), eval_windows)
    record["ppl_on"] = f"{eval_source} ({eval_windows.numel():,} tokens, windows of {eval_windows.shape[1]})"
    if log:
        log(f"  perplexity {record['ppl_before']:.2f} -> {record['ppl_after']:.2f} after repair on {record['ppl_on']}")
    return model, record


def repair_model(
    parent_loaded,
    sub: SubNetwork,
    windows: torch.Tensor,
    cfg: RepairConfig | None = None,
    log=None,
    teacher_loaded=None,
):
    """Extract ``sub`` from ``parent_loaded`` and repair it on calibration ``windows`` ([N, T] token ids).

    ``teacher_loaded``: the model whose outputs are the targets (default: the parent itself; the
    pipeline passes the original when the parent is a trained super-network with the same permutation).

    Returns (model, :class:`RepairReport`). The model is a plain HF model (biases declared in its
    config where added) that :func:`compressor.elastic.modeldir.save_model_dir` writes like any other."""
    cfg = cfg or RepairConfig()
    start = time.perf_counter()
    sn, kept, student, with_bias, teacher = _student_and_teacher(parent_loaded, sub, cfg, teacher_loaded)
    layout = TARGETS[sn.family.name]
    targets = _teacher_targets(sn.family, teacher, kept, layout, sub.embed_dim, cfg, windows)
    report = RepairReport(tokens=int(windows.numel()), seconds=0.0, bias=with_bias, config=asdict(cfg))
    _refit_student(sn.family, student, kept, layout, targets, cfg, with_bias, windows, report)
    report.seconds = time.perf_counter() - start
    if log:
        s = report.summary()
        log(
            f"repaired {sub}: {s['projections']} projections on {s['tokens']:,} tokens in {s['seconds']}s, held-out "
            f"reconstruction error {s['mean_rel_error_before']:.4f} -> {s['mean_rel_error_after']:.4f} ({s['choices']})"
        )
    return student.eval(), report


def _student_and_teacher(parent_loaded, sub: SubNetwork, cfg: RepairConfig, teacher_loaded):
    """(super-network, kept parent layers, extracted student with biases declared where ``cfg.bias`` and its
    config allow, whether it has them, teacher model); refuses an unsupported family or a misfit teacher."""
    from compressor.elastic.extract import extract

    sn = parent_loaded.supernet()
    family = sn.family.name
    if family not in TARGETS:
        raise NaspruneError(
            f"repair is not available for the {family} family yet (supported: {', '.join(TARGETS)}); "
            "extract without repair"
        )
    sn.space.validate(sub)
    kept = sn.space.kept_layers(sub)
    student = extract(sn, sub)
    with_bias = False
    if cfg.bias:
        student, with_bias = _with_biases(student, family)
    teacher = (teacher_loaded or parent_loaded).model.eval()
    if teacher_loaded is not None and teacher_loaded.model.config.hidden_size != parent_loaded.model.config.hidden_size:
        raise NaspruneError("the repair teacher must have the parent's shape (the original of the same super-network)")
    return sn, kept, student, with_bias, teacher


@dataclass
class _TeacherTargets:
    """What one teacher pass records for the refit.

    ``outputs``: each kept layer's projection outputs on the kept residual channels, keyed
    (student layer, projection name); ``residual`` (target "residual"): the residual stream entering
    every teacher layer (+ after the last, key ``len(layers)``); ``next_kept``: per student layer, the
    teacher residual its block output must equal (the one entering the next kept layer)."""

    outputs: dict[tuple[int, str], torch.Tensor]
    residual: dict[int, torch.Tensor]
    next_kept: dict[int, int]


def _forward_hooked(model, windows: torch.Tensor, hooks: list) -> None:
    """One pass of the decoder over ``windows`` with ``hooks`` registered; removes them whatever happens."""
    try:
        with torch.no_grad():
            _base(model)(input_ids=windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def _teacher_targets(family, teacher, kept: list[int], layout, k_e: int, cfg: RepairConfig, windows) -> _TeacherTargets:
    """Hooks on the teacher's projections (and layers, for the residual target), one pass over ``windows``."""
    attn_out, ffn_out, _ = layout
    out = _TeacherTargets({}, {}, {})
    hooks = []
    t_layers = family.layers(teacher)

    def keep(y):
        return y[..., :k_e].reshape(-1, k_e).float()

    for new, old in enumerate(kept):
        for name in (attn_out, ffn_out):
            module = t_layers[old].get_submodule(name)
            hooks.append(
                module.register_forward_hook(lambda m, inp, y, key=(new, name): out.outputs.__setitem__(key, keep(y)))
            )
    if cfg.target == "residual":
        for j, layer in enumerate(t_layers):
            hooks.append(
                layer.register_forward_pre_hook(
                    lambda m, args, kwargs, j=j: out.residual.__setitem__(
                        j, keep(args[0] if args else kwargs["hidden_states"])
                    ),
                    with_kwargs=True,
                )
            )
        last = len(t_layers)
        hooks.append(
            t_layers[-1].register_forward_hook(
                lambda m, inp, y: out.residual.__setitem__(last, keep(y[0] if isinstance(y, tuple) else y))
            )
        )
        out.next_kept = {new: (kept[new + 1] if new + 1 < len(kept) else last) for new in range(len(kept))}
    _forward_hooked(teacher, windows, hooks)
    return out


def _refit_student(
    family, student, kept: list[int], layout, teacher: _TeacherTargets, cfg: RepairConfig, with_bias, windows, report
) -> None:
    """Refit each projection of ``student`` when one pass reaches it (its inputs come from the already
    repaired projections before it), appending a :class:`ProjectionReport` per projection to ``report``."""
    attn_out, ffn_out, mid_norm = layout
    s_layers = family.layers(student)
    mid: dict[int, torch.Tensor] = {}

    def refit(module, args, key):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        y = teacher.outputs.pop(key).double()
        if cfg.target == "residual" and key[1] == ffn_out:
            # the FFN output that makes this block's output = the original's residual at the next kept layer
            y = teacher.residual[teacher.next_kept[key[0]]].double() - mid.pop(key[0])
        w0 = module.weight.detach().double()
        b0 = module.bias.detach().double() if module.bias is not None else None
        choice, w, b, before, after = _choose(x, y, w0, b0, cfg, with_bias and module.bias is not None)
        fit_before = _rel(y - _predict(x, w0, b0), y)
        fit_after = _rel(y - _predict(x, w, b), y)
        with torch.no_grad():
            module.weight.copy_(w.to(module.weight.dtype))
            if module.bias is not None and b is not None:
                module.bias.copy_(b.to(module.bias.dtype))
        report.projections.append(ProjectionReport(kept[key[0]], key[1], choice, before, after, fit_before, fit_after))

    hooks = [
        s_layers[new]
        .get_submodule(name)
        .register_forward_pre_hook(lambda m, args, key=(new, name): refit(m, args, key))
        for new in range(len(kept))
        for name in (attn_out, ffn_out)
    ]
    if cfg.target == "residual":  # the student's residual after attention, before the FFN adds to it
        hooks += [
            s_layers[new]
            .get_submodule(mid_norm)
            .register_forward_pre_hook(
                lambda m, args, new=new: mid.__setitem__(new, args[0].reshape(-1, args[0].shape[-1]).double())
            )
            for new in range(len(kept))
        ]
    _forward_hooked(student, windows, hooks)
