import pytest
import torch

from selfflow.components.tokenizers.patchify import Patchify
from selfflow.components.tokenizers.pixels import PixelTokenizer


def test_patchify_2d_layout_matches_formula():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patch = Patchify((3, 4, 6), 2)
    tokens = patch(x)
    assert patch.grid == (2, 3) and tokens.shape == (2, 6, 12)
    for b in range(2):
        for gy in range(2):
            for gx in range(3):
                expected = x[b, :, 2 * gy:2 * gy + 2, 2 * gx:2 * gx + 2].reshape(-1)
                assert torch.equal(tokens[b, gy * 3 + gx], expected)


@pytest.mark.parametrize("shape,patch", [((2, 16), 4), ((3, 8, 8), 2), ((1, 4, 6, 6), (2, 3, 3))])
def test_patchify_round_trip(shape, patch):
    p = Patchify(shape, patch)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.inverse(p(x)), x)


def test_patchify_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divide"):
        Patchify((1, 8, 8), 3)
    with pytest.raises(ValueError, match="latent_shape"):
        Patchify((8,), 2)


def test_pixel_tokenizer_normalises_and_inverts():
    tok = PixelTokenizer((1, 8, 8), 2, (0.0, 1.0))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens = tok.encode(x)
    assert tokens.shape == (4, 16, 4) and tok.token_shape == (16, 4) and tok.grid == (4, 4)
    assert tokens.min() >= -1 and tokens.max() <= 1
    assert torch.allclose(tokens[0, 0], (x[0, 0, :2, :2].reshape(-1) - 0.5) / 0.5)
    assert torch.allclose(tok.decode(tokens), x, atol=1e-6)


def test_pixel_scaling_factor_multiplies_the_normalised_values_and_decode_inverts_it():
    x = torch.rand(3, 1, 160, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scaled = PixelTokenizer((1, 160), 80, (-1.0, 1.0), scaling_factor=7.5)
    plain = PixelTokenizer((1, 160), 80, (-1.0, 1.0))
    torch.testing.assert_close(scaled.encode(x), 7.5 * plain.encode(x))
    torch.testing.assert_close(scaled.decode(scaled.encode(x)), x)
    with pytest.raises(ValueError, match="scaling_factor must be a positive number"):
        PixelTokenizer((1, 160), 80, (-1.0, 1.0), scaling_factor=0)
