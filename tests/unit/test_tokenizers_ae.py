"""Autoencoder tokenizers: latent normalisation, LatentTokenizer, SD-VAE (a tiny local AutoencoderKL), conv AE."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow.components.tokenizers.conv_ae import (
    ConvAETokenizer,
    ConvAutoencoder,
    fit_conv_autoencoder,
    latent_statistics,
    load_conv_autoencoder,
    save_conv_autoencoder,
)
from selfflow.components.tokenizers.latents import LatentNormalization, LatentTokenizer
from selfflow.components.tokenizers.sd_vae import SDVAETokenizer, WeightsNotFoundError

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parents[2]


def patchify_reference(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p): row-major grid, features (C, py, px)."""
    b, c, h, w = latents.shape
    tokens = [latents[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(b, -1)
              for i in range(h // p) for j in range(w // p)]
    return torch.stack(tokens, dim=1)


# ----- LatentNormalization / LatentTokenizer ---------------------------------------------------

def test_normalization_formula_and_inverse():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 5 + 1
    norm = LatentNormalization(2, scaling_factor=0.5, shift_factor=0.25, latent_mean=[1.0, -2.0], latent_std=[2.0, 4.0])
    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    std = torch.tensor([2.0, 4.0]).view(1, 2, 1, 1)
    expected = ((z - mean) / std - 0.25) * 0.5
    torch.testing.assert_close(norm.normalize(z), expected)
    torch.testing.assert_close(norm.denormalize(norm.normalize(z)), z)


@pytest.mark.parametrize("kwargs, message", [
    ({"latent_std": [1.0, 0.0]}, "latent_std must be positive"),
    ({"latent_mean": [1.0, 2.0, 3.0]}, "latent_mean must have 1 or 2 values"),
    ({"scaling_factor": 0.0}, "scaling_factor must be non-zero"),
    ({"shift_factor": float("nan")}, "shift_factor must be a finite number"),
])
def test_normalization_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatentNormalization(2, **kwargs)


def test_latent_tokenizer_encode_is_scaled_patchify():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    tokenizer = LatentTokenizer((4, 8, 8), patch_size=2, scaling_factor=0.18215, shift_factor=0.1)
    assert tokenizer.token_shape == (16, 16) and tokenizer.grid == (4, 4)
    tokens = tokenizer.encode(z)
    torch.testing.assert_close(tokens, patchify_reference((z - 0.1) * 0.18215, 2))
    torch.testing.assert_close(tokenizer.decode(tokens), z)  # no decoder: raw latents back


class RecordingDecoder:
    latent_shape = (4, 8, 8)
    data_range = (0.0, 1.0)

    def __init__(self, normalization=None):
        self.normalization = normalization
        self.seen = []

    def decode_latents(self, latents):
        self.seen.append(latents)
        return latents.mean(dim=1, keepdim=True)


def test_latent_tokenizer_chains_to_the_decoder_and_uses_its_normalization():
    decoder = RecordingDecoder(LatentNormalization(4, scaling_factor=0.5))
    tokenizer = LatentTokenizer((4, 8, 8), patch_size=2, decoder=decoder)
    assert tokenizer.normalization is decoder.normalization and tokenizer.data_range == (0.0, 1.0)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    tokens = tokenizer.encode(z)
    torch.testing.assert_close(tokens, patchify_reference(z * 0.5, 2))
    images = tokenizer.decode(tokens)
    torch.testing.assert_close(decoder.seen[-1], z)  # the decoder receives raw latents
    torch.testing.assert_close(images, z.mean(dim=1, keepdim=True))
    own = LatentTokenizer((4, 8, 8), patch_size=2, scaling_factor=2.0, decoder=decoder)
    assert own.normalization.scaling_factor == 2.0  # explicit statistics win


def test_latent_tokenizer_checks_its_decoder():
    with pytest.raises(ValueError, match="differs from the decoder's latent shape"):
        LatentTokenizer((4, 16, 16), decoder=RecordingDecoder())
    with pytest.raises(TypeError, match="decode_latents"):
        LatentTokenizer((4, 8, 8), decoder=object())


# ----- SD-VAE through a tiny AutoencoderKL saved locally ------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_vae(tiny_vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_vae_dir, local_files_only=True, low_cpu_mem_usage=False).eval()


def make_sd_tokenizer(folder, **kwargs) -> SDVAETokenizer:
    options = dict(image_size=16, downsample_factor=2, patch_size=2)
    options.update(kwargs)
    return SDVAETokenizer(str(folder), **options)


def test_sd_vae_shapes_and_lazy_loading(tiny_vae_dir):
    tokenizer = make_sd_tokenizer(tiny_vae_dir)
    assert tokenizer.latent_shape == (4, 8, 8) and tokenizer.token_shape == (16, 16) and tokenizer.grid == (4, 4)
    assert tokenizer._vae is None  # nothing loaded until the first encode
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert tokenizer.encode(images).shape == (3, 16, 16)
    assert tokenizer._vae is not None and not any(p.requires_grad for p in tokenizer.vae.parameters())


def test_sd_vae_matches_diffusers_encode_and_decode(tiny_vae_dir, reference_vae):
    tokenizer = make_sd_tokenizer(tiny_vae_dir, data_range=(0.0, 1.0), batch_size=2)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mean = reference_vae.encode(images * 2 - 1).latent_dist.mean  # posterior mean, not a sample
        tokens = tokenizer.encode(images)
        torch.testing.assert_close(tokens, patchify_reference(mean * 0.18215, 2), rtol=1e-5, atol=1e-5)
        decoded = tokenizer.decode(tokens)
        expected = (reference_vae.decode(mean).sample + 1) / 2
        torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)
        # Round trip = diffusers' own deterministic reconstruction (posterior mode).
        reconstruction = (reference_vae(images * 2 - 1, sample_posterior=False).sample + 1) / 2
        torch.testing.assert_close(tokenizer.decode(tokenizer.encode(images)), reconstruction, rtol=1e-4, atol=1e-4)


def test_sd_vae_data_range_is_only_an_input_mapping(tiny_vae_dir):
    images01 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    unit = make_sd_tokenizer(tiny_vae_dir, data_range=(0.0, 1.0))
    signed = make_sd_tokenizer(tiny_vae_dir, data_range=(-1.0, 1.0))
    torch.testing.assert_close(unit.encode_latents(images01), signed.encode_latents(images01 * 2 - 1))
    with pytest.raises(ValueError, match="takes images"):
        unit.encode(torch.zeros(1, 3, 32, 32))


def test_sd_vae_missing_weights_say_where_to_put_them(tmp_path):
    missing = tmp_path / "sd-vae-ft-ema"
    with pytest.raises(WeightsNotFoundError) as caught:
        SDVAETokenizer(str(missing))
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)
    assert "\n" not in message and "stabilityai/sd-vae-ft-ema" in message
    assert str(missing / "config.json") in message and "diffusion_pytorch_model.safetensors" in message


def test_sd_vae_rejects_files_and_mismatched_configs(tiny_vae_dir, tmp_path):
    single = tmp_path / "vae.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(ValueError, match="SD-VAE weights_path must be a folder"):
        SDVAETokenizer(str(single))
    with pytest.raises(ValueError, match="downsamples by 2"):
        SDVAETokenizer(str(tiny_vae_dir), image_size=16, downsample_factor=8)
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_sd_tokenizer(tiny_vae_dir, dtype="float64")


def test_sd_vae_on_meta_reads_nothing_and_refuses_to_load(tmp_path):
    with torch.device("meta"):
        tokenizer = SDVAETokenizer(str(tmp_path / "absent"))  # a config check: no disk access
        assert tokenizer.latent_shape == (4, 32, 32) and tokenizer.token_shape == (256, 16)
        with pytest.raises(RuntimeError, match="meta"):
            tokenizer.vae


def test_sd_vae_module_does_not_import_diffusers(tiny_vae_dir):
    code = ("import sys; from selfflow.components.tokenizers.sd_vae import SDVAETokenizer; "
            f"SDVAETokenizer({str(tiny_vae_dir)!r}, image_size=16, downsample_factor=2); "
            "assert 'diffusers' not in sys.modules, 'diffusers imported eagerly'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ----- conv autoencoder -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().images[:400] / 16.0, dtype=torch.float32).unsqueeze(1)


@pytest.fixture(scope="module")
def fitted(digit_images):
    model = ConvAutoencoder(latent_channels=4, hidden_channels=16, seed=0)
    with torch.no_grad():
        untrained_mse = torch.mean((model(digit_images) - digit_images) ** 2).item()
    metrics = fit_conv_autoencoder(model, digit_images[:300], steps=80, lr=3e-3, batch_size=64,
                                   generator=torch.Generator().manual_seed(0), test_images=digit_images[300:])
    return model, metrics, untrained_mse


def test_conv_ae_shapes():
    model = ConvAutoencoder(in_channels=1, image_size=8, latent_channels=4, downsample=1)
    assert model.latent_shape == (4, 4, 4)
    assert model.encode(torch.zeros(2, 1, 8, 8)).shape == (2, 4, 4, 4)
    assert model.decode(torch.zeros(2, 4, 4, 4)).shape == (2, 1, 8, 8)
    assert ConvAutoencoder(image_size=16, downsample=2).latent_shape == (4, 4, 4)
    with pytest.raises(ValueError, match="not divisible"):
        ConvAutoencoder(image_size=6, downsample=2)


def test_conv_ae_fit_learns_and_stores_latent_statistics(fitted, digit_images):
    model, metrics, untrained_mse = fitted
    assert metrics["train_mse"] < 0.5 * untrained_mse and metrics["test_mse"] < 0.5 * untrained_mse
    mean, std = latent_statistics(model, digit_images[:300])
    torch.testing.assert_close(model.latent_mean, mean)
    torch.testing.assert_close(model.latent_std, std)
    tokens = ConvAETokenizer(model).encode(digit_images[:300])  # normalised: unit variance per channel
    per_channel = tokens.reshape(-1, 4)
    torch.testing.assert_close(per_channel.mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(0), torch.ones(4), atol=1e-3, rtol=0)


def test_conv_ae_fit_is_reproducible(digit_images):
    weights = []
    for _ in range(2):
        model = ConvAutoencoder(hidden_channels=8, seed=3)
        fit_conv_autoencoder(model, digit_images[:64], steps=3, batch_size=16, generator=torch.Generator().manual_seed(7))
        weights.append(torch.cat([p.flatten() for p in model.state_dict().values()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    with pytest.raises(TypeError, match="generator"):
        fit_conv_autoencoder(ConvAutoencoder(), digit_images[:8], steps=1)


def test_conv_ae_tokenizer_round_trip_equals_the_autoencoder(fitted, digit_images):
    model, _, _ = fitted
    tokenizer = ConvAETokenizer(model, patch_size=1)
    assert tokenizer.token_shape == (16, 4) and tokenizer.grid == (4, 4) and tokenizer.data_range == (0.0, 1.0)
    images = digit_images[:5]
    with torch.no_grad():
        torch.testing.assert_close(tokenizer.decode(tokenizer.encode(images)), model(images), rtol=1e-5, atol=1e-5)


def test_conv_ae_save_load_round_trip(fitted, tmp_path, digit_images):
    model, _, _ = fitted
    path = save_conv_autoencoder(model, tmp_path / "ae" / "conv.pt")
    assert [p.name for p in path.parent.iterdir()] == ["conv.pt"]  # atomic: no temp files left
    with torch.device("meta"):  # a loader returns real weights even inside a meta config check
        loaded = load_conv_autoencoder(path)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded.latent_std, model.latent_std)
    with torch.no_grad():
        torch.testing.assert_close(loaded(digit_images[:4]), model(digit_images[:4]))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ConvAutoencoder file"):
        load_conv_autoencoder(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="fit_conv_autoencoder"):
        load_conv_autoencoder(tmp_path / "absent.pt")


# ----- platform glue: gin training job, loader, CLI ---------------------------------------------

def test_conv_ae_from_names_the_training_command(tmp_path):
    from selfflow.platform.config.loaders import conv_ae_from
    from selfflow.platform.errors import UserError

    with pytest.raises(UserError, match=r"selfflow autoencoder --gin_file tokenizers/conv_ae_digits_train\.gin"):
        conv_ae_from(str(tmp_path / "conv_ae_digits.pt"))


def test_autoencoder_cli_trains_from_the_shipped_gin(in_tmp, capsys):
    from selfflow.platform.cli import main
    from selfflow.platform.config.loaders import conv_ae_from

    code = main(["autoencoder", "--gin_file", "tokenizers/conv_ae_digits_train.gin",
                 "--gin_param", "AutoencoderTraining.steps = 3", "--gin_param", "AutoencoderTraining.hidden_channels = 8"])
    assert code == 0, capsys.readouterr().err
    assert "runs/autoencoders/conv_ae_digits.pt" in capsys.readouterr().out
    tokenizer = conv_ae_from("runs/autoencoders/conv_ae_digits.pt")
    assert tokenizer.latent_shape == (4, 4, 4) and tokenizer.token_shape == (16, 4)
    assert not torch.equal(tokenizer.autoencoder.latent_std, torch.ones(4))  # statistics were measured


# ----- the 1-D (waveform) conv autoencoder ------------------------------------------------------

def tones(count: int, length: int = 256, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    freqs = 0.05 + 0.2 * torch.rand(count, 1, generator=generator)
    phases = 6.28 * torch.rand(count, 1, generator=generator)
    return (0.8 * torch.sin(freqs * torch.arange(length) + phases))[:, None]


def test_conv_ae_1d_shapes_layers_and_checks():
    model = ConvAutoencoder(in_channels=1, image_size=256, latent_channels=8, downsample=3, data_range=(-1.0, 1.0),
                            dims=1)
    assert model.image_shape == (1, 256) and model.latent_shape == (8, 32)
    assert all(not isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert model.encode(torch.zeros(2, 1, 256)).shape == (2, 8, 32)
    assert model.decode(torch.zeros(2, 8, 32)).shape == (2, 1, 256)
    with pytest.raises(ValueError, match=r"\(B, 1, 256\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="dims must be 1"):
        ConvAutoencoder(dims=4)
    tokenizer = ConvAETokenizer(model, patch_size=4)
    assert tokenizer.token_shape == (8, 32) and tokenizer.grid == (8,)


def fit_then_reload(model: ConvAutoencoder, data: torch.Tensor, train: int, path, steps: int,
                    batch_size: int) -> ConvAutoencoder:
    """Fit on data[:train]; the held-out MSE must fall below a fifth of the untrained one, and the
    saved file must reload into the same function. Returns the reloaded autoencoder."""
    with torch.no_grad():
        untrained = torch.mean((model(data) - data) ** 2).item()
    metrics = fit_conv_autoencoder(model, data[:train], steps=steps, lr=3e-3, batch_size=batch_size,
                                   generator=torch.Generator().manual_seed(0), test_images=data[train:])
    assert metrics["test_mse"] < 0.2 * untrained
    loaded = load_conv_autoencoder(save_conv_autoencoder(model, path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[:4]), model(data[:4]))
    return loaded


def test_conv_ae_1d_learns_waveforms_and_survives_save_load(tmp_path):
    model = ConvAutoencoder(image_size=256, latent_channels=4, hidden_channels=16, downsample=2,
                            data_range=(-1.0, 1.0), dims=1)
    loaded = fit_then_reload(model, tones(96), 64, tmp_path / "audio.pt", steps=150, batch_size=32)
    assert loaded.dims == 1 and loaded.latent_shape == (4, 64)


def test_autoencoder_cli_trains_the_audio_preset(in_tmp, spoken_digits_root, capsys):
    from selfflow.platform.cli import main
    from selfflow.platform.config.loaders import conv_ae_from

    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    code = main(["autoencoder", "--gin_file", "tokenizers/conv_ae_audio_train.gin",
                 "--gin_param", "AutoencoderTraining.steps = 2", "--gin_param", "AutoencoderTraining.hidden_channels = 4"])
    assert code == 0, capsys.readouterr().err
    tokenizer = conv_ae_from("runs/autoencoders/conv_ae_audio.pt", patch_size=4)
    assert tokenizer.latent_shape == (8, 320) and tokenizer.token_shape == (80, 32)
    assert tokenizer.decode(tokenizer.encode(torch.zeros(2, 1, 5120))).shape == (2, 1, 5120)


# ----- the 3-D (video) conv autoencoder ---------------------------------------------------------

def moving_squares(count: int, frames: int = 4, side: int = 8, seed: int = 0) -> torch.Tensor:
    """(count, 1, frames, side, side): a 3x3 square moving one pixel a frame to the right."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, side - 2, (count,), generator=generator)
    cols = torch.randint(0, side - 2 - frames, (count,), generator=generator)
    clips = torch.zeros(count, 1, frames, side, side)
    for n in range(count):
        for frame in range(frames):
            clips[n, 0, frame, rows[n]:rows[n] + 3, cols[n] + frame:cols[n] + frame + 3] = 1.0
    return clips


def test_conv_ae_3d_shapes_per_axis_sizes_and_checks():
    model = ConvAutoencoder(image_size=(8, 16, 16), latent_channels=8, hidden_channels=4, downsample=2, dims=3)
    assert model.image_shape == (1, 8, 16, 16) and model.latent_shape == (8, 2, 4, 4)
    assert any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
    assert model.encode(torch.zeros(2, 1, 8, 16, 16)).shape == (2, 8, 2, 4, 4)
    assert model.decode(torch.zeros(2, 8, 2, 4, 4)).shape == (2, 1, 8, 16, 16)
    assert ConvAutoencoder(image_size=8, downsample=1, dims=3).latent_shape == (4, 4, 4, 4)
    with pytest.raises(ValueError, match="one per axis"):
        ConvAutoencoder(image_size=(8, 16), dims=3)
    with pytest.raises(ValueError, match="not divisible"):
        ConvAutoencoder(image_size=(6, 16, 16), downsample=2, dims=3)
    tokenizer = ConvAETokenizer(model, patch_size=1)
    assert tokenizer.token_shape == (32, 8) and tokenizer.grid == (2, 4, 4)
    assert tokenizer.decode(tokenizer.encode(torch.zeros(3, 1, 8, 16, 16))).shape == (3, 1, 8, 16, 16)


def test_conv_ae_3d_learns_clips_and_survives_save_load(tmp_path):
    model = ConvAutoencoder(image_size=(4, 8, 8), latent_channels=4, hidden_channels=8, downsample=1, dims=3)
    loaded = fit_then_reload(model, moving_squares(48), 32, tmp_path / "video.pt", steps=120, batch_size=16)
    assert loaded.dims == 3 and loaded.image_shape == (1, 4, 8, 8) and loaded.latent_shape == (4, 2, 4, 4)
