"""Data sources: IDX and HDF5 readers, the Fashion-MNIST locator, datasets, converters, augmentation."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from hpcdl.data import fashion_mnist
from hpcdl.data.augment import Augmenter, augment_reference, crop_flip, draw_offsets, normalize
from hpcdl.data.dataset import load_dataset, load_fashion_mnist, synthetic_dataset
from hpcdl.data.hdf5 import read_hdf5, read_hdf5_meta, row_checksums, write_hdf5
from hpcdl.data.idx import IDX_FILES, read_idx, write_idx
from hpcdl.data.sampler import ShardedSampler
from hpcdl.data.validate import channel_stats
from hpcdl.errors import ConfigError, DataError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_CLASSES = 4  # as written by the conftest fixtures


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# -- IDX ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype, shape", [(np.uint8, (7, 4, 3)), (np.int8, (5,)), (np.int16, (2, 3)),
                                          (np.int32, (3, 2, 2, 2)), (np.float32, (4, 5)), (np.float64, (6,))])
def test_idx_round_trip(tmp_path, suffix, dtype, shape):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=shape) * 100).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=") and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_idx_header_is_lecun_layout(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    write_idx(path, np.zeros((2, 3, 4), np.uint8))
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert raw[4:16] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    assert len(raw) == 16 + 24


@pytest.fixture
def raw_idx(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    return path


@pytest.mark.parametrize("mutate, fragments", [
    (lambda b: b[:-5], ["truncated", "2×3×4 = 24 payload bytes, file has 19"]),
    (lambda b: b + b"xyz", ["trailing garbage", "file has 27"]),
    (lambda b: b[:10], ["truncated", "header needs 16 bytes"]),
    (lambda b: b"\x01" + b[1:], ["bad magic"]),
    (lambda b: b[:2] + b"\x42" + b[3:], ["unknown IDX dtype code 0x42"]),
    (lambda b: b[:3] + b"\x00" + b[4:], ["0 dimensions"]),
    (lambda b: b"", ["truncated", "0 bytes"]),
])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_damage_is_a_one_line_data_error_naming_the_file(raw_idx, mutate, fragments, compress):
    damaged = mutate(raw_idx.read_bytes())
    path = raw_idx.with_name(raw_idx.name + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(damaged) if compress else damaged)
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    one_line_error(excinfo, str(path), *fragments)


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: b[:-8] + bytes(x ^ 0xFF for x in b[-8:-4]) + b[-4:], "corrupt gzip"),  # bad CRC
    (lambda b: b[: len(b) // 2], "corrupt gzip"),                                     # cut stream
    (lambda b: b"plain text", "not a gzip file"),
])
def test_bad_gzip_is_a_data_error_naming_the_file(tmp_path, damage, fragment):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(path, np.arange(300, dtype=np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as excinfo:
        read_idx(path)
    one_line_error(excinfo, str(path), fragment)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        read_idx(tmp_path / "nope.gz")
    one_line_error(excinfo, "nope.gz", "no such file")


# -- HDF5 --------------------------------------------------------------------------------

def test_hdf5_round_trip_rows_and_metadata(tiny_hdf5, tiny_split):
    import h5py

    train_images, train_labels = tiny_split(40, (3, 6, 5), seed=3)
    images, labels = read_hdf5(tiny_hdf5, "train")
    np.testing.assert_array_equal(images, train_images)
    np.testing.assert_array_equal(labels, train_labels)
    assert labels.dtype == np.int64
    rows = [7, 2, 2, 39, 0]
    images, labels = read_hdf5(tiny_hdf5, "train", rows=rows)
    np.testing.assert_array_equal(images, train_images[rows])
    np.testing.assert_array_equal(labels, train_labels[rows])
    images, labels = read_hdf5(tiny_hdf5, "test", rows=slice(3, 9))
    np.testing.assert_array_equal(images, tiny_split(12, (3, 6, 5), seed=4)[0][3:9])

    meta = read_hdf5_meta(tiny_hdf5)
    assert meta["class_names"] == ["c0", "c1", "c2", "c3"]
    assert meta["splits"] == {"train": {"count": 40, "shape": (3, 6, 5)}, "test": {"count": 12, "shape": (3, 6, 5)}}
    x = train_images.astype(np.float64) / 255
    np.testing.assert_allclose(meta["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(meta["std"], x.std(axis=(0, 2, 3)), rtol=1e-5)
    with h5py.File(tiny_hdf5) as f:
        assert f["train/images"].chunks is None  # contiguous: rows are read by offset
        assert f["train/images"].id.get_offset() is not None
        assert f.attrs["format_version"] == 2
        np.testing.assert_array_equal(f["train/crc32"][...], row_checksums(train_images))
    assert [p.name for p in tiny_hdf5.parent.iterdir()] == [tiny_hdf5.name]  # no temp file left behind


def test_hdf5_write_is_atomic(tmp_path, tiny_hdf5, tiny_split):
    before = tiny_hdf5.read_bytes()
    bad = tiny_split(5, (3, 6, 5))
    with pytest.raises(DataError):  # label 3 is out of range for 2 classes: rejected before writing
        write_hdf5(tiny_hdf5, {"train": bad, "test": bad}, ["a", "b"])
    assert tiny_hdf5.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [tiny_hdf5.name]


def _mutated(path, edit):
    import h5py

    with h5py.File(path, "a") as f:
        edit(f)
    return path


def _replace(key, value):
    def edit(f):
        del f[key]
        f[key] = value
    return edit


@pytest.mark.parametrize("edit, fragments", [
    (lambda f: f.__delitem__("test/labels"), ["missing dataset 'test/labels'"]),
    (lambda f: f.__delitem__("test"), ["missing group 'test'"]),
    (lambda f: f.attrs.__delitem__("mean"), ["missing attribute 'mean'"]),
    (lambda f: f.attrs.__delitem__("class_names"), ["missing attribute 'class_names'"]),
    (_replace("test/images", np.zeros((12, 3, 6, 5), np.float32)), ["test/images", "dtype float32, expected uint8"]),
    (_replace("test/images", np.zeros((12, 6, 5), np.uint8)), ["test/images", "shape (12, 6, 5)"]),
    (_replace("test/labels", np.zeros(11, np.int64)), ["test/labels has 11 entries but test/images has 12"]),
    (_replace("test/labels", np.full(12, TINY_CLASSES, np.int64)), ["test/labels", f"label {TINY_CLASSES} outside [0, 4)"]),
    (_replace("test/labels", np.full(12, -1, np.int32)), ["test/labels", "label -1 outside"]),
    (_replace("test/labels", np.zeros(12, np.float32)), ["test/labels", "dtype float32"]),
])
def test_hdf5_validation_names_file_and_key(tiny_hdf5, edit, fragments):
    _mutated(tiny_hdf5, edit)
    with pytest.raises(DataError) as excinfo:
        read_hdf5(tiny_hdf5, "test")
    one_line_error(excinfo, str(tiny_hdf5), *fragments)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 3], lambda b: b"not hdf5 at all" * 10,
                                    lambda b: b[:2048] + bytes(len(b) - 2048)])
def test_truncated_or_corrupt_hdf5_is_a_data_error(tiny_hdf5, damage):
    tiny_hdf5.write_bytes(damage(tiny_hdf5.read_bytes()))
    with pytest.raises(DataError) as excinfo:
        read_hdf5(tiny_hdf5, "train")
    one_line_error(excinfo, str(tiny_hdf5))


def test_flipped_bit_in_an_image_row_is_detected(tiny_hdf5):
    import h5py

    with h5py.File(tiny_hdf5) as f:
        offset = f["train/images"].id.get_offset()
    row_bytes = 3 * 6 * 5
    damaged = bytearray(tiny_hdf5.read_bytes())
    damaged[offset + 17 * row_bytes + 10] ^= 0x01
    tiny_hdf5.write_bytes(bytes(damaged))
    read_hdf5(tiny_hdf5, "train", rows=[16, 18, 0])  # other rows still read
    with pytest.raises(DataError) as excinfo:
        read_hdf5(tiny_hdf5, "train", rows=slice(16, 32))
    one_line_error(excinfo, str(tiny_hdf5), "train/images row 17", "CRC-32 mismatch")


def test_flipped_bit_in_a_version_1_chunk_is_detected(tmp_path, tiny_split):
    import h5py

    path = tmp_path / "v1.h5"
    write_hdf5(path, {"train": tiny_split(40, (3, 6, 5), seed=3), "test": tiny_split(12, (3, 6, 5), seed=4)},
               [f"c{i}" for i in range(TINY_CLASSES)], layout="chunked", chunk_rows=16)
    with h5py.File(path) as f:
        assert f.attrs["format_version"] == 1 and f["train/images"].chunks == (16, 3, 6, 5)
        chunk = f["train/images"].id.get_chunk_info(1)  # rows 16..31
    damaged = bytearray(path.read_bytes())
    damaged[chunk.byte_offset + 10] ^= 0x01
    path.write_bytes(bytes(damaged))
    read_hdf5(path, "train", rows=slice(0, 16))  # other chunks still read
    with pytest.raises(DataError) as excinfo:
        read_hdf5(path, "train", rows=slice(16, 32))
    one_line_error(excinfo, str(path), "read failed")


def test_missing_hdf5_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_dataset("hdf5", path=tmp_path / "absent.h5")
    one_line_error(excinfo, "absent.h5", "no such file")


# -- Fashion-MNIST locator ---------------------------------------------------------------

@pytest.fixture
def fmnist_sites(tmp_path, monkeypatch, tiny_idx_dir):
    """Four candidate directories, each with (tiny) files, wired into the locator's search order."""
    import shutil

    sites = {}
    for name in ("explicit", "env", "debian", "cache"):
        sites[name] = tmp_path / name
        shutil.copytree(tiny_idx_dir, sites[name])
    monkeypatch.setenv("HPCDL_DATA", str(sites["env"]))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", sites["debian"])
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", sites["cache"])
    return sites


