import torch

from codir_ds.method.representations import layer_features, pool_tokens


def test_mean_pooling_ignores_padding():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool_tokens(hidden, mask, "mean")
    # Same sequences with 4 extra pad positions holding garbage values.
    padded_hidden = torch.cat([hidden, 100 * torch.randn(2, 4, 8, generator=g)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    torch.testing.assert_close(pool_tokens(padded_hidden, padded_mask, "mean"), pooled)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(dim=0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(dim=0))


def test_cls_pooling_takes_first_token():
    hidden = torch.randn(3, 4, 6)
    torch.testing.assert_close(pool_tokens(hidden, torch.ones(3, 4), "cls"), hidden[:, 0])


def test_layer_features_concatenate_chosen_layers_in_order():
    states = [torch.full((2, 3, 4), float(layer)) for layer in range(5)]
    feats = layer_features(states, [4, 2], torch.ones(2, 3), "mean")
    assert feats.shape == (2, 8)
    assert feats[0, :4].eq(4).all()
    assert feats[0, 4:].eq(2).all()
