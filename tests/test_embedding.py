import pytest
import torch

from pointsink.embedding import (
    EdgeConvEmbedding,
    SetAbstraction,
    farthest_point_sampling,
    gather_neighbors,
    knn_indices,
)
from pointsink.model import SetSinkformer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_knn_indices_are_the_nearest_points_self_first() -> None:
    points = torch.randn(2, 30, 3)
    indices = knn_indices(points, 5)
    assert indices.shape == (2, 30, 5)
    for b in range(2):
        for i in range(30):
            distances = (points[b] - points[b, i]).norm(dim=-1)
            expected = distances.argsort()[:5]
            assert indices[b, i].tolist() == expected.tolist()
            assert indices[b, i, 0] == i


def test_gather_neighbors_indexes_each_shape_separately() -> None:
    features = torch.randn(3, 7, 4)
    indices = torch.randint(0, 7, (3, 7, 2))
    gathered = gather_neighbors(features, indices)
    for b in range(3):
        torch.testing.assert_close(gathered[b], features[b][indices[b]])


def _trained_looking(embedding: EdgeConvEmbedding) -> EdgeConvEmbedding:
    """The output layer starts at zero; give it weights so the local features show."""
    torch.nn.init.normal_(embedding.lin_out.weight)
    torch.nn.init.normal_(embedding.lin_out.bias)
    torch.nn.init.normal_(embedding.norm.weight)
    return embedding


def _explicit_edge_conv(embedding: EdgeConvEmbedding, x: torch.Tensor) -> torch.Tensor:
    """[x_i, W2 ReLU(LN(max_j Theta (x_j - x_i) / r_i + Phi x_i + b1)) + b2] over explicit edges."""
    indices = knn_indices(x[..., :3], embedding.num_neighbors)
    offsets = gather_neighbors(x, indices) - x.unsqueeze(2)  # (B, N, k, C)
    radius = offsets[..., :3].square().sum(-1).mean(-1).add(1e-12).sqrt()  # (B, N)
    edges = embedding.lin_neighbor(offsets / radius[..., None, None])
    edges = edges + embedding.lin_center(x).unsqueeze(2)
    local = embedding.lin_out(torch.relu(embedding.norm(edges.amax(dim=2))))
    return torch.cat([x, local], dim=-1)


