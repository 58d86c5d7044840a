"""The super-network: one Hugging Face causal LM whose weights are shared by every sub-network.

``SuperNetwork`` keeps the HF model as the owner of the parameters (so saving, peft and
permutation act on ordinary modules) and runs its own forward on *views* of those weights:
``W[:rows, :cols]`` slices, no per-forward copies. Norms are computed over the kept channels
(RMS over k channels is not RMS over d, so masking would be wrong). The active sub-network is
explicit state on this one object (``select``), never a global, so a fixed sub-network can be
``torch.compile``d.
"""

from __future__ import annotations

import contextlib

import torch

from compressor.elastic.architectures import family_for
from compressor.elastic.family import Family
from compressor.elastic.layout import ActiveShape
from compressor.elastic.search_space import SearchSpace, SearchSpaceConfig, SubNetwork


class SuperNetwork(torch.nn.Module):
    def __init__(self, model, space_config: SearchSpaceConfig | None = None, layer_ranking: list[int] | None = None):
        super().__init__()
        self.model = model
        self.family: Family = family_for(model.config)
        self.space = SearchSpace.from_model(self.family, model, space_config, layer_ranking)
        self._active = self.space.largest()
        self._shape = self._shape_of(self._active)
        self._layers = self.space.kept_layers(self._active)
        self.gradient_checkpointing = False

    @property
    def config(self):
        return self.model.config

    @property
    def active(self) -> SubNetwork:
        return self._active

    def _shape_of(self, sub: SubNetwork) -> ActiveShape:
        return ActiveShape(sub.embed_dim, sub.num_heads, self.space.num_kv_heads(sub), sub.ffn_dim)

    def select(self, sub: SubNetwork) -> SubNetwork:
        """Make ``sub`` the sub-network that ``forward`` runs (validated against the space)."""
        self.space.validate(sub)
        self._active, self._shape, self._layers = sub, self._shape_of(sub), self.space.kept_layers(sub)
        return sub

    @contextlib.contextmanager
    def selected(self, sub: SubNetwork):
        previous = self._active
        self.select(sub)
        try:
            yield self
        finally:
            self.select(previous)

    def _embed(self, input_ids):
        x = self.family.embed(self.model, input_ids, self._shape)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        return x, self.family.rotary(self.model)(x, positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        layers: list[int] | None = None,
        states: list | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of the active sub-network.

        ``layers`` overrides which blocks run (e.g. to measure the loss with one block dropped).
        ``states``: a list that receives the residual stream after every block that runs (with its
        graph: intermediate-state distillation trains on them).
        """
        s, fam = self._shape, self.family
        x, cos_sin = self._embed(input_ids)
        blocks = fam.layers(self.model)
        for i in self._layers if layers is None else layers:
            if self.training and self.gradient_checkpointing:
                x = torch.utils.checkpoint.checkpoint(
                    fam.block, blocks[i], x, cos_sin, attention_mask, s, use_reentrant=False
                )
            else:
                x = fam.block(blocks[i], x, cos_sin, attention_mask, s)
            if states is not None:
                states.append(x)
        return fam.head(self.model, x, s)

    def block_io(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(input, output) hidden states of every active block, for block-influence scoring."""
        x, cos_sin = self._embed(input_ids)
        blocks = self.family.layers(self.model)
        for i in self._layers:
            y = self.family.block(blocks[i], x, cos_sin, attention_mask, self._shape)
            yield x, y
            x = y
