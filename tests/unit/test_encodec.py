"""EnCodec tokenizer: the real loading path (a transformers folder on disk) with a tiny randomly
initialised model, continuous latents re-derived from the encoder, and one-line errors."""
import pytest
import torch

from selfflow.components.tokenizers.encodec import EncodecTokenizer, WeightsNotFoundError
from selfflow.components.tokenizers.patchify import Patchify

TINY = {"sampling_rate": 8000, "hidden_size": 16, "num_filters": 4, "upsampling_ratios": [4, 2],
        "num_residual_layers": 1, "codebook_size": 32, "codebook_dim": 16, "target_bandwidths": [1.5]}
HOP = 8
SHAPE = (1, 640)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A folder in the layout `hf download facebook/encodec_24khz` writes: config.json + model.safetensors."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig(**TINY)).eval()
    folder = tmp_path_factory.mktemp("encodec_tiny")
    model.save_pretrained(folder)
    return folder, model


def tiny_tokenizer(folder, **overrides):
    options = dict(data_shape=SHAPE, sample_rate=8000, latent_channels=16, hop_length=HOP, patch_size=2)
    options.update(overrides)
    return EncodecTokenizer(str(folder), **options)


def test_tokens_are_normalised_continuous_encoder_latents(tiny_folder):
    folder, model = tiny_folder
    mean, std = [0.1] * 16, [2.0] * 16
    tokenizer = tiny_tokenizer(folder, latent_mean=mean, latent_std=std, data_range=(0.0, 2.0))
    audio = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2.0  # in [0, 2]
    with torch.no_grad():
        latents = model.encoder(audio - 1.0)  # data_range (0, 2) -> EnCodec's [-1, 1]
    assert tokenizer.latent_shape == (16, 640 // HOP) and tokenizer.token_shape == (40, 32)
    expected = Patchify((16, 80), 2)((latents - 0.1) / 2.0)
    tokens = tokenizer.encode(audio)
    assert torch.allclose(tokens, expected, atol=1e-5)
    with torch.no_grad():
        decoded = model.decoder(latents)[..., :640] + 1.0
    assert torch.allclose(tokenizer.decode(tokens), decoded, atol=1e-4)
    stats = tokenizer.latent_statistics(audio)
    per_channel = latents.transpose(0, 1).reshape(16, -1)
    assert torch.allclose(torch.tensor(stats["latent_mean"]), per_channel.mean(1), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["latent_std"]), per_channel.std(1), atol=1e-5)


def test_missing_or_mismatched_weights_fail_in_one_line(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    with pytest.raises(WeightsNotFoundError, match="hf download facebook/encodec_24khz") as missing:
        tiny_tokenizer(tmp_path / "nothing")
    assert "\n" not in str(missing.value)
    with pytest.raises(ValueError, match=r"sampling_rate 8000 \(configured 24000\)"):
        tiny_tokenizer(folder, sample_rate=24000)
    with pytest.raises(ValueError, match="whole number of EnCodec frames"):
        tiny_tokenizer(folder, data_shape=(1, 641))
    with pytest.raises(ValueError, match=r"waveforms \(B, 1, 640\)"):
        tiny_tokenizer(folder).encode(torch.zeros(2, 2, 640))


def test_meta_build_reads_nothing_and_random_init_says_so(tmp_path):
    with torch.device("meta"):
        tokenizer = EncodecTokenizer(str(tmp_path / "absent"), data_shape=(1, 15360))
    assert tokenizer.token_shape == (48, 128)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        random = EncodecTokenizer(None, data_shape=(1, 3200), random_init_for_tests=True)
    assert "RANDOM" in repr(random)
    assert random.encode(torch.zeros(2, 1, 3200)).shape == (2, 10, 128)


def test_importing_the_tokenizer_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys; from selfflow.components.tokenizers.encodec import EncodecTokenizer; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # a 10 s import only when EnCodec is actually used
