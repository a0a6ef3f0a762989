"""Shard writer and the safe, deterministic, resumable shard reader."""
import io
import json
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from selfflow.components.datasets.digits import load_digits_split
from selfflow.platform.data import DataError
from selfflow.platform.data.loader import ShardDataset, load_split_arrays, make_loader, read_index
from selfflow.platform.data.shards import build_digits_shards, write_shards

torch.set_num_threads(1)

NUM_SHARDS, PER_SHARD, NUM_CLASSES = 8, 6, 3
TOTAL = NUM_SHARDS * PER_SHARD


def synthetic_samples(count, num_classes=NUM_CLASSES):
    """Sample i holds the array [i, i] and label i % num_classes, so batches reveal sample ids."""
    for i in range(count):
        yield {"__key__": f"s{i:04d}", "npy": np.full((2,), i, np.float32), "cls": i % num_classes, "json": {"i": i}}


def write_synthetic(folder, count=TOTAL, per_shard=PER_SHARD, num_classes=NUM_CLASSES):
    return write_shards(synthetic_samples(count, num_classes), folder, "train", per_shard, {"kind": "synthetic"},
                        num_classes=num_classes)


def ids(batches):
    return [int(v) for batch in batches for v in batch["x"][:, 0]]


def take(loader, count):
    return [next(loader) for _ in range(count)]


