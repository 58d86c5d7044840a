import torch

from compressor.core.data import TokenizedData
from compressor.elastic.importance import compute_importance, layer_ranking, permute
from compressor.elastic.supernet import SuperNetwork
from tests.conftest import TINY_SPACE, make_tiny


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (6, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    return TokenizedData(ids, ids.clone(), mask, "text", "random")


def test_permutation_preserves_logits_and_sorts_scores(tiny_family):
    model = make_tiny(tiny_family)
    sn = SuperNetwork(model, TINY_SPACE)
    data = _data()
    with torch.no_grad():
        before = model(data.input_ids).logits
    scores = compute_importance(sn, data, progress=False)
    permuted = permute(sn, scores)
    with torch.no_grad():
        after = model(data.input_ids).logits
    assert (before - after).abs().max().item() <= 1e-4
    assert torch.all(permuted.embed[:-1] >= permuted.embed[1:])
    for f in permuted.ffn:
        assert torch.all(f[:-1] >= f[1:])
    q = sn.family.dims.q_per_group
    for h in permuted.heads:  # KV groups sorted by summed score, heads sorted inside each group
        groups = h.view(-1, q)
        assert torch.all(groups.sum(1)[:-1] >= groups.sum(1)[1:])
        assert torch.all(groups[:, :-1] >= groups[:, 1:])
    assert sorted(layer_ranking(scores)) == list(range(4))


def test_importance_first_k_beats_naive_first_k_on_a_structured_model():
    """Plant unimportant FFN neurons first: importance must move them to the end."""
    model = make_tiny("llama-gqa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :48] = 0  # the first half of the neurons contributes nothing
            layer.mlp.up_proj.weight[:48] *= 0.01
    sn = SuperNetwork(model, TINY_SPACE)
    data = _data()
    full = sn(data.input_ids).detach()
    half = sn.space.largest().__class__(64, 4, 48, 4)

    def err():
        with sn.selected(half), torch.no_grad():
            return (sn(data.input_ids) - full).abs().mean().item()

    naive = err()
    permute(sn, compute_importance(sn, data, progress=False))
    assert err() < naive / 10


def test_block_influence_metric_runs_and_ranks_all_layers():
    sn = SuperNetwork(make_tiny("phi3"), TINY_SPACE)
    scores = compute_importance(sn, _data(), layer_metric="block-influence", progress=False)
    assert scores.layers.shape == (4,) and torch.isfinite(scores.layers).all()
