"""`selfflow data images`: an image-class folder -> latent shards through a tiny local AutoencoderKL."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.components.tokenizers.sd_vae import SDVAETokenizer
from selfflow.platform.data.images import center_crop_resize, encode_image_folder, load_image, scan_image_folder
from selfflow.platform.data.loader import read_index

torch.set_num_threads(1)
CLASSES = ("tabby", "beagle", "goldfish")  # deliberately unsorted: labels follow sorted names
SIZES = [(40, 24), (24, 40), (16, 16), (33, 20)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir()
        for i, (w, h) in enumerate(SIZES[: 2 + c]):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if i == 1:
                image.convert("L").save(folder / f"img{i}.png")  # grayscale: converted to RGB
            else:
                image.save(folder / f"img{i}.{'jpg' if i == 2 else 'png'}")
        (folder / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"")
    return root


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
def tokenizer(tiny_vae_dir) -> SDVAETokenizer:
    return SDVAETokenizer(str(tiny_vae_dir), image_size=16, downsample_factor=2, data_range=(-1.0, 1.0))


def read_shard_members(index_path: Path) -> list[dict]:
    index = json.loads(index_path.read_text())
    samples: dict[str, dict] = {}
    for shard in index["shards"]:
        with tarfile.open(index_path.parent / shard["file"]) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {"key": key})[extension] = data
    return [samples[key] for key in sorted(samples)]


def test_scan_sorts_classes_and_skips_non_images(image_root):
    folder = scan_image_folder(image_root)
    assert folder.classes == tuple(sorted(CLASSES))
    assert len(folder.files) == 2 + 3 + 4
    for path, label in zip(folder.files, folder.labels):
        assert path.parent.name == folder.classes[label] and path.suffix in (".png", ".jpg")


def test_center_crop_resize_keeps_the_centre(tmp_path):
    # 64x32: red outer quarters, blue centre half -> a 16 px crop is all blue.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :16, 0] = pixels[:, 48:, 0] = 255
    pixels[:, 16:48, 2] = 255
    out = center_crop_resize(Image.fromarray(pixels), 16)
    assert out.size == (16, 16)
    array = np.asarray(out).astype(int)
    assert array[..., 2].min() > 200 and array[..., 0].max() < 60
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    tensor = load_image(tmp_path / "wide.png", 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
    assert load_image(tmp_path / "wide.png", 16, channels=1).shape == (1, 16, 16)


def test_encoded_shards_hold_each_images_latent(image_root, tokenizer, tmp_path):
    index_path = encode_image_folder(image_root, tokenizer, tmp_path / "latents", split="train", shard_size=4,
                                     batch_size=3, dtype="float16", seed=0)
    index = read_index(index_path)
    assert index.total == 9 and index.shape == (4, 8, 8) and index.dtype == np.float16
    assert index.num_classes == 3 and len(index.shard_paths) == 3
    assert index.metadata["classes"] == sorted(CLASSES) and index.metadata["image_size"] == 16
    folder = scan_image_folder(image_root)
    samples = read_shard_members(index_path)
    files = [json.loads(sample["json"])["file"] for sample in samples]
    assert sorted(files) == sorted(p.relative_to(image_root).as_posix() for p in folder.files)
    assert files != sorted(files)  # written in a shuffled order, not class by class
    images = torch.stack([load_image(image_root / name, 16) for name in files])
    expected = tokenizer.encode_latents(images * 2 - 1)  # [0, 1] -> the tokenizer's (-1, 1)
    stored = torch.stack([torch.from_numpy(np.load(io.BytesIO(s["npy"]), allow_pickle=False).astype(np.float32))
                          for s in samples])
    torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage
    labels = [int(s["cls"]) for s in samples]
    assert labels == [sorted(CLASSES).index(Path(name).parts[0]) for name in files]

    again = encode_image_folder(image_root, tokenizer, tmp_path / "again", dtype="float32", seed=0, shard_size=100)
    assert read_index(again).dtype == np.float32
    assert [json.loads(s["json"])["file"] for s in read_shard_members(again)] == files  # same seed, same order
    other = encode_image_folder(image_root, tokenizer, tmp_path / "other", seed=1, shard_size=100)
    assert [json.loads(s["json"])["file"] for s in read_shard_members(other)] != files


def test_cli_encodes_with_a_tokenizer_gin_and_the_shards_train_through_latent_tokenizer(
        image_root, tiny_vae_dir, tmp_path, capsys):
    from selfflow.components.tokenizers.latents import LatentTokenizer
    from selfflow.platform.cli import main
    from selfflow.platform.data.sources import ShardData

    out = tmp_path / "shards"
    code = main([
        "data", "images", "--folder", str(image_root), "--tokenizer-gin", "tokenizers/sd_vae_ema.gin",
        "--out", str(out), "--shard-size", "5", "--batch-size", "4", "--quiet",
        "--gin_param", f"SDVAETokenizer.weights_path = '{tiny_vae_dir}'",
        "--gin_param", "SDVAETokenizer.image_size = 16", "--gin_param", "SDVAETokenizer.downsample_factor = 2",
    ])
    assert code == 0, capsys.readouterr().err
    assert "9 samples in 2 shards" in capsys.readouterr().out
    data = ShardData(root=str(out), num_classes=3, data_shape=(4, 8, 8), dataset="images", eval_split="train")
    batch = next(iter(data.loader(batch_size=4, seed=0)))
    decoder = SDVAETokenizer(str(tiny_vae_dir), image_size=16, downsample_factor=2)
    latent_tokenizer = LatentTokenizer((4, 8, 8), patch_size=2, decoder=decoder)
    tokens = latent_tokenizer.encode(batch["x"])
    assert tokens.shape == (4, 16, 16)
    torch.testing.assert_close(tokens, decoder.patchify(batch["x"] * 0.18215))  # the VAE's scaling applied
    assert latent_tokenizer.decode(tokens).shape == (4, 3, 16, 16)


@pytest.mark.parametrize("case, message", [
    ("missing_folder", "image folder not found"),
    ("no_classes", "no class subfolders"),
    ("missing_weights", "stabilityai/sd-vae-ft-ema"),
    ("not_an_autoencoder", "binds no autoencoder.tokenizer"),
])
def test_cli_errors_are_one_line(case, message, image_root, tiny_vae_dir, tmp_path, capsys):
    from selfflow.platform.cli import main

    folder, gin_file = str(image_root), "tokenizers/sd_vae_ema.gin"
    params = [f"SDVAETokenizer.weights_path = '{tiny_vae_dir}'", "SDVAETokenizer.image_size = 16",
              "SDVAETokenizer.downsample_factor = 2"]
    if case == "missing_folder":
        folder = str(tmp_path / "absent")
    elif case == "no_classes":
        (tmp_path / "flat").mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / "flat" / "a.png")
        folder = str(tmp_path / "flat")
    elif case == "missing_weights":
        params[0] = f"SDVAETokenizer.weights_path = '{tmp_path / 'nowhere'}'"
    else:
        gin_file, params = "tokenizers/pixels_patch2.gin", ["DATA_SHAPE = (3, 16, 16)"]
    argv = ["data", "images", "--folder", folder, "--tokenizer-gin", gin_file, "--out", str(tmp_path / "o"), "--quiet"]
    for param in params:
        argv += ["--gin_param", param]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