def write_tar(path, members):
    """A tar built by hand: members is a list of (name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def synthetic(tmp_path):
    return write_synthetic(tmp_path / "shards")


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory):
    return build_digits_shards(tmp_path_factory.mktemp("digits"), seed=0)


# ---------------------------------------------------------------- writer


def test_writer_index_lists_shards_counts_shape_and_metadata(synthetic):
    index = json.loads(synthetic.read_text())
    assert synthetic.name == "train.index.json"
    assert [shard["file"] for shard in index["shards"]] == [f"train-{i:06d}.tar" for i in range(NUM_SHARDS)]
    assert [shard["count"] for shard in index["shards"]] == [PER_SHARD] * NUM_SHARDS
    assert index["total"] == TOTAL and index["num_classes"] == NUM_CLASSES
    assert index["shape"] == [2] and np.dtype(index["dtype"]) == np.float32
    assert index["metadata"] == {"kind": "synthetic"}
    with tarfile.open(synthetic.parent / "train-000000.tar") as tar:
        assert sorted(tar.getnames())[:3] == ["s0000.cls", "s0000.json", "s0000.npy"]
        assert json.loads(tar.extractfile("s0000.json").read()) == {"i": 0}


def test_writer_rejects_a_label_outside_num_classes(tmp_path):
    with pytest.raises(ValueError, match="label 5 outside"):
        write_shards([{"__key__": "a", "npy": np.zeros(2, np.float32), "cls": 5}], tmp_path, "train", 4,
                     num_classes=3)
    assert not (tmp_path / "train.index.json").exists()


def test_interrupted_writer_leaves_no_index_and_keeps_the_previous_set(tmp_path):
    def failing_samples():
        for number, sample in enumerate(synthetic_samples(TOTAL)):
            if number == 20:
                raise RuntimeError("interrupted")
            yield sample

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="interrupted"):
        write_shards(failing_samples(), fresh, "train", PER_SHARD, num_classes=NUM_CLASSES)
    assert list(fresh.iterdir()) == []  # no index, no shards, no staging folder

    existing = tmp_path / "existing"
    write_synthetic(existing, count=12)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_shards(failing_samples(), existing, "train", PER_SHARD, num_classes=NUM_CLASSES)
    assert read_index(existing, "train").total == 12
    assert sorted(p.name for p in existing.iterdir()) == ["train-000000.tar", "train-000001.tar", "train.index.json"]


# ---------------------------------------------------------------- round trip


def test_digits_round_trip_in_index_order_and_through_one_epoch(digits_sets):
    for split, summary in digits_sets.items():
        x, y = load_split_arrays(summary.index_path)
        expected_x, expected_y = load_digits_split(split, seed=0)
        np.testing.assert_array_equal(x, expected_x)
        np.testing.assert_array_equal(y, expected_y)
    assert digits_sets["train"].total + digits_sets["test"].total == 1797
    assert len(digits_sets["train"].shard_paths) == 8 and len(digits_sets["test"].shard_paths) == 2

    # One epoch of the 360 test images with batch 40 and one reader: each image exactly once.
    dataset = ShardDataset(digits_sets["test"].index_path, batch_size=40, seed=0)
    loader = make_loader(dataset, num_workers=0)
    batches = take(loader, 9)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_in_epoch"] == 0
    assert all(b["x"].shape == (40, 1, 8, 8) and b["x"].dtype == torch.float32 for b in batches)
    assert all(b["y"].dtype == torch.int64 for b in batches)
    got = Counter(
        (xi.numpy().tobytes(), int(yi)) for b in batches for xi, yi in zip(b["x"], b["y"])
    )
    expected_x, expected_y = load_digits_split("test", seed=0)
    assert got == Counter((xi.tobytes(), int(yi)) for xi, yi in zip(expected_x, expected_y))


def test_labels_travel_with_their_arrays(synthetic):
    loader = make_loader(ShardDataset(synthetic, batch_size=4, seed=1), num_workers=0)
    for batch in take(loader, 5):
        assert torch.equal(batch["y"], batch["x"][:, 0].long() % NUM_CLASSES)
        assert torch.equal(batch["x"][:, 0], batch["x"][:, 1])


# ---------------------------------------------------------------- determinism and splitting


def test_same_seed_same_batches_other_seed_other_order(synthetic):
    def sequence(seed):
        return ids(take(make_loader(ShardDataset(synthetic, batch_size=3, seed=seed), num_workers=0), 40))

    first, again, other = sequence(5), sequence(5), sequence(6)  # 40 batches = 2.5 epochs
    assert first == again
    assert first != other
    epoch0, epoch1 = first[:TOTAL], first[TOTAL:2 * TOTAL]
    assert sorted(epoch0) == sorted(epoch1) == list(range(TOTAL))  # each sample once per epoch
    assert epoch0 != epoch1  # every epoch is reshuffled


def test_two_workers_give_the_same_epoch_multiset_reproducibly(synthetic):
    dataset = ShardDataset(synthetic, batch_size=3, seed=2)
    steps = dataset.batches_per_epoch(0, num_workers=2)
    assert steps == dataset.batches_per_epoch(0, num_workers=0) == TOTAL // 3
    serial = ids(take(make_loader(dataset, num_workers=0), steps))
    parallel = ids(take(make_loader(dataset, num_workers=2), steps))
    parallel_again = ids(take(make_loader(dataset, num_workers=2), steps))
    assert sorted(serial) == sorted(parallel) == list(range(TOTAL))
    assert parallel == parallel_again


def test_ranks_read_disjoint_shards_and_take_equal_steps(synthetic):
    ranks = [ShardDataset(synthetic, batch_size=3, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        shards = [set(ds.slot_shards(epoch, ds.rank, 2)) for ds in ranks]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == NUM_SHARDS
        assert ranks[0].batches_per_epoch(epoch, 0) == ranks[1].batches_per_epoch(epoch, 0)
    steps = ranks[0].batches_per_epoch(0, 0)
    seen = [set(ids(take(make_loader(ds, num_workers=0), steps))) for ds in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(TOTAL))

    with pytest.raises(DataError, match="write at least 10 shards"):
        make_loader(ShardDataset(synthetic, batch_size=3, world_size=2), num_workers=5)


def test_uneven_shards_still_give_full_batches_and_equal_steps(tmp_path):
    index = write_synthetic(tmp_path, count=23, per_shard=5)  # shards of 5, 5, 5, 5, 3
    ranks = [ShardDataset(index, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in range(4):
        assert ranks[0].batches_per_epoch(epoch, 0) == ranks[1].batches_per_epoch(epoch, 0)
    for ds in ranks:
        for batch in take(make_loader(ds, num_workers=0), 12):
            assert batch["x"].shape == (2, 2)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("shuffle", ["buffer", "blocks"])
@pytest.mark.parametrize("num_workers,stop_after,resume_for", [(0, 11, 14), (0, 20, 6), (2, 7, 12)])
def test_resume_continues_exactly_like_an_uninterrupted_run(synthetic, num_workers, stop_after, resume_for, shuffle):
    dataset = ShardDataset(synthetic, batch_size=3, seed=9, shuffle=shuffle, block_shards=3)
    uninterrupted = ids(take(make_loader(dataset, num_workers), stop_after + resume_for))

    first = make_loader(dataset, num_workers)
    head = ids(take(first, stop_after))
    state = first.state_dict()
    first.close()
    per_epoch = TOTAL // 3
    assert (state["epoch"], state["batch_in_epoch"]) == divmod(stop_after, per_epoch)

    restored = make_loader(ShardDataset(synthetic, batch_size=3, seed=9, shuffle=shuffle, block_shards=3), num_workers)
    restored.load_state_dict(state)
    tail = ids(take(restored, resume_for))
    assert head + tail == uninterrupted
    assert restored.state_dict()["epoch"] == (stop_after + resume_for) // per_epoch


def test_resume_refuses_a_state_from_another_configuration(synthetic):
    state = make_loader(ShardDataset(synthetic, batch_size=3, seed=1), 0).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        make_loader(ShardDataset(synthetic, batch_size=3, seed=2), 0).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle='buffer' but this loader has shuffle='blocks'"):
        make_loader(ShardDataset(synthetic, batch_size=3, seed=1, shuffle="blocks"), 0).load_state_dict(state)


def test_block_shuffle_mixes_each_block_of_shards_and_covers_the_epoch(synthetic):
    dataset = ShardDataset(synthetic, batch_size=3, seed=3, shuffle="blocks", block_shards=4)
    epoch = ids(take(make_loader(dataset, 0), TOTAL // 3))
    assert sorted(epoch) == list(range(TOTAL))  # every sample once
    # The first 4 x 6 samples are exactly the first block's shards, in a mixed order.
    first_block = {i for shard in dataset.slot_blocks(0, 0, 1)[0][0] for i in
                   range(int(shard.stem.split("-")[1]) * PER_SHARD, (int(shard.stem.split("-")[1]) + 1) * PER_SHARD)}
    assert set(epoch[:4 * PER_SHARD]) == first_block and epoch[:PER_SHARD] != sorted(epoch[:PER_SHARD])


class CountingReader:
    """Wraps a dataset's shard reader and counts the samples it decodes."""

    def __init__(self, reader):
        self.reader, self.decoded = reader, 0

    def samples(self, shard_paths):
        for sample in self.reader.samples(shard_paths):
            self.decoded += 1
            yield sample


