"""Padded sets: masked Sinkhorn equals Sinkhorn on the unpadded set, in every layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pointsink import SetSinkformer, sinkhorn, sinkhorn_attention
from pointsink.attention import (
    MultiheadAttention,
    attention_marginals,
    attention_weights,
    scaled_dot_product_attention,
)
from pointsink.blocks import (
    InducedSetAttentionBlock,
    PoolingByMultiheadAttention,
    SetAttentionBlock,
)
from pointsink.sinkhorn_attention import dense_sinkhorn_attention

ATTENTIONS = [("softmax", 1), ("sinkhorn", 1), ("sinkhorn", 4), ("sinkhorn", 5)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _lengths_mask(lengths: list[int], size: int) -> torch.Tensor:
    """``(B, size)`` bool, True for the first ``lengths[b]`` elements of set ``b``."""
    return torch.arange(size)[None] < torch.tensor(lengths)[:, None]


def _scattered_mask(lengths: list[int], size: int) -> torch.Tensor:
    """Like :func:`_lengths_mask`, with the real elements at random places in each set."""
    rows = [torch.randperm(size)[:count] for count in lengths]
    mask = torch.zeros(len(lengths), size, dtype=torch.bool)
    for index, row in enumerate(rows):
        mask[index, row] = True
    return mask


# --- sinkhorn -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_iter", range(1, 10))
def test_masked_sinkhorn_is_sinkhorn_of_the_real_block(n_iter: int) -> None:
    logits = torch.randn(4, 9, 7, dtype=torch.float64) * 2
    query_mask = _scattered_mask([9, 4, 1, 6], 9)
    key_mask = _scattered_mask([7, 3, 5, 1], 7)
    weights = sinkhorn(logits, n_iter, query_mask=query_mask, key_mask=key_mask)
    for b in range(4):
        real = logits[b][query_mask[b]][:, key_mask[b]]
        block = weights[b][query_mask[b]][:, key_mask[b]]
        torch.testing.assert_close(block, sinkhorn(real, n_iter), rtol=0, atol=1e-12)
        # Padded rows and columns carry exactly nothing.
        assert weights[b][~query_mask[b]].abs().sum() == 0
        assert weights[b][:, ~key_mask[b]].abs().sum() == 0


def test_masked_sinkhorn_marginals() -> None:
    logits = torch.randn(3, 8, 6, dtype=torch.float64)
    query_mask = _lengths_mask([8, 5, 2], 8)
    key_mask = _lengths_mask([3, 6, 4], 6)
    real_n = query_mask.sum(-1, keepdim=True).double()
    real_m = key_mask.sum(-1, keepdim=True).double()
    rows = sinkhorn(logits, 9, query_mask=query_mask, key_mask=key_mask).sum(-1)
    torch.testing.assert_close(rows, query_mask.double())  # odd: rows exact
    columns = sinkhorn(logits, 8, query_mask=query_mask, key_mask=key_mask).sum(-2)
    torch.testing.assert_close(columns, key_mask * real_n / real_m)  # even: columns exact


def test_one_masked_iteration_is_masked_softmax() -> None:
    logits = torch.randn(2, 3, 5, 6)
    key_mask = _lengths_mask([4, 6], 6)[:, None]  # one mask for every head
    expected = logits.masked_fill(~key_mask[..., None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(sinkhorn(logits, 1, key_mask=key_mask), expected)
    torch.testing.assert_close(attention_weights(logits, "softmax", 1, key_mask=key_mask), expected)


def test_masked_sinkhorn_gradcheck() -> None:
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    query_mask = _lengths_mask([3, 5], 5)
    key_mask = _lengths_mask([4, 2], 4)
    assert torch.autograd.gradcheck(
        lambda s: sinkhorn(s, 4, query_mask=query_mask, key_mask=key_mask), (logits,)
    )
    sinkhorn(logits, 5, query_mask=query_mask, key_mask=key_mask).square().sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[1, :, 2:].abs().sum() == 0  # padded keys of set 1


def test_all_true_masks_change_nothing() -> None:
    logits = torch.randn(2, 5, 4)
    everything = sinkhorn(
        logits,
        5,
        query_mask=torch.ones(2, 5, dtype=torch.bool),
        key_mask=torch.ones(2, 4, dtype=torch.bool),
    )
    torch.testing.assert_close(everything, sinkhorn(logits, 5))


@pytest.mark.parametrize(
    ("query_mask", "key_mask", "error", "message"),
    [
        (torch.ones(2, 5, dtype=torch.int64), None, TypeError, "query_mask must be a bool"),
        (
            None,
            torch.ones(2, 5, dtype=torch.bool),
            ValueError,
            r"key_mask must have shape \(\.\.\., m\) = \(\.\.\., 4\)",
        ),
        (torch.ones(3, 5, dtype=torch.bool), None, ValueError, "each equal to it or 1"),
        (torch.ones(2, 2, 5, dtype=torch.bool), None, ValueError, "one leading dimension per"),
        (torch.ones(5, dtype=torch.bool), None, ValueError, "one leading dimension per"),
        (torch.ones(1, 5, dtype=torch.bool, device="meta"), None, ValueError, "is on meta"),
    ],
)
def test_bad_masks_name_themselves(query_mask, key_mask, error, message) -> None:
    with pytest.raises(error, match=message):
        sinkhorn(torch.randn(2, 5, 4), 3, query_mask=query_mask, key_mask=key_mask)


# --- sinkhorn_attention: the memory-efficient backend ---------------------------------------


def _padded_case(
    n: int, m: int, query_lengths: list[int], key_lengths: list[int], heads: int = 2
) -> tuple[torch.Tensor, ...]:
    batch = len(query_lengths)
    q = torch.randn(batch, heads, n, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, heads, m, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, heads, m, 3, dtype=torch.float64, requires_grad=True)
    return (
        q,
        k,
        v,
        _scattered_mask(query_lengths, n)[:, None],
        _scattered_mask(key_lengths, m)[:, None],
    )


@pytest.mark.parametrize("n_iter", range(1, 10))
@pytest.mark.parametrize(
    ("n", "m", "chunk_size"),
    [(11, 9, None), (11, 9, (4, 3)), (40, 16, (7, 5)), (16, 40, (5, 7))],
)
def test_chunked_masked_attention_is_attention_on_the_real_elements(
    n_iter: int, n: int, m: int, chunk_size: tuple[int, int] | None
) -> None:
    q, k, v, query_mask, key_mask = _padded_case(n, m, [n, 3, 1], [2, m, 5])
    out = sinkhorn_attention(
        q,
        k,
        v,
        n_iter,
        chunk_size=chunk_size,
        backend="chunked",
        query_mask=query_mask,
        key_mask=key_mask,
    )
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b in range(3):
        rows, cols = query_mask[b, 0], key_mask[b, 0]
        qb, kb, vb = q[b : b + 1, :, rows], k[b : b + 1, :, cols], v[b : b + 1, :, cols]
        expected = dense_sinkhorn_attention(qb, kb, vb, n_iter)
        torch.testing.assert_close(out[b : b + 1, :, rows], expected, rtol=0, atol=1e-10)
        assert out[b, :, ~rows].abs().sum() == 0
        expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out[b : b + 1, :, rows])
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            # Padded queries and keys get exactly zero gradient, as outside set b.
            torch.testing.assert_close(grad[b], expected_grad[b], rtol=0, atol=1e-10)


@pytest.mark.parametrize("which", ["query", "key"])
def test_chunked_one_sided_mask_matches_dense(which: str) -> None:
    q, k, v, query_mask, key_mask = _padded_case(13, 10, [13, 4], [10, 3])
    masks = {"query_mask": query_mask} if which == "query" else {"key_mask": key_mask}
    outputs = [
        sinkhorn_attention(q, k, v, 5, backend=backend, chunk_size=4, **masks)
        for backend in ("chunked", "dense")
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-10)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in outputs]
    for chunked, dense in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-10)


def test_masked_attention_higher_order_gradients_are_exact() -> None:
    q, k, v, query_mask, key_mask = _padded_case(6, 5, [6, 2], [3, 5])
    masks = {"query_mask": query_mask, "key_mask": key_mask}
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: sinkhorn_attention(q, k, v, 3, backend="chunked", chunk_size=2, **masks),
        (q, k, v),
    )
    # gradgradcheck compares the differentiable backward with itself; its first-order
    # gradients must also be the masked attention's (dense reference).
    dense = sinkhorn_attention(q, k, v, 3, backend="dense", **masks)
    expected = torch.autograd.grad(dense.square().sum(), (q, k, v))
    out = sinkhorn_attention(q, k, v, 3, backend="chunked", chunk_size=2, **masks)
    found = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
    for create_graph, reference in zip(found, expected, strict=True):
        torch.testing.assert_close(create_graph, reference, rtol=0, atol=1e-10)


def test_masked_attention_in_float32_and_bfloat16_autocast() -> None:
    q, k, v, query_mask, key_mask = (
        t.detach().float() if t.is_floating_point() else t
        for t in _padded_case(30, 20, [30, 7], [9, 20])
    )
    masks = {"query_mask": query_mask, "key_mask": key_mask}
    dense = sinkhorn_attention(q, k, v, 5, backend="dense", **masks)
    chunked = sinkhorn_attention(q, k, v, 5, backend="chunked", chunk_size=(8, 6), **masks)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sinkhorn_attention(q, k, v, 5, backend="chunked", **masks)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), dense, rtol=0.02, atol=0.02)


def test_attention_mask_shape_errors() -> None:
    q, k, v, query_mask, key_mask = _padded_case(5, 4, [5, 2], [4, 4])
    with pytest.raises(ValueError, match=r"query_mask must have shape \(\.\.\., n\)") as error:
        sinkhorn_attention(q, k, v, 3, query_mask=query_mask[:, 0])  # (B, n) for (B, H, n, d)
    assert "pass query_mask[:, None]" in str(error.value)
    with pytest.raises(TypeError, match="key_mask must be a bool"):
        sinkhorn_attention(q, k, v, 3, key_mask=key_mask.float())


# --- blocks and the model -------------------------------------------------------------------


def _blocks(attention: str, n_iter: int) -> list[torch.nn.Module]:
    return [
        SetAttentionBlock(5, 8, 2, attention, n_iter),
        InducedSetAttentionBlock(5, 8, 2, 3, attention, n_iter),
        PoolingByMultiheadAttention(5, 1, 2, attention, n_iter),
    ]


@pytest.mark.parametrize(("attention", "n_iter"), ATTENTIONS)
@pytest.mark.parametrize("efficient", [False, True])
def test_blocks_ignore_padding(
    attention: str, n_iter: int, efficient: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pointsink.attention as attention_module

    # Route every Sinkhorn attention through the dense reference or through the tiled kernel.
    monkeypatch.setattr(attention_module, "EFFICIENT_SINKHORN_MIN_SIZE", 1 if efficient else 10**9)
    lengths = [9, 4, 1]
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    mask = _scattered_mask(lengths, 9)
    x = x.masked_fill(~mask[..., None], 1e3)  # padding values that would show if they leaked
    for block in _blocks(attention, n_iter):
        block = block.double().eval()
        padded = block(x, mask)
        for b in range(3):
            alone = block(x[b : b + 1, mask[b]])
            if isinstance(block, PoolingByMultiheadAttention):
                torch.testing.assert_close(padded[b : b + 1], alone, rtol=0, atol=1e-10)
            else:
                torch.testing.assert_close(padded[b : b + 1, mask[b]], alone, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("attention", "n_iter"), [("softmax", 1), ("sinkhorn", 5)])
def test_nan_padding_leaves_each_blocks_gradients_finite(attention: str, n_iter: int) -> None:
    # Each block zeroes padded rows before its own projections: NaN left there would pass a
    # masked forward and poison the weights' gradients (0 * NaN), e.g. PMA's projection.
    mask = _scattered_mask([9, 4, 1], 9)
    x = torch.randn(3, 9, 5, dtype=torch.float64)
    for block in _blocks(attention, n_iter):
        block = block.double().eval()
        clean = block(x.masked_fill(~mask[..., None], 0.0), mask)
        out = block(x.masked_fill(~mask[..., None], float("nan")), mask)
        torch.testing.assert_close(out, clean, rtol=0, atol=0)
        out.sum().backward()
        for name, parameter in block.named_parameters():
            assert torch.isfinite(parameter.grad).all(), (type(block).__name__, name)


def test_padded_rows_do_not_count_in_sinkhorn_columns() -> None:
    # A block's Sinkhorn columns over real queries sum to n' / m'; a padded query left in
    # the column sums would change them.
    attn = MultiheadAttention(4, 4, 4, 1, "sinkhorn", 2).double()
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    mask = _lengths_mask([4], 6)
    attn.record_marginals = True
    attn(x, x, query_mask=mask, key_mask=mask)
    assert attn.last_marginals is not None
    _, columns = attn.last_marginals
    torch.testing.assert_close(columns[0, 0], torch.tensor([1.0, 1, 1, 1, 0, 0]))


def test_uniform_marginals_divide_by_the_real_set_size() -> None:
    attn = MultiheadAttention(4, 4, 4, 1, "sinkhorn", 3, sinkhorn_marginals="uniform").double()
    x = torch.randn(1, 6, 4, dtype=torch.float64)
    mask = _lengths_mask([4], 6)
    _, heads = attn(x, x, query_mask=mask, key_mask=mask)
    _, alone = attn(x[:, :4], x[:, :4])
    torch.testing.assert_close(heads[:, :4], alone)


@pytest.mark.parametrize("encoder", ["isab", "sab"])
@pytest.mark.parametrize(
    ("attention", "pooling"), [("sinkhorn", "softmax"), ("sinkhorn", None), ("softmax", None)]
)
def test_model_classifies_a_padded_set_as_the_set_itself(
    encoder: str, attention: str, pooling: str | None
) -> None:
    model = (
        SetSinkformer(
            num_classes=4,
            channels=8,
            num_heads=2,
            num_blocks=2,
            encoder=encoder,
            num_inducing_points=3,
            attention=attention,
            pooling_attention=pooling,
        )
        .double()
        .eval()
    )
    sizes = [20, 7, 13]
    clouds = [torch.randn(size, 3, dtype=torch.float64) for size in sizes]
    padded = torch.zeros(3, 20, 3, dtype=torch.float64)
    for index, cloud in enumerate(clouds):
        padded[index, : len(cloud)] = cloud
    logits = model(padded, _lengths_mask(sizes, 20))
    for index, cloud in enumerate(clouds):
        torch.testing.assert_close(logits[index], model(cloud[None])[0], rtol=0, atol=1e-10)
    # Without the mask the zero padding is part of the set: the logits change.
    assert not torch.allclose(model(padded)[1], logits[1])


@pytest.mark.parametrize(
    ("mask", "error", "message"),
    [
        (
            torch.ones(2, 9, dtype=torch.bool),
            ValueError,
            r"^mask must have shape \(batch, num_points\) = \(2, 10\)",
        ),
        (torch.ones(2, 10), TypeError, "^mask must be a bool"),
        ([[True] * 10] * 2, TypeError, "^mask must be a bool torch.Tensor .*; got list"),
    ],
)
def test_model_names_a_wrong_mask(mask: torch.Tensor, error: type, message: str) -> None:
    model = SetSinkformer(num_classes=2, channels=8, num_heads=2)
    with pytest.raises(error, match=message):
        model(torch.randn(2, 10, 3), mask)


def test_masked_softmax_attention_matches_sdpa_on_real_rows() -> None:
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    key_mask = _lengths_mask([6, 3], 6)[:, None]
    query_mask = _lengths_mask([6, 2], 6)[:, None]
    out = scaled_dot_product_attention(q, k, v, "softmax", query_mask=query_mask, key_mask=key_mask)
    expected = F.scaled_dot_product_attention(q[1:, :, :2], k[1:, :, :3], v[1:, :, :3])
    torch.testing.assert_close(out[1:, :, :2], expected)
    assert out[1, :, 2:].abs().sum() == 0
    dense = scaled_dot_product_attention(
        q, k, v, "softmax", efficient=False, query_mask=query_mask, key_mask=key_mask
    )
    torch.testing.assert_close(out, dense)


def test_attention_marginals_with_masks_count_real_elements_only() -> None:
    q, k = torch.randn(2, 1, 5, 3), torch.randn(2, 1, 4, 3)
    query_mask = _lengths_mask([5, 2], 5)[:, None]
    key_mask = _lengths_mask([4, 3], 4)[:, None]
    rows, columns = attention_marginals(
        q, k, "sinkhorn", 8, query_mask=query_mask, key_mask=key_mask
    )
    torch.testing.assert_close(columns[1, 0], torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0]))
    torch.testing.assert_close(rows[1, 0, 2:], torch.zeros(3))


# --- training on padded batches -------------------------------------------------------------


def _padded_loader(sizes: list[int], num_points: int = 12) -> torch.utils.data.DataLoader:
    """Sets of ``sizes`` points padded to ``num_points``, with a "mask" as a data module of
    sets of different sizes would give."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index, size in enumerate(sizes):
        label = index % 3
        points = torch.zeros(num_points, 3)
        points[:size] = torch.randn(size, 3, generator=generator) * (label + 1)
        mask = torch.arange(num_points) < size
        samples.append(
            {"points": points, "mask": mask, "label": torch.tensor(label), "index": index}
        )
    return torch.utils.data.DataLoader(samples, batch_size=4)