def _assert_same_gradients(
    output: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]
) -> None:
    """Both outputs give the same gradients to ``inputs`` under one random weighting."""
    weights = torch.randn_like(output)
    grads = torch.autograd.grad((output * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)


def test_edge_conv_embedding_equals_the_edge_conv_formula_and_its_gradient() -> None:
    """The gathered-max form equals explicit edges, values and gradients alike."""
    embedding = _trained_looking(EdgeConvEmbedding(4, 8, num_neighbors=6))
    x = torch.randn(2, 25, 4, requires_grad=True)
    output, expected = embedding(x), _explicit_edge_conv(embedding, x)
    assert output.shape == (2, 25, 4 + 8)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(output, expected, [x, *embedding.parameters()])


def test_edge_conv_embedding_starts_as_the_coordinates_and_zeros() -> None:
    """At initialization the encoder sees what it sees without the embedding, plus zeros."""
    embedding = EdgeConvEmbedding(3, 8, num_neighbors=4)
    x = torch.randn(2, 30, 3)
    torch.testing.assert_close(embedding(x), torch.cat([x, torch.zeros(2, 30, 8)], dim=-1))


def test_edge_conv_embedding_is_scale_invariant_in_its_local_part() -> None:
    """Offsets are divided by each point's neighbourhood radius: density does not matter."""
    embedding = _trained_looking(EdgeConvEmbedding(3, 8, num_neighbors=5))
    torch.nn.init.zeros_(embedding.lin_center.weight)
    x = torch.randn(1, 30, 3)
    torch.testing.assert_close(embedding(3.0 * x)[..., 3:], embedding(x)[..., 3:])


def test_edge_conv_embedding_is_permutation_equivariant_and_local() -> None:
    embedding = _trained_looking(EdgeConvEmbedding(3, 8, num_neighbors=4))
    x = torch.randn(2, 40, 3)
    permutation = torch.randperm(40)
    torch.testing.assert_close(embedding(x[:, permutation]), embedding(x)[:, permutation])
    # Moving the point farthest from point 0 leaves point 0's 4-neighbourhood, and so its
    # feature, unchanged; moving its nearest neighbour changes it.
    distances = (x[0] - x[0, 0]).norm(dim=-1)
    far, near = distances.argmax(), distances.argsort()[1]
    moved_far, moved_near = x.clone(), x.clone()
    moved_far[0, far] += 0.5
    moved_near[0, near] += 0.5
    torch.testing.assert_close(embedding(moved_far)[0, 0], embedding(x)[0, 0])
    assert not torch.allclose(embedding(moved_near)[0, 0], embedding(x)[0, 0])


def test_edge_conv_embedding_gradients() -> None:
    embedding = _trained_looking(EdgeConvEmbedding(3, 4, num_neighbors=3)).double()
    x = torch.randn(1, 10, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(embedding, (x,))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        knn_indices(torch.randn(1, 5, 3), 6)
    with pytest.raises(ValueError, match="xyz"):
        EdgeConvEmbedding(2, 8, 4)
    with pytest.raises(ValueError, match="num_neighbors"):
        EdgeConvEmbedding(3, 8, 0)
    with pytest.raises(ValueError, match="channels"):
        EdgeConvEmbedding(3, 0, 4)
    with pytest.raises(ValueError, match="num_samples"):
        farthest_point_sampling(torch.randn(1, 5, 3), 6)
    with pytest.raises(ValueError, match="xyz"):
        SetAbstraction(2, 8, 4, 4)
    with pytest.raises(ValueError, match="num_groups"):
        SetAbstraction(3, 8, 0, 4)
    with pytest.raises(ValueError, match="group_size"):
        SetAbstraction(3, 8, 4, 0)
    with pytest.raises(ValueError, match="needs at least that many points"):
        SetAbstraction(3, 8, 4, 10)(torch.randn(1, 9, 3))
    # Zero widths gave empty tokens or were swapped for the default; a float width failed
    # inside nn.Linear.
    with pytest.raises(ValueError, match=r"^channels must be at least 1"):
        SetAbstraction(3, 0, 4, 4)
    with pytest.raises(ValueError, match=r"^hidden_channels must be at least 1"):
        SetAbstraction(3, 8, 4, 4, hidden_channels=0)
    with pytest.raises(ValueError, match=r"^in_channels must be an integer"):
        SetAbstraction(3.0, 8, 4, 4)
    with pytest.raises(ValueError, match=r"^in_channels must be an integer"):
        EdgeConvEmbedding(3.0, 8, 4)


def _reference_farthest_point_sampling(points: torch.Tensor, num_samples: int) -> list[int]:
    """Greedy farthest-point sampling of one shape ``(N, 3)``, written out point by point."""
    first = int((points - points.mean(dim=0)).norm(dim=-1).argmax())
    chosen = [first]
    while len(chosen) < num_samples:
        distance_to_chosen = [
            min(float((points[i] - points[j]).norm()) for j in chosen) for i in range(len(points))
        ]
        chosen.append(max(range(len(points)), key=distance_to_chosen.__getitem__))
    return chosen


def test_farthest_point_sampling_is_the_greedy_farthest_point_order() -> None:
    points = torch.randn(3, 40, 3)
    indices = farthest_point_sampling(points, 12)
    assert indices.shape == (3, 12)
    for b in range(3):
        assert indices[b].tolist() == _reference_farthest_point_sampling(points[b], 12)


def test_farthest_point_sampling_ignores_the_order_of_the_points() -> None:
    points = torch.randn(2, 50, 3)
    permutation = torch.randperm(50)
    chosen = permutation[farthest_point_sampling(points[:, permutation], 20)]
    torch.testing.assert_close(chosen, farthest_point_sampling(points, 20))
    # All points: a permutation of the set.
    everything = farthest_point_sampling(points, 50)
    assert (everything.sort(dim=1).values == torch.arange(50)).all()


def test_farthest_point_sampling_of_repeated_points_ignores_their_order() -> None:
    # 4 distinct points, each 5 times, and 6 picks: once all 4 are taken, the start is
    # repeated (the lowest index at distance 0 depended on the order of the points).
    points = torch.randn(1, 4, 3).repeat(1, 5, 1)
    mask = torch.ones(1, 30, dtype=torch.bool)
    mask[0, 20:] = False
    picks = []
    for _ in range(4):
        shuffled = points[:, torch.randperm(20)]
        padded = torch.cat([shuffled, torch.randn(1, 10, 3)], dim=1)
        for chosen in (
            shuffled[0, farthest_point_sampling(shuffled, 6)[0]],
            padded[0, farthest_point_sampling(padded, 7, mask=mask)[0]],
        ):
            assert torch.equal(chosen[4:], chosen[:1].expand(len(chosen) - 4, 3))
            picks.append(chosen[:6])
    assert all(torch.equal(chosen, picks[0]) for chosen in picks)


def test_set_abstraction_model_of_repeated_points_ignores_their_order() -> None:
    # A small cloud filled by repeating points (as ShapeClassifier fills one for a model
    # without masks), with more groups than distinct points.
    model = SetSinkformer(3, channels=16, num_heads=2, num_inducing_points=4, num_groups=6,
                          group_size=4).eval()  # fmt: skip
    points = torch.randn(1, 4, 3).repeat(1, 5, 1)
    with torch.no_grad():
        logits = model(points)
        for _ in range(5):
            torch.testing.assert_close(model(points[:, torch.randperm(20)]), logits)


def test_knn_is_exact_away_from_the_origin_and_the_same_padded() -> None:
    # cdist's |x|^2 + |y|^2 - 2 x.y form (used above 25 points) cancels on shifted clouds:
    # at a shift of 100, most points got a wrong neighbour set.
    for shift in (10.0, 100.0):
        points = torch.rand(1, 300, 3) + shift
        exact = torch.cdist(points.double(), points.double())
        exact.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        want = exact.topk(8, dim=-1, largest=False).indices
        assert torch.equal(knn_indices(points, 8).sort(-1).values, want.sort(-1).values)
    # 20 points alone (cdist's direct form) and padded to 40 behind a mask.
    real = torch.rand(1, 20, 3) + 10.0
    padded = torch.cat([real, torch.randn(1, 20, 3)], dim=1)
    mask = (torch.arange(40) < 20).unsqueeze(0)
    together = knn_indices(padded, 4, mask=mask)[:, :20]
    assert torch.equal(together.sort(-1).values, knn_indices(real, 4).sort(-1).values)


def _explicit_set_abstraction(layer: SetAbstraction, x: torch.Tensor) -> torch.Tensor:
    """max_j W2 ReLU(LN(Theta (x_j - c_i) + Phi c_i + b1)) + b2, one centre at a time.

    With ``normalize_offsets``, the xyz part of every offset is divided by the RMS length
    of the shape's ``M k`` xyz offsets.
    """
    tokens = []
    for shape in x:
        centers = _reference_farthest_point_sampling(shape[:, :3].detach(), layer.num_groups)
        groups = []
        for c in centers:
            distances = (shape[:, :3] - shape[c, :3]).norm(dim=-1).detach()
            groups.append(shape[distances.argsort()[: layer.group_size]] - shape[c])
        scale = torch.ones(shape.shape[1], dtype=shape.dtype)
        if layer.normalize_offsets:
            radius = torch.cat([offsets[:, :3] for offsets in groups]).detach()
            scale[:3] = 1 / radius.square().sum(dim=1).mean().sqrt()
        shape_tokens = []
        for c, offsets in zip(centers, groups, strict=True):
            hidden = layer.lin_offset(offsets * scale) + layer.lin_center(shape[c])
            hidden = torch.relu(layer.norm(hidden))
            for extra in layer.hidden:
                hidden = torch.relu(extra[1](extra[0](hidden)))
            shape_tokens.append(layer.lin_out(hidden).amax(dim=0))
        tokens.append(torch.stack(shape_tokens))
    return torch.stack(tokens)


@pytest.mark.parametrize(("normalize_offsets", "hidden_layers"), [(False, 1), (True, 1), (True, 3)])
def test_set_abstraction_equals_its_formula_and_its_gradient(
    normalize_offsets: bool, hidden_layers: int
) -> None:
    """The batched layer equals the MLP over explicit offsets per centre, values and gradients."""
    layer = SetAbstraction(
        4,
        8,
        num_groups=6,
        group_size=5,
        normalize_offsets=normalize_offsets,
        hidden_layers=hidden_layers,
    )
    assert len(layer.hidden) == hidden_layers - 1
    for norm in [layer.norm, *(extra[1] for extra in layer.hidden)]:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 25, 4, requires_grad=True)
    output, expected = layer(x), _explicit_set_abstraction(layer, x)
    assert output.shape == (2, 6, 8)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    _assert_same_gradients(output, expected, [x, *layer.parameters()])


def test_set_abstraction_is_permutation_invariant_and_local() -> None:
    layer = SetAbstraction(3, 8, num_groups=5, group_size=4)
    x = torch.randn(2, 40, 3)
    tokens = layer(x)
    torch.testing.assert_close(layer(x[:, torch.randperm(40)]), tokens)
    # A point outside every group, moved towards the centre, changes no centre and no
    # group; moving a member of the first group changes that token.
    centers = farthest_point_sampling(x, 5)[0]
    groups = torch.cdist(x[0, centers], x[0]).topk(4, largest=False).indices
    outside = next(i for i in range(40) if i not in groups and i not in centers)
    member = int(groups[0, 1])
    moved_outside, moved_member = x.clone(), x.clone()
    moved_outside[0, outside] *= 0.999
    moved_member[0, member] *= 0.9
    torch.testing.assert_close(layer(moved_outside), tokens)
    assert not torch.allclose(layer(moved_member)[0, 0], tokens[0, 0])


def test_normalized_offsets_make_the_local_term_independent_of_the_shape_size() -> None:
    """Without the centre term, normalized tokens ignore the shape's size; raw ones do not."""
    x = torch.randn(2, 40, 3)
    for normalize_offsets in (True, False):
        layer = SetAbstraction(
            3, 8, num_groups=5, group_size=6, normalize_offsets=normalize_offsets
        )
        torch.nn.init.zeros_(layer.lin_center.weight)
        torch.nn.init.uniform_(layer.lin_center.bias, -1.0, 1.0)
        same = torch.allclose(layer(x * 0.05), layer(x), atol=1e-5)
        assert same == normalize_offsets
    # Coinciding points (zero radius) give finite tokens.
    layer = SetAbstraction(3, 8, num_groups=2, group_size=3, normalize_offsets=True)
    assert torch.isfinite(layer(torch.ones(1, 4, 3))).all()


def test_set_abstraction_gradients() -> None:
    layer = SetAbstraction(3, 4, num_groups=3, group_size=3).double()
    x = torch.randn(1, 10, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_set_abstraction_keeps_the_local_term_precise_under_bfloat16_autocast() -> None:
    """Theta x_j - Theta c_i in bfloat16 loses the small difference; Theta (x_j - c_i) not.

    With the centre term off, the tokens carry only the local term: 0.83 % relative error
    against float32 when Theta was applied to points and centres apart, 0.37 % with the
    offsets formed first (2026-12-02, Intel Xeon CPU).
    """
    torch.manual_seed(0)
    layer = SetAbstraction(3, 64, num_groups=64, group_size=16, normalize_offsets=True)
    torch.nn.init.zeros_(layer.lin_center.weight)
    x = torch.nn.functional.normalize(torch.randn(4, 512, 3), dim=-1).requires_grad_()
    reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = layer(x)
    assert tokens.dtype == torch.bfloat16
    error = (tokens.float() - reference).norm() / reference.norm()
    assert error < 0.005
    tokens.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all()
    # A model held in bfloat16 (no autocast) runs too, and returns bfloat16 tokens.
    assert layer.to(torch.bfloat16)(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16


def test_edgeconv_keeps_the_local_term_precise_under_bfloat16_autocast() -> None:
    """max_j Theta x_j - Theta x_i, divided by a small radius, needs float32 products.

    With the centre term off: about 1.5 % relative error against float32 with the projection
    in bfloat16, 0.3 % with it in float32 (2026-12-02, Intel Xeon CPU).
    """
    torch.manual_seed(0)
    layer = EdgeConvEmbedding(3, 64, num_neighbors=16)
    torch.nn.init.normal_(layer.lin_out.weight, std=0.1)  # it starts at zero
    torch.nn.init.zeros_(layer.lin_center.weight)
    x = torch.nn.functional.normalize(torch.randn(4, 1024, 3), dim=-1).requires_grad_()
    reference = layer(x)[..., 3:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = layer(x)[..., 3:]
    error = (features.float() - reference).norm() / reference.norm()
    assert error < 0.008
    features.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.to(torch.bfloat16)(x.detach().to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_farthest_point_sampling_of_half_points_is_that_of_their_float32_values(dtype) -> None:
    # The loop works in float32, as the Triton kernel does, so both backends pick alike.
    points = torch.randn(2, 200, 3).to(dtype)
    expected = farthest_point_sampling(points.float(), 100, backend="loop")
    assert torch.equal(farthest_point_sampling(points, 100, backend="loop"), expected)


def test_farthest_point_sampling_takes_points_that_require_grad() -> None:
    points = torch.randn(2, 50, 3, requires_grad=True)
    expected = farthest_point_sampling(points.detach(), 10, backend="loop")
    assert torch.equal(farthest_point_sampling(points, 10, backend="loop"), expected)


def test_farthest_point_sampling_under_vmap_is_one_call_per_sample() -> None:
    # torch.func.vmap (per-sample gradients of a model with a set abstraction): points
    # vmapped over their second dimension with per-sample masks, and points shared by all
    # samples with per-sample masks.
    from torch.func import vmap

    points = torch.randn(3, 2, 40, 3)
    mask = torch.rand(3, 2, 40) > 0.4
    mask[..., 0] = True
    got = vmap(lambda p, m: farthest_point_sampling(p, 12, mask=m), in_dims=(1, 0))(
        points.transpose(0, 1), mask
    )
    shared = vmap(lambda m: farthest_point_sampling(points[0], 12, mask=m))(mask)
    # And a mask shared by all samples, with the points vmapped over dimension 1.
    shared_mask = vmap(lambda p: farthest_point_sampling(p, 12, mask=mask[0]), in_dims=1)(
        points.transpose(0, 1)
    )
    for s in range(3):
        assert torch.equal(got[s], farthest_point_sampling(points[s], 12, mask=mask[s]))
        assert torch.equal(shared[s], farthest_point_sampling(points[0], 12, mask=mask[s]))
        assert torch.equal(shared_mask[s], farthest_point_sampling(points[s], 12, mask=mask[0]))


def test_normalized_offsets_of_coinciding_points_stay_finite_in_half_precision() -> None:
    layer = SetAbstraction(3, 8, num_groups=2, group_size=3, normalize_offsets=True).half()
    points = torch.stack([torch.zeros(4, 3), torch.randn(4, 3)]).half()
    assert torch.isfinite(layer(points)).all()


def test_each_point_is_its_own_nearest_despite_cdist_rounding() -> None:
    # cdist's matrix-product distances (used before) put a point ~1e-4 from itself, no
    # nearer than a copy shifted by 1e-4: a third of these points missed their own k = 1
    # list. An exact copy ties with the point itself at distance 0.
    base = torch.nn.functional.normalize(torch.randn(1, 512, 3), dim=-1)
    for copy in (base + 1e-4 * torch.randn_like(base), base):
        nearest = knn_indices(torch.cat([base, copy], dim=1), 1)
        assert nearest.squeeze(-1).tolist() == [list(range(1024))]


def test_edge_conv_of_coinciding_neighbours_stays_finite_in_half_precision() -> None:
    layer = EdgeConvEmbedding(3, 8, 4)
    torch.nn.init.normal_(layer.lin_out.weight)  # 0 at initialization would hide a NaN radius
    # Every point four times, as preprocess_shape fills a small cloud.
    points = torch.randn(1, 5, 3).repeat_interleave(4, dim=1).half()
    features = layer.half()(points)
    assert torch.isfinite(features).all() and features[..., 3:].abs().sum() > 0