def test_block_resume_reads_one_block_whatever_the_position(tmp_path, monkeypatch):
    from selfflow.platform.data import loader as shard_loader

    monkeypatch.setattr(shard_loader, "DECODED_CACHE_BYTES", 0)  # stream, as a large set does
    many = write_synthetic(tmp_path / "many", count=64 * 8, per_shard=8)  # 64 shards
    cost = {}
    for shuffle in ("buffer", "blocks"):
        for position in (2, 40, 150):  # batches of 3 into an epoch of 170
            dataset = ShardDataset(many, batch_size=3, seed=1, shuffle=shuffle, block_shards=4, shuffle_buffer=16)
            reference = make_loader(dataset, 0)
            take(reference, position)
            state, expected = reference.state_dict(), ids(take(reference, 2))
            resumed = make_loader(ShardDataset(many, batch_size=3, seed=1, shuffle=shuffle, block_shards=4,
                                               shuffle_buffer=16), 0)
            resumed.load_state_dict(state)
            counter = resumed.dataset._reader = CountingReader(resumed.dataset._reader)
            assert ids(take(resumed, 2)) == expected  # exact
            cost[shuffle, position] = counter.decoded
    assert cost["blocks", 2] == cost["blocks", 40] == cost["blocks", 150] == 4 * 8  # one block of 4 shards
    assert cost["buffer", 2] < cost["buffer", 40] < cost["buffer", 150]  # replays the epoch up to the position


# ---------------------------------------------------------------- safety and validation