@pytest.mark.parametrize(
    "embedding",
    [{}, {"num_groups": 4, "group_size": 3, "normalize_offsets": True}],
    ids=["points", "set-abstraction"],
)
def test_lightning_module_trains_and_monitors_padded_batches(tmp_path, embedding) -> None:
    import pytorch_lightning as pl

    from pointsink.callbacks import DoublyStochasticMonitor
    from pointsink.module import SinkformerClassifier

    module = SinkformerClassifier(
        class_names=["a", "b", "c"],
        channels=8,
        num_heads=2,
        num_inducing_points=3,
        n_iter=2,
        **embedding,
    )
    loader = _padded_loader([12, 5, 9, 3, 7, 12, 4, 6])
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[DoublyStochasticMonitor(plot=False)],
    )
    trainer.fit(module, loader, loader)
    # Two iterations end on the columns: every real column sums to exactly n' / m', so the
    # deviation over real elements is 0 (padded columns, summing to 0, would count as 100 %).
    # With the set abstraction the blocks see its token mask (a set of 3 points: 3 tokens).
    deviations = {k: v for k, v in trainer.callback_metrics.items() if k.endswith("col_dev")}
    assert len(deviations) == 5
    assert max(float(v) for v in deviations.values()) < 1e-5
    # Prediction reads the mask too: a padded set gets the logits of the set alone.
    module.eval()
    batch = next(iter(loader))
    with torch.no_grad():
        padded = module.predict_step(batch, 0)["probabilities"]
        alone = module(batch["points"][1:2, :5]).softmax(-1)
    torch.testing.assert_close(padded[1:2], alone)


