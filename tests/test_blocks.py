import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _sinkhorn_reference import alternating_scaling

from pointsink.attention import (
    MultiheadAttention,
    attention_weights,
    scaled_dot_product_attention,
)
from pointsink.blocks import (
    InducedSetAttentionBlock,
    MultiheadAttentionBlock,
    PoolingByMultiheadAttention,
    SetAttentionBlock,
)
from pointsink.model import SetSinkformer

ATTENTIONS = [("softmax", 1), ("sinkhorn", 1), ("sinkhorn", 4), ("sinkhorn", 5)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_sinkhorn_one_iteration_equals_softmax_attention() -> None:
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 3)
    torch.testing.assert_close(
        scaled_dot_product_attention(q, k, v, "sinkhorn", 1),
        F.scaled_dot_product_attention(q, k, v),
    )


def test_logits_scaled_by_inverse_sqrt_head_dim() -> None:
    q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 2)
    expected = torch.softmax(q @ k.transpose(-2, -1) / 4.0, -1) @ v
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, "sinkhorn", 1), expected)


def test_multihead_blocks_identical_for_one_iteration() -> None:
    """Sinkhorn with n_iter=1 and softmax give the same block output with the same weights."""
    softmax_block = MultiheadAttentionBlock(3, 3, 16, 4, "softmax")
    sinkhorn_block = MultiheadAttentionBlock(3, 3, 16, 4, "sinkhorn", 1)
    sinkhorn_block.load_state_dict(softmax_block.state_dict())
    x, y = torch.randn(2, 7, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(softmax_block(x, y), sinkhorn_block(x, y))


@pytest.mark.parametrize(("attention", "n_iter"), [*ATTENTIONS, ("sinkhorn", 2)])
def test_multihead_attention_output_is_its_heads_attention(attention: str, n_iter: int) -> None:
    """Each head returns W V for W the softmax or Sinkhorn weights of Q K^T / sqrt(d)."""
    attn = MultiheadAttention(3, 3, 16, 2, attention, n_iter)
    x, y = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    _, heads = attn(x, y)

    def split(features: torch.Tensor) -> torch.Tensor:  # (B, L, 16) -> (B, 2 heads, L, 8)
        return features.view(2, -1, 2, 8).transpose(1, 2)

    q, k, v = split(attn.lin_query(x)), split(attn.lin_key(y)), split(attn.lin_value(y))
    logits = q @ k.transpose(-2, -1) / 8**0.5
    weights = logits.softmax(-1) if attention == "softmax" else alternating_scaling(logits, n_iter)
    expected = (weights @ v).transpose(1, 2).reshape(2, 6, 16)
    torch.testing.assert_close(heads, expected)
    if n_iter > 1:  # and Sinkhorn is not softmax here
        assert not torch.allclose(
            heads, (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 16), atol=1e-4
        )


def test_sinkhorn_attention_columns_are_balanced() -> None:
    attn = MultiheadAttention(3, 3, 16, 2, "sinkhorn", 8)
    attn.record_marginals = True
    x, y = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    out = attn(x, y)
    assert attn.last_marginals is not None
    rows, columns = attn.last_marginals
    # 8 iterations end on columns: exact column sums, rows close to 1.
    torch.testing.assert_close(columns, torch.full((2, 2, 4), 6 / 4))
    torch.testing.assert_close(rows, torch.ones(2, 2, 6), atol=1e-3, rtol=0)
    # Recording does not change the output.
    attn.record_marginals = False
    torch.testing.assert_close(attn(x, y), out)


@pytest.mark.parametrize(("attention", "n_iter"), [("softmax", 1), ("sinkhorn", 2)])
def test_recorded_marginals_are_the_sums_of_the_weights(attention: str, n_iter: int) -> None:
    attn = MultiheadAttention(3, 3, 16, 2, attention, n_iter)
    x, y = torch.randn(3, 7, 3), torch.randn(3, 5, 3)
    attn.record_marginals = True
    attn(x, y)
    q = attn._split_heads(attn.lin_query(x))
    k = attn._split_heads(attn.lin_key(y))
    # From first principles, not through dense_attention_weights (the recorder's own code).
    logits = q @ k.transpose(-2, -1) / 8**0.5  # head dim 16 / 2
    if attention == "softmax":
        weights = logits.softmax(dim=-1)
    else:
        weights = alternating_scaling(logits, n_iter)
    rows, columns = attn.last_marginals
    torch.testing.assert_close(rows, weights.sum(-1))
    torch.testing.assert_close(columns, weights.sum(-2))
    # Neither normalization leaves both marginals exact here.
    assert (columns - 7 / 5).abs().max() > 1e-3 or (rows - 1).abs().max() > 1e-3


@pytest.mark.parametrize(("attention", "n_iter"), ATTENTIONS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_set_blocks_are_permutation_equivariant(
    attention: str, n_iter: int, layer_norm: bool
) -> None:
    x = torch.randn(3, 11, 3)
    perm = torch.randperm(11)
    for block in (
        SetAttentionBlock(3, 16, 4, attention, n_iter, layer_norm),
        InducedSetAttentionBlock(3, 16, 4, 5, attention, n_iter, layer_norm),
    ):
        out = block(x)
        torch.testing.assert_close(block(x[:, perm]), out[:, perm], atol=1e-5, rtol=1e-4)
        # Not trivially equivariant: the output depends on the other points.
        x_changed = x.clone()
        x_changed[:, 0] += 1.0
        assert not torch.allclose(block(x_changed)[:, 1:], out[:, 1:])


@pytest.mark.parametrize(("attention", "n_iter"), ATTENTIONS)
def test_pooling_is_permutation_invariant(attention: str, n_iter: int) -> None:
    pool = PoolingByMultiheadAttention(16, 4, 2, attention, n_iter)
    x = torch.randn(3, 11, 16)
    out = pool(x)
    assert out.shape == (3, 2, 16)
    torch.testing.assert_close(pool(x[:, torch.randperm(11)]), out, atol=1e-5, rtol=1e-4)
    # Not trivially invariant: the pooled output depends on the set's elements.
    x_changed = x.clone()
    x_changed[:, 0] += 1.0
    assert not torch.allclose(pool(x_changed), out)


def test_single_seed_sinkhorn_pooling_is_mean_pooling() -> None:
    """Documented degenerate case: one seed and >= 2 iterations give uniform weights."""
    attn = MultiheadAttention(8, 8, 8, 2, "sinkhorn", 3)
    attn.record_marginals = True
    y = torch.randn(2, 9, 8)
    _, heads = attn(torch.randn(2, 1, 8), y)
    # With one query row, the column sums are the weights themselves.
    torch.testing.assert_close(attn.last_marginals[1], torch.full((2, 2, 9), 1 / 9))
    # And the output is the mean of the values.
    torch.testing.assert_close(heads, attn.lin_value(y).mean(1, keepdim=True))


@pytest.mark.parametrize(("local_neighbors", "num_groups"), [(0, 0), (4, 0), (0, 6), (4, 6)])
@pytest.mark.parametrize("encoder", ["isab", "sab"])
@pytest.mark.parametrize(("attention", "n_iter"), ATTENTIONS)
def test_classifier_is_permutation_invariant(
    encoder: str, attention: str, n_iter: int, local_neighbors: int, num_groups: int
) -> None:
    model = SetSinkformer(
        5,
        channels=16,
        num_heads=2,
        encoder=encoder,
        num_inducing_points=4,
        attention=attention,
        n_iter=n_iter,
        local_neighbors=local_neighbors,
        num_groups=num_groups,
        group_size=5,
    ).eval()
    x = torch.randn(4, 20, 3)
    logits = model(x)
    assert logits.shape == (4, 5)
    torch.testing.assert_close(model(x[:, torch.randperm(20)]), logits, atol=1e-5, rtol=1e-4)
    # Not trivially invariant: the logits depend on the points.
    assert not torch.allclose(model(x * 2.0), logits)


def test_batch_size_one() -> None:
    model = SetSinkformer(4, channels=16, num_heads=2, num_inducing_points=4).eval()
    x = torch.randn(3, 12, 3)
    single = model(x[:1])
    assert single.shape == (1, 4)
    torch.testing.assert_close(single, model(x)[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("attention", "n_iter"), [("softmax", 1), ("sinkhorn", 5)])
def test_training_step_lowers_loss(attention: str, n_iter: int) -> None:
    model = SetSinkformer(
        3,
        channels=32,
        num_heads=4,
        num_inducing_points=4,
        attention=attention,
        n_iter=n_iter,
        dropout=0.0,
    )
    x, y = torch.randn(6, 16, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = F.cross_entropy(model(x), y)
    for _ in range(25):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert F.cross_entropy(model(x), y) < 0.5 * first


@pytest.mark.parametrize(
    ("settings", "fewest"),
    [({}, 1), ({"local_neighbors": 10}, 10), ({"num_groups": 4, "group_size": 16}, 16),
     ({"num_groups": 12, "group_size": 5}, 12)],
)  # fmt: skip
def test_min_points_is_the_fewest_points_the_model_takes(settings: dict, fewest: int) -> None:
    model = SetSinkformer(num_classes=2, channels=8, num_heads=2, num_inducing_points=2, **settings)
    assert model.min_points == fewest
    assert model(torch.randn(2, fewest, 3)).shape == (2, 2)
    if fewest > 1:
        with pytest.raises(ValueError, match=r"number of points|at least that many points"):
            model(torch.randn(2, fewest - 1, 3))


def test_reset_parameters_reinitializes() -> None:
    model = SetSinkformer(3, channels=16, num_heads=2, num_inducing_points=4)
    before = [p.clone() for p in model.parameters()]
    model.reset_parameters()
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(3, 3, 10, 4)
    with pytest.raises(ValueError, match="attention must be one of"):
        SetSinkformer(3, attention="sparsemax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_iter"):
        SetSinkformer(3, n_iter=0)
    with pytest.raises(ValueError, match="encoder"):
        SetSinkformer(3, encoder="pointnet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="local_neighbors"):
        SetSinkformer(3, local_neighbors=-1)
    with pytest.raises(ValueError, match="num_groups"):
        SetSinkformer(3, num_groups=-1)
    model = SetSinkformer(3, channels=16, num_heads=2)
    with pytest.raises(ValueError, match=r"points must have shape \(batch, num_points, 3\)"):
        model(torch.randn(10, 3))
    with pytest.raises(TypeError, match=r"points has dtype torch.float64 .* torch.float32"):
        model(torch.randn(2, 10, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside the layers
        assert model(torch.randn(2, 10, 3, dtype=torch.bfloat16)).shape == (2, 3)
    with pytest.raises(ValueError, match="points is on meta but the parameters are on cpu"):
        model(torch.randn(2, 10, 3, device="meta"))


@pytest.mark.parametrize(
    ("inputs", "error", "message"),
    [
        (
            (torch.randn(5, 3),),
            ValueError,
            r"(queries|keys) must have shape \(batch, set_size, 3\)",
        ),
        ((torch.randn(2, 5, 4),), ValueError, r"(queries|keys) must have shape .* got \(2, 5, 4\)"),
        ((torch.randn(2, 5, 3).double(),), TypeError, "convert the input"),
    ],
)
def test_blocks_name_a_wrong_input(inputs, error, message) -> None:
    for block in (SetAttentionBlock(3, 16, 2), InducedSetAttentionBlock(3, 16, 2, 4)):
        with pytest.raises(error, match=message):
            block(*inputs)
    with pytest.raises(ValueError, match=r"keys must have shape \(batch, set_size, 3\)"):
        MultiheadAttentionBlock(5, 3, 16, 2)(torch.randn(2, 4, 5), torch.randn(2, 4, 5))


def test_attention_weights_softmax() -> None:
    logits = torch.randn(4, 6)
    torch.testing.assert_close(attention_weights(logits, "softmax"), logits.softmax(-1))


@pytest.mark.parametrize(
    ("attention", "n_iter"), [("softmax", 1), ("sinkhorn", 1), ("sinkhorn", 4)]
)
def test_efficient_path_matches_dense_reference(attention: str, n_iter: int) -> None:
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for n in (7, 5, 5))
    efficient = scaled_dot_product_attention(q, k, v, attention, n_iter, efficient=True)
    grads_efficient = torch.autograd.grad(efficient.square().sum(), (q, k, v))
    dense = scaled_dot_product_attention(q, k, v, attention, n_iter, efficient=False)
    grads_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    torch.testing.assert_close(efficient, dense)
    for got, expected in zip(grads_efficient, grads_dense, strict=True):
        torch.testing.assert_close(got, expected)


def test_model_never_saves_an_attention_matrix_for_backward() -> None:
    """The SAB model trains through the efficient kernel: no N x N tensor is kept."""
    model = SetSinkformer(3, channels=16, num_heads=2, encoder="sab", n_iter=5)
    sizes: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    points = torch.randn(1, 256, 3)  # 256 x 256 logits: the efficient kernel is chosen
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(points).sum().backward()
    assert sizes and max(sizes) < 256 * 256  # one head's N x N matrix would be 65536


@pytest.mark.parametrize("efficient", [None, True, False])
def test_unknown_attention_kind_is_rejected(efficient: bool | None) -> None:
    """Any string but "softmax" used to run Sinkhorn silently."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="attention must be one of"):
        scaled_dot_product_attention(q, q, q, "Softmax", 5, efficient=efficient)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_iter"):
        scaled_dot_product_attention(q, q, q, "sinkhorn", 0, efficient=efficient)


def test_attention_weights_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_weights(torch.randn(4, 6), "bogus", 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(("encoder", "num_points"), [("isab", 16), ("sab", 256)])
def test_empty_batch_gives_empty_logits(encoder: str, num_points: int) -> None:
    """B = 0 through both Sinkhorn paths (256 points: SAB takes the efficient kernel)."""
    model = SetSinkformer(5, channels=16, num_heads=2, num_inducing_points=4, encoder=encoder)
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.record_marginals = True
    points = torch.randn(0, num_points, 3, requires_grad=True)
    logits = model(points)
    assert logits.shape == (0, 5)
    logits.sum().backward()
    assert points.grad is not None and points.grad.shape == points.shape
    rows, columns = model.pool.mab.attn.last_marginals
    assert rows.shape == (0, 2, 1) and columns.shape == (0, 2, num_points)


# -- each block is its formula (Lee et al. 2019, eq. 6-11), values and gradients ------------


def _randomize_layer_norms(module: torch.nn.Module) -> None:
    # Identity-initialized LayerNorms would hide a missing or misplaced normalization.
    for norm in module.modules():
        if isinstance(norm, torch.nn.LayerNorm):
            torch.nn.init.normal_(norm.weight)
            torch.nn.init.normal_(norm.bias)


def _block_reference(
    mab: MultiheadAttentionBlock, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """MAB(X, Y) written from the heads up with ``alternating_scaling``, not with ``mab.attn``."""
    attn = mab.attn
    batch, num_heads, channels = x.shape[0], attn.num_heads, mab.lin_out.out_features
    head_dim = channels // num_heads

    def heads_of(t: torch.Tensor) -> torch.Tensor:  # (B, P, C) -> (B, H, P, C / H)
        return t.view(batch, -1, num_heads, head_dim).transpose(1, 2)

    q, k, v = heads_of(attn.lin_query(x)), heads_of(attn.lin_key(y)), heads_of(attn.lin_value(y))
    weights = alternating_scaling(q @ k.transpose(-2, -1) / head_dim**0.5, attn.n_iter)
    heads = (weights @ v).transpose(1, 2).reshape(batch, x.shape[1], channels)

    def norm(t: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
        if isinstance(layer, torch.nn.LayerNorm):
            return F.layer_norm(t, (channels,), layer.weight, layer.bias)
        return t

    h = norm(attn.lin_query(x) + heads, mab.norm_attn)
    return norm(h + F.relu(mab.lin_out(h)), mab.norm_out)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_multihead_attention_block_is_its_formula(layer_norm: bool) -> None:
    """MAB(X, Y) = LN(H + relu(W H)), H = LN(X W_q + Multihead(X, Y, Y)): values and
    gradients against the same formula written from the heads up, in float64."""
    mab = MultiheadAttentionBlock(3, 5, 16, 2, "sinkhorn", 3, layer_norm).double()
    _randomize_layer_norms(mab)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    expected = _block_reference(mab, x, y)
    out = mab(x, y)
    torch.testing.assert_close(out, expected)
    weighting = torch.randn_like(out)
    inputs = [x, y, *mab.parameters()]
    got = torch.autograd.grad((out * weighting).sum(), inputs)
    want = torch.autograd.grad((expected * weighting).sum(), inputs)
    for name, g, w in zip(["x", "y", *dict(mab.named_parameters())], got, want, strict=True):
        torch.testing.assert_close(g, w, msg=name)
    # The flag reaches the blocks built from MABs.
    sab = SetAttentionBlock(3, 16, 2, layer_norm=layer_norm).mab
    assert isinstance(sab.norm_attn, torch.nn.LayerNorm) == layer_norm
    assert isinstance(sab.norm_out, torch.nn.LayerNorm) == layer_norm


def test_induced_and_pooling_blocks_are_their_formulas() -> None:
    """ISAB(X) = MAB(X, MAB(I, X)) with the same n_iter in both; PMA(Z) = MAB(S, relu(W Z)):
    values against MABs written from the heads up, with layer norms on and randomized."""
    isab = InducedSetAttentionBlock(3, 16, 2, 4, "sinkhorn", 5, layer_norm=True).double()
    _randomize_layer_norms(isab)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    induced = _block_reference(isab.mab_induce, isab.inducing_points.expand(2, -1, -1), x)
    torch.testing.assert_close(isab(x), _block_reference(isab.mab_out, x, induced))
    assert isab.mab_out.attn.n_iter == isab.mab_induce.attn.n_iter == 5
    pma = PoolingByMultiheadAttention(16, 2, 2, "sinkhorn", 3, layer_norm=True).double()
    _randomize_layer_norms(pma)
    z = torch.randn(2, 9, 16, dtype=torch.float64)
    expected = _block_reference(pma.mab, pma.seeds.expand(2, -1, -1), F.relu(pma.lin(z)))
    torch.testing.assert_close(pma(z), expected)


def test_every_parameter_of_an_induced_block_gets_a_gradient() -> None:
    # A detached inducing path would leave mab_induce and the inducing points untrained.
    isab = InducedSetAttentionBlock(3, 16, 2, 4, "sinkhorn", 3)
    isab(torch.randn(2, 9, 3)).square().sum().backward()
    for name, parameter in isab.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def _reference_code_plan(cost: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The Sinkformers reference code's plan for cost ``C`` (``(..., n, m)``), eps = 1.

    Its log-domain loop: marginals ``1/n`` and ``1/m``, ``u`` updated on even steps and
    ``v`` on odd ones, ``pi = exp(-C + u + v)`` (without its early stop).
    """
    n, m = cost.shape[-2:]
    u = torch.zeros(*cost.shape[:-1], dtype=cost.dtype)
    v = torch.zeros(*cost.shape[:-2], m, dtype=cost.dtype)

    def modified() -> torch.Tensor:
        return -cost + u.unsqueeze(-1) + v.unsqueeze(-2)

    for step in range(n_iter):
        if step % 2 == 0:
            u = torch.log(torch.tensor(1.0 / n)) - torch.logsumexp(modified(), -1) + u
        else:
            v = torch.log(torch.tensor(1.0 / m)) - torch.logsumexp(modified(), -2) + v
    return modified().exp()


@pytest.mark.parametrize("n_iter", [1, 2, 3, 4])
@pytest.mark.parametrize(("n", "m"), [(4, 9), (9, 4)])
def test_reference_code_options_give_its_attention(n_iter: int, n: int, m: int) -> None:
    """logit_scale="width" and sinkhorn_marginals="uniform" compute the reference code's
    attention term: its plan for C = -(Q / width^1/4)(K / width^1/4)^T, times V."""
    attn = MultiheadAttention(
        3, 5, 16, 2, "sinkhorn", n_iter, logit_scale="width", sinkhorn_marginals="uniform"
    ).double()
    x = torch.randn(2, n, 3, dtype=torch.float64)
    y = torch.randn(2, m, 5, dtype=torch.float64)
    _, heads = attn(x, y)

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, 16) -> (B, 2, L, 8)
        return t.view(2, -1, 2, 8).transpose(1, 2)

    root = 16**0.25
    q, k, v = split(attn.lin_query(x)), split(attn.lin_key(y)), split(attn.lin_value(y))
    plan = _reference_code_plan(-(q / root) @ (k / root).transpose(-2, -1), n_iter)
    expected = (plan @ v).transpose(1, 2).reshape(2, n, 16)
    torch.testing.assert_close(heads, expected)
    # Not pointsink's default attention, which is n times larger and at another scale.
    default = MultiheadAttention(3, 5, 16, 2, "sinkhorn", n_iter).double()
    default.load_state_dict(attn.state_dict())
    assert not torch.allclose(default(x, y)[1], heads, atol=1e-3)


def test_uniform_marginals_leave_softmax_attention_alone() -> None:
    softmax = MultiheadAttention(3, 3, 16, 2, "softmax", logit_scale="width")
    ignoring = MultiheadAttention(
        3, 3, 16, 2, "softmax", logit_scale="width", sinkhorn_marginals="uniform"
    )
    ignoring.load_state_dict(softmax.state_dict())
    x, y = torch.randn(2, 6, 3), torch.randn(2, 4, 3)
    torch.testing.assert_close(ignoring(x, y), softmax(x, y))
    with pytest.raises(ValueError, match="logit_scale must be one of"):
        MultiheadAttention(3, 3, 16, 2, logit_scale="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sinkhorn_marginals must be one of"):
        SetSinkformer(3, sinkhorn_marginals="plan")  # type: ignore[arg-type]


def test_pooling_without_projection_attends_to_the_set_itself() -> None:
    """PMA(Z) = MAB(S, Z) with projection=False (the reference code), still invariant."""
    pma = PoolingByMultiheadAttention(16, 2, 1, "sinkhorn", 3, projection=False)
    assert not any(name.startswith("lin.") for name in pma.state_dict())
    z = torch.randn(2, 9, 16)
    torch.testing.assert_close(pma(z), pma.mab(pma.seeds.expand(2, -1, -1), z))
    torch.testing.assert_close(pma(z[:, torch.randperm(9)]), pma(z), atol=1e-5, rtol=1e-4)
    model = SetSinkformer(
        3,
        channels=16,
        num_heads=2,
        layer_norm=True,
        logit_scale="width",
        sinkhorn_marginals="uniform",
        pooling_projection=False,
    )
    assert model.pool.lin is None
    attentions = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    assert len(attentions) == 5  # two per ISAB and the pooling's: every one configured
    assert {(a.logit_scale, a.sinkhorn_marginals) for a in attentions} == {("width", "uniform")}


@pytest.mark.parametrize("n_iter", [1, 2, 7])
def test_reference_settings_give_the_reference_codes_model(n_iter: int) -> None:
    """With the settings of configs/modelnet10-reference.yaml the whole classifier (eval mode)
    is the reference code's ModelNetSink, transcribed here from its blocks: heads stacked on
    the batch axis, q and k divided by width^1/4, plan times V added to the projected
    queries, LN, O + relu(W O), LN; ISAB = MAB(X, MAB(I, X)); PMA = MAB(S, X); linear."""
    model = SetSinkformer(
        5, channels=16, num_heads=2, num_inducing_points=4, n_iter=n_iter, layer_norm=True,
        logit_scale="width", sinkhorn_marginals="uniform", pooling_projection=False,
    ).double().eval()  # fmt: skip
    _randomize_layer_norms(model)

    def reference_mab(mab: MultiheadAttentionBlock, queries: torch.Tensor, keys: torch.Tensor):
        attn, root = mab.attn, 16**0.25
        q, k, v = attn.lin_query(queries), attn.lin_key(keys), attn.lin_value(keys)
        q_, k_, v_ = (torch.cat(t.split(8, 2), 0) for t in (q, k, v))  # heads on the batch axis
        plan = _reference_code_plan(-(q_ / root) @ (k_ / root).transpose(1, 2), n_iter)
        out = torch.cat((q_ + plan @ v_).split(queries.shape[0], 0), 2)
        out = mab.norm_attn(out)
        return mab.norm_out(out + F.relu(mab.lin_out(out)))

    x = torch.randn(3, 50, 3, dtype=torch.float64)
    h = x
    for block in model.encoder:
        induced = reference_mab(block.mab_induce, block.inducing_points.repeat(3, 1, 1), h)
        h = reference_mab(block.mab_out, h, induced)
    pooled = reference_mab(model.pool.mab, model.pool.seeds.repeat(3, 1, 1), h)
    torch.testing.assert_close(model(x), model.head(pooled.flatten(1)))


@pytest.mark.parametrize(
    ("make", "inputs"),
    [
        (
            lambda **kw: lambda x: MultiheadAttention(3, 3, 16, 2, **kw)(x, x)[1],
            (torch.randn(2, 7, 3),),
        ),
        (lambda **kw: SetAttentionBlock(3, 16, 2, **kw), (torch.randn(2, 7, 3),)),
        (lambda **kw: InducedSetAttentionBlock(3, 16, 2, 4, **kw), (torch.randn(2, 7, 3),)),
        (lambda **kw: PoolingByMultiheadAttention(16, 2, 3, **kw), (torch.randn(2, 7, 16),)),
    ],
)
def test_blocks_default_to_the_models_sinkhorn_iterations(make, inputs) -> None:
    # A block dropped into another model without n_iter must be a Sinkformer block, not a
    # softmax block labelled "sinkhorn" (n_iter=1 is softmax).
    def output(**kwargs) -> torch.Tensor:
        torch.manual_seed(1)
        return make(**kwargs)(*inputs)

    default = output()
    torch.testing.assert_close(default, output(attention="sinkhorn", n_iter=5))
    assert not torch.allclose(default, output(attention="softmax"), atol=1e-4)


# PyTorch's own note that vmap runs its CPU SDPA (the softmax PMA) one sample at a time.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"local_neighbors": 4},
        {"num_groups": 32, "group_size": 8, "normalize_offsets": True},
        {"encoder": "sab", "pooling_attention": "softmax"},
    ],
)
def test_per_sample_gradients_with_torch_func(options: dict) -> None:
    # Per-sample gradients (vmap of grad, as in differentially private training or influence
    # estimates) of padded sets equal one backward pass per set. 256 points: SAB's 256 x 256
    # logits take the chunked backend, ISAB's 256 x 16 the dense one.
    from torch.func import functional_call, grad, vmap

    model = SetSinkformer(3, channels=16, num_heads=2, **options).double().eval()
    points = torch.randn(3, 256, 3, dtype=torch.float64)
    mask = torch.rand(3, 256) > 0.3
    mask[:, 0] = True
    labels = torch.tensor([0, 1, 2])

    def loss(params: dict, points: torch.Tensor, mask: torch.Tensor, label: torch.Tensor):
        logits = functional_call(model, params, (points[None], mask[None]))
        return F.cross_entropy(logits, label[None])

    params = {name: p.detach() for name, p in model.named_parameters()}
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, points, mask, labels)
    for i in range(3):
        model.zero_grad()
        loss(dict(model.named_parameters()), points[i], mask[i], labels[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("options", [{"num_groups": 8, "group_size": 4}, {"local_neighbors": 4}])
def test_forward_and_reverse_jacobians_agree_through_the_embeddings(options: dict) -> None:
    # Forward mode (jacfwd) through farthest-point sampling, k-NN grouping or EdgeConv and
    # Sinkhorn attention gives the reverse-mode Jacobian of the logits w.r.t. the points.
    from torch.func import jacfwd, jacrev

    model = SetSinkformer(3, channels=16, num_heads=2, **options).double().eval()
    points = torch.randn(1, 24, 3, dtype=torch.float64)
    forward = jacfwd(model)(points)
    torch.testing.assert_close(forward, jacrev(model)(points), atol=1e-12, rtol=1e-9)
    assert forward.abs().sum() > 0
