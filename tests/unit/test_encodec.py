"""EnCodec tokenizer on the `encodec` package: the real loading path (a checkpoint file named the way
Meta publishes it, '<name>-<sha256 prefix>.th', in a local folder) with randomly initialised weights,
continuous latents re-derived from the encoder, and one-line errors for a missing folder, a missing
file and a failed checksum."""
import hashlib

import pytest
import torch

from selfflow.components.tokenizers.encodec import (
    CHECKPOINTS,
    EncodecTokenizer,
    WeightsNotFoundError,
    build_encodec,
    checkpoint_file,
)
from selfflow.components.tokenizers.patchify import Patchify

SHAPE = (1, 3200)  # 10 EnCodec frames at 24 kHz


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    """A folder holding a (random) 24 kHz state dict under a checksummed name, as Meta publishes them."""
    model = build_encodec("encodec_24khz", repository=None, seed=3)
    folder = tmp_path_factory.mktemp("encodec")
    staging = folder / "staging.th"
    torch.save(model.state_dict(), staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    name = f"encodec_24khz-{prefix}.th"
    staging.rename(folder / name)
    return folder, name, model


def test_published_checkpoint_name_carries_its_checksum():
    spec = CHECKPOINTS["encodec_24khz"]
    assert spec.file == "encodec_24khz-d7cc33bc.th"  # encodec 0.1.1's EncodecModel.encodec_model_24khz
    assert (spec.sample_rate, spec.latent_channels, spec.hop_length) == (24000, 128, 320)


def test_tokens_are_normalised_continuous_encoder_latents(checkpoint_folder):
    folder, name, model = checkpoint_folder
    mean, std = [0.1] * 128, [2.0] * 128
    tokenizer = EncodecTokenizer(folder, data_shape=SHAPE, checkpoint=name, patch_size=2,
                                 latent_mean=mean, latent_std=std, data_range=(0.0, 2.0))
    audio = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2.0  # in [0, 2]
    with torch.no_grad():
        latents = model.encoder(audio - 1.0)  # data_range (0, 2) -> EnCodec's [-1, 1]
    assert tokenizer.latent_shape == (128, 10) and tokenizer.token_shape == (5, 256)
    tokens = tokenizer.encode(audio)
    assert torch.allclose(tokens, Patchify((128, 10), 2)((latents - 0.1) / 2.0), atol=1e-5)
    with torch.no_grad():
        decoded = model.decoder(latents)[..., :SHAPE[1]] + 1.0
    assert torch.allclose(tokenizer.decode(tokens), decoded, atol=1e-4)
    stats = tokenizer.latent_statistics(audio)
    per_channel = latents.transpose(0, 1).reshape(128, -1)
    assert torch.allclose(torch.tensor(stats["latent_mean"]), per_channel.mean(1), atol=1e-5)
    assert torch.allclose(torch.tensor(stats["latent_std"]), per_channel.std(1), atol=1e-5)


def test_missing_folder_missing_file_and_bad_checksum_fail_in_one_line(checkpoint_folder, tmp_path):
    folder, name, _ = checkpoint_folder
    with pytest.raises(WeightsNotFoundError, match="folder .*nothing does not exist") as missing:
        EncodecTokenizer(tmp_path / "nothing", data_shape=SHAPE)
    assert "\n" not in str(missing.value)
    with pytest.raises(WeightsNotFoundError, match="encodec_24khz-d7cc33bc.th not found") as absent:
        EncodecTokenizer(folder, data_shape=SHAPE)  # the published name is not in this folder
    assert "\n" not in str(absent.value)
    corrupt = tmp_path / "encodec_24khz-0123abcd.th"
    corrupt.write_bytes((folder / name).read_bytes()[:-10])
    with pytest.raises(ValueError, match="fails its checksum: sha256 starts with [0-9a-f]{8}, the name says 0123abcd"):
        checkpoint_file(tmp_path, corrupt.name)
    tokenizer = EncodecTokenizer(tmp_path, data_shape=SHAPE, checkpoint=corrupt.name)  # checked on first use
    with pytest.raises(ValueError, match="fails its checksum"):
        tokenizer.encode(torch.zeros(1, *SHAPE))
    with pytest.raises(ValueError, match="carries no checksum"):
        checkpoint_file(folder, "encodec.th")


def test_bad_shapes_fail_in_one_line(checkpoint_folder):
    folder, name, _ = checkpoint_folder
    with pytest.raises(ValueError, match="whole number of EnCodec frames"):
        EncodecTokenizer(folder, data_shape=(1, 3201), checkpoint=name)
    with pytest.raises(ValueError, match="takes 1 audio channel"):
        EncodecTokenizer(folder, data_shape=(2, 3200), checkpoint=name)
    with pytest.raises(ValueError, match=r"waveforms \(B, 1, 3200\)"):
        EncodecTokenizer(folder, data_shape=SHAPE, checkpoint=name).encode(torch.zeros(2, 2, 3200))


def test_meta_build_reads_nothing_and_random_init_says_so(tmp_path):
    with torch.device("meta"):
        tokenizer = EncodecTokenizer(tmp_path / "absent", data_shape=(1, 15360))
    assert tokenizer.token_shape == (48, 128)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        random = EncodecTokenizer(None, data_shape=SHAPE, random_init_for_tests=True)
    assert "RANDOM" in repr(random)
    state = torch.random.get_rng_state()
    assert random.encode(torch.zeros(2, *SHAPE)).shape == (2, 10, 128)
    assert torch.equal(torch.random.get_rng_state(), state)  # building it drew from its own seed


def test_importing_the_tokenizer_does_not_import_encodec_or_torchaudio():
    import subprocess
    import sys

    code = ("import sys; from selfflow.components.tokenizers.encodec import EncodecTokenizer; "
            "print('encodec' in sys.modules, 'torchaudio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"  # both load only when EnCodec is actually used
