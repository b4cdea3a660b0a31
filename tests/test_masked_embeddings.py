"""Padded sets in the point embeddings: a masked set gives what the set gives alone.

Farthest-point sampling, nearest neighbours, the set abstraction and the EdgeConv embedding
take ``mask`` (``(B, N)`` bool, True for real points), so that the ModelNet recipe's model
classifies sets of different sizes padded into one batch.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pointsink import SetSinkformer
from pointsink.embedding import (
    EdgeConvEmbedding,
    SetAbstraction,
    farthest_point_sampling,
    knn_indices,
    masked_mean,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _scattered(clouds: list[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clouds at random places of a NaN-padded ``(B, size, C)`` batch, and its mask."""
    batch = torch.full((len(clouds), size, clouds[0].shape[1]), float("nan"), dtype=torch.float64)
    mask = torch.zeros(len(clouds), size, dtype=torch.bool)
    for index, cloud in enumerate(clouds):
        places = torch.randperm(size)[: len(cloud)].sort().values
        batch[index, places] = cloud
        mask[index, places] = True
    return batch, mask


def _clouds(sizes: list[int], channels: int = 3) -> list[torch.Tensor]:
    return [torch.randn(size, channels, dtype=torch.float64) for size in sizes]


# --- sampling and neighbours ----------------------------------------------------------------


def test_masked_farthest_point_sampling_picks_what_the_set_alone_picks() -> None:
    clouds = _clouds([30, 12, 5])
    points, mask = _scattered(clouds, 40)
    picks = farthest_point_sampling(points, 16, mask=mask)
    for index, cloud in enumerate(clouds):
        real = mask[index].nonzero().squeeze(1)  # padded index of each real point
        count = min(16, len(cloud))
        alone = farthest_point_sampling(cloud[None], count)[0]
        torch.testing.assert_close(picks[index, :count], real[alone], rtol=0, atol=0)
        # Beyond the real points: repeats of real points, never padding.
        assert mask[index, picks[index]].all()


def test_masked_sampling_may_ask_for_more_points_than_the_padded_size() -> None:
    points, mask = _scattered(_clouds([6, 3]), 8)
    picks = farthest_point_sampling(points, 20, mask=mask)
    assert picks.shape == (2, 20) and mask.gather(1, picks).all()
    assert picks[1, :3].sort().values.tolist() == mask[1].nonzero().squeeze(1).tolist()
    with pytest.raises(ValueError, match="num_samples must be between 1 and the number"):
        farthest_point_sampling(points, 20)


def test_masked_sampling_of_an_empty_set_returns_index_zero() -> None:
    points = torch.randn(2, 5, 3).masked_fill(torch.tensor([[[False]], [[True]]]), float("nan"))
    mask = torch.tensor([[True] * 5, [False] * 5])
    picks = farthest_point_sampling(points, 3, mask=mask)
    assert (picks[1] == 0).all() and picks[0].unique().numel() == 3
    with pytest.raises(ValueError, match="num_samples must be at least 1 with a mask"):
        farthest_point_sampling(points, 0, mask=mask)


def test_masked_nearest_neighbours_rank_padding_last() -> None:
    clouds = _clouds([20, 4])
    points, mask = _scattered(clouds, 24)
    queries = torch.randn(2, 7, 3, dtype=torch.float64)
    neighbours = knn_indices(points, 6, queries=queries, mask=mask)  # NaN padding
    for index, cloud in enumerate(clouds):
        real = mask[index].nonzero().squeeze(1)
        count = min(6, len(cloud))
        alone = knn_indices(cloud[None], count, queries=queries[index : index + 1])[0]
        torch.testing.assert_close(neighbours[index, :, :count], real[alone], rtol=0, atol=0)
        assert not mask[index, neighbours[index, :, count:]].any()


# --- the embeddings -----------------------------------------------------------------------


def _set_abstraction(normalize_offsets: bool, hidden_layers: int = 1) -> SetAbstraction:
    return SetAbstraction(
        4, 16, 8, 5, normalize_offsets=normalize_offsets, hidden_layers=hidden_layers
    ).double()


def _smaller(module: torch.nn.Module, **sizes: int) -> torch.nn.Module:
    """A copy of ``module``, same weights, with other group or neighbour counts."""
    smaller = copy.deepcopy(module)
    for name, value in sizes.items():
        setattr(smaller, name, value)
    return smaller


@pytest.mark.parametrize("normalize_offsets", [False, True])
@pytest.mark.parametrize("hidden_layers", [1, 2])
def test_set_abstraction_tokens_of_a_padded_set_are_its_tokens_alone(
    normalize_offsets: bool, hidden_layers: int
) -> None:
    layer = _set_abstraction(normalize_offsets, hidden_layers)
    sizes = [25, 8, 6, 3, 1]  # at least num_groups (8), between group_size (5) and it, below
    clouds = [cloud.requires_grad_() for cloud in _clouds(sizes, 4)]
    points, mask = _scattered([cloud.detach() for cloud in clouds], 30)
    points.requires_grad_()
    tokens = layer(points, mask)
    weights = torch.randn_like(tokens)
    (tokens * weights).sum().backward()
    torch.testing.assert_close(
        layer.output_mask(mask), torch.arange(8) < torch.tensor(sizes)[:, None]
    )
    for index, (cloud, size) in enumerate(zip(clouds, sizes, strict=True)):
        alone_layer = layer
        if size < 8:
            alone_layer = _smaller(layer, num_groups=size, group_size=min(5, size))
        alone = alone_layer(cloud[None])[0]
        count = min(8, size)
        torch.testing.assert_close(tokens[index, :count], alone, rtol=0, atol=1e-12)
        assert (tokens[index, count:] == 0).all()
        (alone * weights[index, :count]).sum().backward()
        real = mask[index]
        torch.testing.assert_close(points.grad[index, real], cloud.grad, rtol=0, atol=1e-12)
        assert (points.grad[index, ~real] == 0).all()