class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_member_is_rejected_and_never_unpickled(synthetic, tmp_path):
    marker = tmp_path / "unpickled.marker"
    payload = pickle.dumps(CreatesFileWhenUnpickled(marker))
    probe = tmp_path / "probe.marker"  # prove such a payload really acts when unpickled
    pickle.loads(pickle.dumps(CreatesFileWhenUnpickled(probe)))
    assert probe.exists()

    shard = synthetic.parent / "train-000003.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    members.insert(3, (members[0][0].split(".")[0] + ".pkl", payload))
    write_tar(shard, members)

    with pytest.raises(DataError, match=r"refusing to decode member s\d{4}\.pkl in shard .*train-000003\.tar"):
        load_split_arrays(synthetic)
    loader = make_loader(ShardDataset(synthetic, batch_size=3, seed=0), num_workers=0)
    with pytest.raises(DataError, match="refusing to decode"):
        take(loader, TOTAL // 3)
    assert not marker.exists()


def test_unknown_member_extension_is_rejected(synthetic):
    shard = synthetic.parent / "train-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(shard, members + [("s0005.exe", b"MZ")])
    with pytest.raises(DataError, match=r"unknown member type s0005\.exe in shard .*train-000000\.tar"):
        load_split_arrays(synthetic)


@pytest.mark.parametrize("keep_bytes", [0, 100, 2048 * 2, 2048 * 2 + 700])
def test_truncated_shard_raises_data_error_naming_it(synthetic, keep_bytes):
    shard = synthetic.parent / "train-000002.tar"
    with open(shard, "r+b") as handle:
        handle.truncate(keep_bytes)
    with pytest.raises(DataError, match=r"train-000002\.tar"):
        load_split_arrays(synthetic)


def test_error_in_a_worker_process_arrives_as_one_line(synthetic):
    with open(synthetic.parent / "train-000005.tar", "r+b") as handle:
        handle.truncate(3000)
    loader = make_loader(ShardDataset(synthetic, batch_size=3, seed=0), num_workers=2)
    with pytest.raises(DataError, match=r"^cannot read shard .*train-000005\.tar[^\n]*$"):
        take(loader, TOTAL // 3)


def test_label_outside_num_classes_raises(tmp_path):
    index_path = write_synthetic(tmp_path, num_classes=5)  # labels i % 5 reach 4
    index = json.loads(index_path.read_text())
    index["num_classes"] = 4
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"label 4 outside \[0, 4\)"):
        load_split_arrays(index_path)


def test_sample_disagreeing_with_the_index_raises(synthetic):
    index = json.loads(synthetic.read_text())
    index["shape"] = [3]
    synthetic.write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"train-0000\d\d\.tar: member s\d{4}\.npy has shape \(2,\)"):
        load_split_arrays(synthetic)


def test_missing_member_raises_naming_shard_and_key(synthetic):
    shard = synthetic.parent / "train-000001.tar"
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "s0008.cls"]
    write_tar(shard, members)
    with pytest.raises(DataError, match=r"train-000001\.tar: sample s0008 has no \.cls member"):
        load_split_arrays(synthetic)


def test_object_array_is_refused_without_unpickling(synthetic):
    shard = synthetic.parent / "train-000001.tar"
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with tarfile.open(shard) as tar:
        members = [(m.name, buffer.getvalue() if m.name == "s0006.npy" else tar.extractfile(m).read())
                   for m in tar.getmembers()]
    write_tar(shard, members)
    with pytest.raises(DataError, match=r"s0006\.npy is not a valid npy array"):
        load_split_arrays(synthetic)


def test_missing_or_empty_index_raises_naming_the_path(tmp_path, synthetic):
    with pytest.raises(DataError, match=r"shard index not found: .*nowhere.*test\.index\.json"):
        ShardDataset(tmp_path / "nowhere", batch_size=2, split="test")
    with pytest.raises(DataError, match="pass split="):
        ShardDataset(synthetic.parent, batch_size=2)
    index = json.loads(synthetic.read_text())
    index["shards"], index["total"] = [], 0
    synthetic.write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"empty shard set: .*{synthetic.name}"):
        read_index(synthetic)


def test_shard_missing_from_disk_raises(synthetic):
    (synthetic.parent / "train-000004.tar").unlink()
    with pytest.raises(DataError, match=r"missing: .*train-000004\.tar"):
        read_index(synthetic)
