import torch

from fastcache_compile import tokens


def test_saliency_and_bucket():
    x_hat = torch.zeros(1, 4, 2)
    x = x_hat.clone()
    x[0, 2] = torch.tensor([3.0, 4.0])
    assert tokens.saliency(x, x_hat).tolist() == [[0.0, 0.0, 25.0, 0.0]]
    buckets = (0.25, 0.5, 0.75, 1.0)
    assert [tokens.bucket_size(c, 64, buckets) for c in (0, 1, 16, 17, 48, 49, 64)] == [16, 16, 16, 32, 48, 64, 64]


def test_select_is_per_sample_and_sorted():
    sal = torch.tensor([[0.0, 5.0, 1.0, 9.0], [9.0, 0.0, 0.0, 1.0]])
    assert tokens.select(sal, 2).tolist() == [[1, 3], [0, 3]]


def test_gather_scatter_roundtrip():
    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[0, 4], [1, 2]])
    sub = tokens.gather(x, idx)
    assert torch.equal(sub[1, 0], x[1, 1])
    assert torch.equal(tokens.scatter(torch.zeros_like(x), idx, sub)[0, 4], x[0, 4])


def test_exact_duplicates_merge_and_unmerge_losslessly():
    base = torch.randn(2, 3, 8)
    h = torch.cat([base, base], dim=1)  # every token has an exact twin: 6 tokens, 3 distinct
    dens = tokens.knn_density(h, k=1)
    assert torch.allclose(dens, torch.ones_like(dens))  # twins are at distance 0
    merged, assign, _ = tokens.merge(h, tokens.importance(dens, torch.zeros_like(dens), 0.5), keep=3)
    assert merged.shape == (2, 3, 8)
    assert torch.allclose(tokens.unmerge(merged, assign), h, atol=1e-6)


def test_ratio_zero_is_identity():
    h = torch.randn(2, 6, 4)
    merged, assign, _ = tokens.merge(h, torch.rand(2, 6), keep=6)
    assert torch.equal(tokens.unmerge(merged, assign), h)


def test_no_cross_sample_mixing():
    h = torch.randn(2, 6, 4)
    h[1] += 100.0  # the second sample lives far away
    merged, assign, _ = tokens.merge(h, torch.rand(2, 6), keep=2)
    out = tokens.unmerge(merged, assign)
    # every reconstructed token of sample 0 is an average of sample-0 tokens only
    assert out[0].abs().max() < 50 and out[1].min() > 50