def test_region_mixing_leaves_padded_batches_unmixed_and_says_so_once() -> None:
    from pointsink.module import SinkformerClassifier

    module = SinkformerClassifier(
        class_names=["a", "b", "c"],
        channels=8,
        num_heads=2,
        num_inducing_points=3,
        mix_probability=1.0,
        dropout=0.0,
    )
    module.log = module.log_dict = lambda *args, **kwargs: None
    batch = next(iter(_padded_loader([12, 5, 9, 3])))
    with pytest.warns(UserWarning, match=r"region mixing .* padded point clouds .* not mixed"):
        loss = module.training_step(batch, 0)
    # Not mixed: the plain cross-entropy of the padded batch.
    smoothing = module.hparams.label_smoothing
    logits = module(batch["points"], batch["mask"])
    expected = F.cross_entropy(logits, batch["label"], label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.training_step(batch, 1)
    # A full batch is still mixed (mix_probability 1): its loss is not the plain one.
    full = {**batch, "points": torch.randn(4, 12, 3)}
    del full["mask"]
    plain = F.cross_entropy(module(full["points"]), full["label"], label_smoothing=smoothing)
    assert not torch.allclose(module.training_step(full, 2), plain)


# --- empty sets, non-finite padding, mask lifetime ------------------------------------------


def _case_with_empty_sets() -> tuple[torch.Tensor, ...]:
    """Three sets of :func:`_padded_case`: set 1 has no real query, set 2 no real key."""
    q, k, v, query_mask, key_mask = _padded_case(6, 5, [6, 3, 4], [5, 2, 3])
    query_mask[1] = False
    key_mask[2] = False
    return q, k, v, query_mask, key_mask


def _with_padding(
    value: float,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
) -> list[torch.Tensor]:
    """Leaf copies of ``q, k, v`` whose padded rows hold ``value``."""
    return [
        t.detach().masked_fill(~mask[..., None], value).requires_grad_()
        for t, mask in ((q, query_mask), (k, key_mask), (v, key_mask))
    ]


@pytest.mark.parametrize("backend", ["dense", "chunked"])
@pytest.mark.parametrize("n_iter", [1, 4, 5])
def test_a_set_without_real_elements_gives_zero_and_harms_no_other(
    backend: str, n_iter: int
) -> None:
    q, k, v, query_mask, key_mask = _case_with_empty_sets()
    out = sinkhorn_attention(
        q, k, v, n_iter, backend=backend, chunk_size=2, query_mask=query_mask, key_mask=key_mask
    )
    assert out[1:].abs().sum() == 0
    expected = dense_sinkhorn_attention(q[:1], k[:1], v[:1], n_iter, key_mask=key_mask[:1])
    torch.testing.assert_close(out[:1], expected, rtol=0, atol=1e-10)
    out.square().sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
        assert tensor.grad[1:].abs().sum() == 0


def test_empty_sets_leave_the_model_gradients_finite() -> None:
    model = SetSinkformer(num_classes=3, channels=8, num_heads=2, num_inducing_points=3).double()
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1] = False
    logits = model(torch.randn(3, 10, 3, dtype=torch.float64), mask)
    assert torch.isfinite(logits).all()
    logits[[0, 2]].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_sets_in_the_weights_are_zero() -> None:
    logits = torch.randn(2, 4, 3)
    key_mask = torch.tensor([[True, True, False], [False, False, False]])
    for attention, n_iter in [("softmax", 1), ("sinkhorn", 1), ("sinkhorn", 4)]:
        weights = attention_weights(logits, attention, n_iter, key_mask=key_mask)
        assert weights[1].abs().sum() == 0 and torch.isfinite(weights).all()