def test_set_abstraction_takes_a_padded_size_below_its_groups() -> None:
    layer = _set_abstraction(True)  # 8 groups of 5
    clouds = _clouds([4, 2], 4)
    points, mask = _scattered(clouds, 4)  # padded size 4 < group_size 5 < num_groups 8
    tokens = layer(points, mask)
    assert tokens.shape == (2, 8, 16)
    for index, cloud in enumerate(clouds):
        size = len(cloud)
        alone = _smaller(layer, num_groups=size, group_size=size)(cloud[None])[0]
        torch.testing.assert_close(tokens[index, :size], alone, rtol=0, atol=1e-12)
        assert (tokens[index, size:] == 0).all()


def test_set_abstraction_without_a_mask_names_the_way_to_smaller_sets() -> None:
    with pytest.raises(ValueError, match=r"needs at least that many points; got 6 \(pass a mask"):
        _set_abstraction(False)(torch.randn(1, 6, 4, dtype=torch.float64))


def test_set_abstraction_with_an_all_true_mask_changes_nothing() -> None:
    layer = _set_abstraction(True)
    points = torch.randn(3, 20, 4, dtype=torch.float64)
    torch.testing.assert_close(
        layer(points, torch.ones(3, 20, dtype=torch.bool)), layer(points), rtol=0, atol=1e-12
    )


def test_masked_set_abstraction_under_bfloat16_autocast_matches_float32() -> None:
    torch.manual_seed(0)  # the tolerance is about twice the usual bf16 error, not a bound
    layer = SetAbstraction(3, 16, 8, 5, normalize_offsets=True)
    points = torch.randn(2, 20, 3)
    mask = torch.arange(20) < torch.tensor([[20], [11]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(points.masked_fill(~mask[..., None], float("nan")), mask)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), layer(points, mask), rtol=0.02, atol=0.02)


def test_edge_conv_features_of_a_padded_set_are_its_features_alone() -> None:
    layer = EdgeConvEmbedding(3, 8, 5).double()
    torch.nn.init.normal_(layer.lin_out.weight)  # starts at zero: the features would be 0
    sizes = [12, 5, 3]
    clouds = _clouds(sizes)
    points, mask = _scattered(clouds, 15)
    points.requires_grad_()
    features = layer(points, mask)
    weights = torch.randn_like(features)
    (features * weights).sum().backward()
    assert layer.output_mask(mask) is mask
    for index, (cloud, size) in enumerate(zip(clouds, sizes, strict=True)):
        alone_layer = layer if size >= 5 else _smaller(layer, num_neighbors=size)
        cloud.requires_grad_()
        alone = alone_layer(cloud[None])[0]
        real = mask[index]
        torch.testing.assert_close(features[index, real], alone, rtol=0, atol=1e-12)
        (alone * weights[index, real]).sum().backward()
        torch.testing.assert_close(points.grad[index, real], cloud.grad, rtol=0, atol=1e-12)
        assert (points.grad[index, ~real] == 0).all() and (features[index, ~real] == 0).all()


# --- the model ------------------------------------------------------------------------------


def _recipe_like(**settings: object) -> SetSinkformer:
    """The ModelNet recipe's architecture, small: set abstraction, ISAB, softmax PMA."""
    options = {
        "channels": 8,
        "num_heads": 2,
        "num_blocks": 2,
        "num_inducing_points": 3,
        "num_groups": 6,
        "group_size": 4,
        "normalize_offsets": True,
        "pooling_attention": "softmax",
    }
    options.update(settings)
    return SetSinkformer(num_classes=4, **options).double().eval()


@pytest.mark.parametrize("local_neighbors", [0, 3])
def test_the_recipe_model_classifies_a_padded_set_as_the_set_itself(local_neighbors: int) -> None:
    model = _recipe_like(local_neighbors=local_neighbors)
    sizes = [30, 6, 9, 4, 2]
    clouds = _clouds(sizes)
    points, mask = _scattered(clouds, 32)
    logits = model(points, mask)
    assert torch.isfinite(logits).all()
    for index, (cloud, size) in enumerate(zip(clouds, sizes, strict=True)):
        alone_model = model
        if size < model.min_points:
            alone_model = copy.deepcopy(model)
            for embedding in alone_model.embedding:
                if isinstance(embedding, SetAbstraction):
                    embedding.num_groups, embedding.group_size = min(6, size), min(4, size)
                else:
                    embedding.num_neighbors = min(3, size)
        expected = alone_model(cloud[None])[0]
        torch.testing.assert_close(logits[index], expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("local_neighbors", [0, 3])
def test_the_recipe_model_with_empty_and_nan_padded_sets_keeps_gradients_finite(
    local_neighbors: int,
) -> None:
    model = _recipe_like(local_neighbors=local_neighbors).train()
    points, mask = _scattered(_clouds([12, 3]), 12)
    points = torch.cat([points, torch.full((1, 12, 3), float("nan"), dtype=torch.float64)])
    mask = torch.cat([mask, torch.zeros(1, 12, dtype=torch.bool)])
    points.requires_grad_()
    logits = model(points, mask)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(points.grad).all() and (points.grad[~mask] == 0).all()


def test_masked_mean_of_a_slice_without_real_elements_is_zero() -> None:
    values = torch.tensor([[1.0, 2.0, float("nan")], [float("nan"), 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_mean(values, mask, 1), torch.tensor([1.5, 0.0]))
