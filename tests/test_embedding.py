import pytest
import torch

from pointsink.embedding import EdgeConvEmbedding, gather_neighbors, knn_indices


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


def test_edge_conv_embedding_equals_the_edge_conv_formula() -> None:
    """The cheap form equals max_j ReLU(Theta (x_j - x_i) + Phi x_i + b) over explicit edges."""
    embedding = EdgeConvEmbedding(4, 8, num_neighbors=6)
    x = torch.randn(2, 25, 4)
    indices = knn_indices(x[..., :3], 6)
    neighbors = gather_neighbors(x, indices)  # (B, N, k, 4)
    centers = x.unsqueeze(2)
    edge = embedding.lin_neighbor(neighbors - centers) + embedding.lin_center(centers)
    expected = embedding.lin_out(torch.relu(edge).amax(dim=2))
    torch.testing.assert_close(embedding(x), expected, atol=1e-5, rtol=1e-5)


def test_edge_conv_embedding_is_permutation_equivariant_and_local() -> None:
    embedding = EdgeConvEmbedding(3, 8, num_neighbors=4)
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
    embedding = EdgeConvEmbedding(3, 4, num_neighbors=3).double()
    x = torch.randn(1, 10, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(embedding, (x,))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="between 1 and the number of points"):
        knn_indices(torch.randn(1, 5, 3), 6)
    with pytest.raises(ValueError, match="xyz"):
        EdgeConvEmbedding(2, 8, 4)
    with pytest.raises(ValueError, match="num_neighbors"):
        EdgeConvEmbedding(3, 8, 0)