@pytest.mark.parametrize("backend", ["dense", "chunked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_padding_values_never_reach_a_result(backend: str, bad: float) -> None:
    q, k, v, query_mask, key_mask = _padded_case(7, 6, [4, 7], [5, 3])
    clean = sinkhorn_attention(
        q, k, v, 4, backend=backend, query_mask=query_mask, key_mask=key_mask
    )
    dirty = _with_padding(bad, q, k, v, query_mask, key_mask)
    out = sinkhorn_attention(*dirty, 4, backend=backend, query_mask=query_mask, key_mask=key_mask)
    torch.testing.assert_close(out, clean, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in dirty)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("function", ["sinkhorn", "dense", "chunked", "softmax", "softmax-sdpa"])
def test_nonfinite_padding_of_a_set_without_real_elements_never_reaches_a_gradient(
    function: str, bad: float
) -> None:
    # Such a set is computed as if all were real (prepare_masks); its padding must still be
    # zeroed first, or backward's 0 * nan makes its gradients NaN.
    q, k, v, query_mask, key_mask = _case_with_empty_sets()
    dirty = _with_padding(bad, q, k, v, query_mask, key_mask)
    masks = {"query_mask": query_mask, "key_mask": key_mask}
    if function in ("sinkhorn", "softmax"):
        real = query_mask[..., :, None] & key_mask[..., None, :]
        logits = torch.randn(3, 2, 6, 5, dtype=torch.float64).masked_fill(~real, bad)
        inputs = [logits.requires_grad_()]
        out = attention_weights(logits, function, 4, **masks)
    elif function == "softmax-sdpa":
        inputs = dirty
        out = scaled_dot_product_attention(*dirty, "softmax", **masks)
    else:
        inputs = dirty
        out = sinkhorn_attention(*dirty, 4, backend=function, chunk_size=2, **masks)
    assert torch.isfinite(out).all() and out[1:].abs().sum() == 0
    out.square().sum().backward()
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad[1:].abs().sum() == 0


@pytest.mark.parametrize(("attention", "n_iter"), [("softmax", 1), ("sinkhorn", 5)])
def test_nan_padding_leaves_the_model_and_its_gradients_finite(attention: str, n_iter: int) -> None:
    model = SetSinkformer(
        num_classes=3,
        channels=8,
        num_heads=2,
        num_inducing_points=3,
        attention=attention,
        n_iter=n_iter,
    ).double()
    model.eval()  # no dropout: the two calls are compared
    points = torch.randn(2, 9, 3, dtype=torch.float64)
    mask = _lengths_mask([9, 5], 9)
    clean = model(points, mask)
    logits = model(points.masked_fill(~mask[..., None], float("nan")), mask)
    torch.testing.assert_close(logits, clean)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["dense", "chunked"])
def test_changing_a_mask_in_place_before_backward_changes_nothing(backend: str) -> None:
    q, k, v = (torch.randn(2, 6, 4, requires_grad=True) for _ in range(3))
    grads = []
    for reuse in (False, True):
        key_mask = _lengths_mask([6, 3], 6)
        out = sinkhorn_attention(q, k, v, 4, backend=backend, key_mask=key_mask)
        if reuse:
            key_mask[1] = True  # a caller reusing its mask buffer for the next batch
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for before, after in zip(*grads, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_uniform_marginals_with_an_empty_set_keep_gradients_finite() -> None:
    model = SetSinkformer(
        num_classes=3, channels=8, num_heads=2, num_inducing_points=3, sinkhorn_marginals="uniform"
    ).double()
    model.eval()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    logits = model(torch.randn(2, 7, 3, dtype=torch.float64), mask)
    assert torch.isfinite(logits).all()
    logits[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_marginal_deviation_leaves_out_sets_without_real_queries() -> None:
    from pointsink.callbacks import marginal_deviation

    attn = MultiheadAttention(4, 4, 4, 1, "sinkhorn", 2).double()
    attn.record_marginals = True
    x, y = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    query_mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    attn(x, y, query_mask=query_mask)
    query, key = attn.last_masks
    columns, rows = marginal_deviation(*attn.last_marginals, query_mask=query, key_mask=key)
    # n_iter 2 ends on the columns: the one set with real queries is exact.
    assert float(columns) < 1e-12 and torch.isfinite(rows)


def test_unmasked_model_calls_its_blocks_with_the_points_alone() -> None:
    class Doubling(torch.nn.Module):  # a user's own encoder block, without a mask argument
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    model = SetSinkformer(num_classes=2, channels=8, num_heads=2, num_inducing_points=3).eval()
    model.encoder[1] = Doubling()
    assert model(torch.randn(2, 6, 3)).shape == (2, 2)


@pytest.mark.parametrize("n_iter", [1, 2, 5])
@pytest.mark.parametrize(("n", "m", "chunks"), [(1024, 16, (300, 7)), (16, 1024, (7, 300))])
def test_chunked_masks_at_isab_shapes(n_iter: int, n: int, m: int, chunks: tuple[int, int]) -> None:
    # ISAB's shapes: points attending to 16 inducing points, and the transpose.
    real_n, real_m = [n, n // 3], [m, m // 2 + 1]
    q, k, v, query_mask, key_mask = _padded_case(n, m, real_n, real_m, heads=2)
    out = sinkhorn_attention(
        q,
        k,
        v,
        n_iter,
        chunk_size=chunks,
        backend="chunked",
        query_mask=query_mask,
        key_mask=key_mask,
    )
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for b in range(2):
        rows, cols = query_mask[b, 0], key_mask[b, 0]
        expected = dense_sinkhorn_attention(
            q[b : b + 1, :, rows], k[b : b + 1, :, cols], v[b : b + 1, :, cols], n_iter
        )
        torch.testing.assert_close(out[b : b + 1, :, rows], expected, rtol=0, atol=1e-10)
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad[b], expected_grad[b], rtol=0, atol=1e-10)


def test_partial_clouds_benchmark_gives_both_methods_the_same_points() -> None:
    from _benchmark_utils import load_benchmark

    partial = load_benchmark("partial_clouds")
    cloud = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)).double().numpy()
    made = partial.inputs(cloud, 10, 32, seed=5)
    masked_points, mask = made["mask"]
    repeated, everything = made["repeat"]
    assert mask.sum() == 10 and everything.all() and (masked_points[10:] == 0).all()
    # The repeated cloud holds the same 10 points (normalized with the repeats, so compare
    # after normalizing its distinct points alone).
    distinct = np.unique(repeated.round(6), axis=0)
    assert len(distinct) == 10
    from pointsink.transforms import normalize_points

    renormalized = normalize_points(distinct.astype(np.float64))
    by_x = np.argsort(renormalized[:, 0])
    np.testing.assert_allclose(
        renormalized[by_x], masked_points[:10][np.argsort(masked_points[:10, 0])], atol=1e-4
    )


def test_per_head_query_masks_with_one_key_mask_for_all_heads() -> None:
    logits = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    query_mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    query_mask[..., 0] = True
    key_mask = _lengths_mask([4, 2], 4)[:, None]
    weights = sinkhorn(logits, 4, query_mask=query_mask, key_mask=key_mask)
    for b in range(2):
        for h in range(3):
            rows, cols = query_mask[b, h], key_mask[b, 0]
            expected = sinkhorn(logits[b, h][rows][:, cols], 4)
            torch.testing.assert_close(weights[b, h][rows][:, cols], expected)


def test_marginal_deviation_ignores_nan_in_left_out_positions() -> None:
    from pointsink.callbacks import marginal_deviation

    rows = torch.tensor([[1.0, float("nan")]])
    columns = torch.tensor([[0.5, 0.5, float("nan")]])
    query_mask, key_mask = torch.tensor([[True, False]]), torch.tensor([[True, True, False]])
    deviations = marginal_deviation(rows, columns, query_mask=query_mask, key_mask=key_mask)
    assert [float(d) for d in deviations] == [0.0, 0.0]
