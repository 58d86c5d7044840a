"""The model surgery of LoRA training: untie the LM head, wrap the linears, merge back.

peft holds the adapters' config, persistence and merge; the super-network forward slices them
(:func:`compressor.elastic.ops.elastic_linear`), so these helpers only change which parameters
exist and are trained, never the function the model computes at the start of a run.
"""

from __future__ import annotations

import torch

from compressor.recovery.train_config import TrainConfig


def untie_lm_head(model) -> None:
    """Give lm_head its own copy of the embedding so adapting it cannot change the embedding."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(emb.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}


def add_lora(model, cfg: TrainConfig) -> list[str]:
    """Wrap every linear in a peft LoRA layer (lm_head only when untied). Returns the targets."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if getattr(model.config, "tie_word_embeddings", False):
        names -= {"lm_head", "embed_out"}
    targets = sorted(names)
    get_peft_model(
        model,
        LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none"
        ),
    )
    return targets


def merge_lora(model):
    """Fold adapters into the base weights; returns the plain HF model."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, child = name.rsplit(".", 1) if "." in name else ("", name)
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