def test_locator_order_data_dir_env_debian_cache(fmnist_sites, monkeypatch, tmp_path):
    import shutil

    locate = fashion_mnist.locate_fashion_mnist
    assert locate(fmnist_sites["explicit"]) == fmnist_sites["explicit"]
    assert locate() == fmnist_sites["env"]
    # $HPCDL_DATA may also be a parent with a fashion-mnist/ subfolder
    parent = tmp_path / "parent"
    shutil.move(fmnist_sites["env"], parent / "fashion-mnist")
    monkeypatch.setenv("HPCDL_DATA", str(parent))
    assert locate() == parent / "fashion-mnist"
    monkeypatch.delenv("HPCDL_DATA")
    assert locate() == fmnist_sites["debian"]
    (fmnist_sites["debian"] / "t10k-labels-idx1-ubyte.gz").unlink()  # an incomplete copy is skipped
    assert locate() == fmnist_sites["cache"]


def test_explicit_data_dir_must_exist_and_be_complete(fmnist_sites, tmp_path):
    with pytest.raises(DataError) as excinfo:
        fashion_mnist.locate_fashion_mnist(tmp_path / "typo")
    one_line_error(excinfo, "--data-dir", "typo", "no such directory")
    (fmnist_sites["explicit"] / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as excinfo:
        fashion_mnist.locate_fashion_mnist(fmnist_sites["explicit"])
    one_line_error(excinfo, "missing train-images-idx3-ubyte(.gz)", "apt-get install -y dataset-fashion-mnist")


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    monkeypatch.delenv("HPCDL_DATA", raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(fashion_mnist, "CACHE_DIR", tmp_path / "cache")
    return tmp_path


def test_not_found_message_says_how_to_get_the_data(nowhere):
    with pytest.raises(DataError) as excinfo:
        load_fashion_mnist(download=False)
    one_line_error(excinfo, "Fashion-MNIST not found", "$HPCDL_DATA", str(nowhere / "no-debian"),
                   "sudo apt-get install -y dataset-fashion-mnist", "--data-dir DIR", "download disabled")
    assert not (nowhere / "cache").exists()  # download=False never touches the cache


def test_download_failure_offline_leaves_nothing_behind(nowhere, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "BASE_URL", "http://127.0.0.1:9/")  # discard port: connection refused
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_TIMEOUT_S", 2.0)
    with pytest.raises(DataError) as excinfo:
        fashion_mnist.locate_fashion_mnist(download=True)
    one_line_error(excinfo, "download from http://127.0.0.1:9/ failed", "apt-get install -y dataset-fashion-mnist")
    assert list((nowhere / "cache").iterdir()) == []


@pytest.fixture
def http_mirror(tiny_idx_dir):
    """A local HTTP server that serves the tiny IDX files, like the official bucket would."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_idx_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", tiny_idx_dir
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_verifies_checksums_and_lands_atomically(nowhere, monkeypatch, http_mirror):
    url, served = http_mirror
    monkeypatch.setattr(fashion_mnist, "BASE_URL", url)
    digests = {stem: hashlib.sha256(gzip.decompress((served / f"{stem}.gz").read_bytes())).hexdigest()
               for stem in IDX_FILES.values()}
    wrong = dict(digests, **{"t10k-labels-idx1-ubyte": "0" * 64})
    monkeypatch.setattr(fashion_mnist, "PAYLOAD_SHA256", wrong)
    with pytest.raises(DataError) as excinfo:
        fashion_mnist.locate_fashion_mnist(download=True)
    one_line_error(excinfo, "t10k-labels-idx1-ubyte.gz", "SHA-256 mismatch")
    assert not (nowhere / "cache" / "t10k-labels-idx1-ubyte.gz").exists()

    monkeypatch.setattr(fashion_mnist, "PAYLOAD_SHA256", digests)
    assert fashion_mnist.locate_fashion_mnist(download=True) == nowhere / "cache"
    cached = sorted(p.name for p in (nowhere / "cache").iterdir())
    assert cached == sorted(f"{stem}.gz" for stem in IDX_FILES.values())
    for name in cached:
        assert (nowhere / "cache" / name).read_bytes() == (served / name).read_bytes()


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("HPCDL_DATA", raising=False)
    data = load_dataset("fashion_mnist", data_dir=str(REAL_FMNIST), download=False)
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int64
    assert set(np.unique(data.train_labels)) == set(range(10)) == set(np.unique(data.test_labels))
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert data.mean[0] == pytest.approx(0.2860, abs=5e-4) and data.std[0] == pytest.approx(0.3530, abs=5e-4)
    assert data.class_names[0] == "T-shirt/top" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    # The recorded SHA-256 constants are those of the installed (Debian) payloads.
    assert fashion_mnist.verify_fashion_mnist(REAL_FMNIST) == {}


@pytest.mark.skipif(not REAL_FMNIST.is_dir(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("stem, mtime, readme_md5", [
    ("t10k-labels-idx1-ubyte", 1504176627, "bb300cfdad3c16e7a12a480ee83cd310"),
    ("train-labels-idx1-ubyte", 1504176606, "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte", 1504176627, "bef4ecab320f06d8554ea6380940ec79"),
])
def test_debian_copy_is_upstream_with_a_rewritten_gzip_header(stem, mtime, readme_md5):
    """Debian's .gz + upstream's header (FNAME, 2017 mtime) == the file whose MD5 the README publishes."""
    debian = (REAL_FMNIST / f"{stem}.gz").read_bytes()
    assert debian[3] == 0, "expected Debian's header without FNAME"
    upstream_header = b"\x1f\x8b\x08\x08" + mtime.to_bytes(4, "little") + b"\x00\x03" + stem.encode() + b"\x00"
    assert hashlib.md5(upstream_header + debian[10:]).hexdigest() == readme_md5


# -- datasets by name ----------------------------------------------------------------------

def test_idx_and_hdf5_datasets(tiny_idx_dir, tiny_hdf5, tiny_split):
    data = load_dataset("idx", data_dir=str(tiny_idx_dir))
    images, labels = tiny_split(40, seed=1)
    np.testing.assert_array_equal(data.train_images, images)
    np.testing.assert_array_equal(data.train_labels, labels)
    assert data.input_shape == (1, 6, 5) and data.class_names == ("0", "1", "2", "3")
    mean, std = channel_stats(images)
    np.testing.assert_allclose(mean, [images.mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(std, [(images / 255).std()], rtol=1e-5)
    data = load_dataset("hdf5", path=str(tiny_hdf5))
    assert data.input_shape == (3, 6, 5) and data.num_classes == 4 and len(data.test_labels) == 12


@pytest.mark.parametrize("labels, fragments", [
    (np.full(40, 12, np.uint8), ["train-labels-idx1-ubyte.gz", "label 12 outside [0, 10)"]),
    (np.zeros(39, np.uint8), ["train-labels-idx1-ubyte.gz", "39 labels for 40 images"]),
])
def test_inconsistent_idx_files_name_the_labels_file(tiny_idx_dir, labels, fragments):
    write_idx(tiny_idx_dir / "train-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError) as excinfo:
        load_fashion_mnist(tiny_idx_dir, download=False)
    one_line_error(excinfo, str(tiny_idx_dir), *fragments)


def test_unknown_dataset_name_suggests_the_closest(tiny_idx_dir):
    with pytest.raises(ConfigError) as excinfo:
        load_dataset("synthtic")
    one_line_error(excinfo, "data.dataset", "did you mean 'synthetic'")
    with pytest.raises(ConfigError) as excinfo:
        load_dataset("hdf5")
    one_line_error(excinfo, "data.path")


def test_synthetic_is_deterministic_and_learnable():
    a = synthetic_dataset(1000, (3, 12, 10), num_classes=5, seed=7)
    b = synthetic_dataset(1000, (3, 12, 10), num_classes=5, seed=7)
    c = synthetic_dataset(1000, (3, 12, 10), num_classes=5, seed=8)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (1000, 3, 12, 10) and a.test_images.shape == (250, 3, 12, 10)
    assert np.bincount(a.train_labels).tolist() == [200] * 5
    # nearest class mean, fitted on train, must classify the test split almost perfectly
    x, xt = a.train_images.reshape(1000, -1) / 255.0, a.test_images.reshape(250, -1) / 255.0
    centroids = np.stack([x[a.train_labels == k].mean(0) for k in range(5)])
    predicted = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == a.test_labels).mean() > 0.95


# -- augmentation ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, pad", [((9, 1, 7, 5), 2), ((16, 3, 8, 8), 4), ((5, 2, 4, 6), 1)])
def test_crop_flip_matches_per_sample_reference(shape, pad):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    positions = np.arange(shape[0]) * 3 + 1
    dy, dx, flipped = draw_offsets(11, 2, 5, positions, pad, flip=True)
    mean, std = rng.uniform(0.2, 0.6, shape[1]), rng.uniform(0.2, 0.4, shape[1])
    reference = augment_reference(images, dy, dx, flipped, pad, mean, std)
    np.testing.assert_array_equal(normalize(crop_flip(images, dy, dx, flipped, pad), mean, std).shape, shape)
    out = Augmenter(mean=mean, std=std, pad=pad, flip=True, seed=11)(images, 2, 5, positions)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=0, atol=2e-6)
    assert flipped.any() and not flipped.all()  # the test exercises both branches


def test_augmentation_is_invariant_to_rank_count_and_accumulation():
    rng = np.random.default_rng(4)
    dataset = rng.integers(0, 256, (64, 1, 6, 6), dtype=np.uint8)
    augment = Augmenter(mean=[0.5], std=[0.25], pad=2, seed=3)
    single = ShardedSampler(64, 24, rank=0, world_size=1, seed=9)
    whole = augment(dataset[single.global_batch_indices(1, 1)], 1, 1, np.arange(24))
    for world, accumulate in ((3, 2), (2, 4), (4, 1)):
        pieces = np.empty_like(whole)
        for rank in range(world):
            sampler = ShardedSampler(64, 24, rank, world, seed=9, accumulate_steps=accumulate)
            for idx, pos in zip(sampler.batch_indices(1, 1), sampler.batch_positions(1, 1)):
                pieces[pos] = augment(dataset[idx], 1, 1, pos)
        np.testing.assert_array_equal(pieces, whole)


def test_offsets_cover_the_range_and_differ_per_step():
    dy, dx, flipped = draw_offsets(0, 0, 0, np.arange(4000), pad=3, flip=True)
    assert sorted(set(dy)) == list(range(7)) == sorted(set(dx))
    assert np.bincount(dy).min() > 4000 / 7 * 0.8  # roughly uniform
    assert 0.45 < flipped.mean() < 0.55
    other = draw_offsets(0, 0, 1, np.arange(4000), pad=3, flip=True)
    assert (other[0] != dy).mean() > 0.7
    assert not draw_offsets(0, 0, 0, np.arange(10), pad=3, flip=False)[2].any()


def test_normalize_values():
    images = np.array([0, 51, 128, 255], np.uint8).reshape(1, 1, 2, 2).repeat(2, axis=1)
    mean, std = np.array([0.25, 0.5]), np.array([0.5, 0.2])
    out = normalize(images, mean, std)
    expected = (images / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    plain = Augmenter(mean=mean, std=std, pad=0, flip=False)(images, 0, 0, [0])
    np.testing.assert_array_equal(plain, out)
    empty = Augmenter(mean=mean, std=std, pad=2)(images[:0], 0, 0, [])
    assert empty.shape == (0, 2, 2, 2)


@pytest.mark.gpu
def test_augmentation_on_cupy_matches_numpy(cupy):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, 3, 10, 9), dtype=np.uint8)
    augment = Augmenter(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], pad=3, seed=2)
    host = augment(images, 1, 2, np.arange(32))
    device = augment(cupy.asarray(images), 1, 2, np.arange(32))
    assert isinstance(device, cupy.ndarray)
    np.testing.assert_allclose(cupy.asnumpy(device), host, atol=1e-6)


# -- HDF5 rows by offset ---------------------------------------------------------------------------

def test_image_rows_read_virtual_datasets_by_offset_and_count_bytes(tmp_path, tiny_hdf5, tiny_split):
    """Rows of a virtual dataset over contiguous sources come straight from the source files."""
    import h5py

    from hpcdl.data.hdf5 import ImageRows, write_root_attrs

    train_images, train_labels = tiny_split(40, (3, 6, 5), seed=3)
    layout = h5py.VirtualLayout(shape=(60, 3, 6, 5), dtype=np.uint8)
    layout[:40] = h5py.VirtualSource(tiny_hdf5.name, "train/images", shape=(40, 3, 6, 5))
    layout[40:] = h5py.VirtualSource(tiny_hdf5.name, "train/images", shape=(40, 3, 6, 5))[10:30]
    stitched = tmp_path / "stitched.h5"
    with h5py.File(stitched, "w") as f:
        f.create_virtual_dataset("train/images", layout)
        f["train/labels"] = np.concatenate([train_labels, train_labels[10:30]])
        f["train/crc32"] = row_checksums(np.concatenate([train_images, train_images[10:30]]))
        write_root_attrs(f, [f"c{i}" for i in range(TINY_CLASSES)], [0.5] * 3, [0.25] * 3)
    rows = [59, 0, 41, 42, 43, 39, 40]
    with ImageRows(stitched, "train") as reader:
        assert reader.layout == "virtual" and [e.count for e in reader.extents] == [40, 20]
        np.testing.assert_array_equal(reader.read(rows), train_images[[29, 0, 11, 12, 13, 39, 10]])
        assert reader.bytes_read == len(rows) * 3 * 6 * 5  # read amplification exactly 1
        np.testing.assert_array_equal(reader.labels[rows], train_labels[[29, 0, 11, 12, 13, 39, 10]])


def test_data_info_into_a_closed_pipe_is_quiet(tiny_hdf5):
    """`hpcdl data info FILE | head -1`: the reader leaves early; no traceback, the usual 141."""
    import os
    import subprocess
    import sys

    reader, writer = os.pipe()
    os.close(reader)  # a pipe whose reader has gone: every write fails with EPIPE
    try:
        run = subprocess.run([sys.executable, "-m", "hpcdl", "data", "info", str(tiny_hdf5)],
                             stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert run.returncode == 141, run.stderr
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr
