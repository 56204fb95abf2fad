"""`hpcdl data convert`: IDX and image folders; geometry, unusable files, labels, ranks, resume."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import imagegen
from hpcdl.data.convert import convert_folder, main as data_main
from hpcdl.data.dataset import load_dataset
from hpcdl.data.hdf5 import ImageRows, read_hdf5, read_hdf5_meta, row_checksums
from hpcdl.data.imagefolder import Geometry, decode
from hpcdl.data.shards import shard_dir
from hpcdl.errors import ConfigError, DataError

HPCDL = [sys.executable, "-m", "hpcdl"]


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def quiet(*_):
    pass


class Warnings(list):
    def __call__(self, message):
        self.append(message)


def stored(path, split="train") -> dict:
    """{source file: (label, C×H×W image)} of a converted file, through the `files` record."""
    import h5py

    images, labels = read_hdf5(path, split)
    with h5py.File(path, "r") as f:
        files = [name.decode() if isinstance(name, bytes) else name for name in f[f"{split}/files"][...]]
    return {name: (int(label), image) for name, label, image in zip(files, labels, images)}


def tree(root: Path, files: dict) -> Path:
    """files: {"class/name.ext": writer(path)}; returns root."""
    for rel, write in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
    return root


def png(array, mode=None):
    return lambda path: imagegen.write_png(path, array, mode)


def jpeg(array, **kw):
    return lambda path: imagegen.write_jpeg(path, array, **kw)


GOOD = imagegen.smooth_rgb(12, 9, seed=1)


def convert_small(tmp_path, files: dict, **kw):
    """Convert a tree of `files` plus one good PNG per class, storing 8×8 at short side 8, no holdout."""
    classes = {rel.split("/")[0] for rel in files}
    root = tree(tmp_path / "tree", {**{f"{c}/good.png": png(GOOD) for c in classes}, **files})
    warnings = Warnings()
    out = tmp_path / "out.h5"
    counts = convert_folder(root, out, **{"short_side": 8, "test_fraction": 0.0, "log": quiet, "warn": warnings,
                                          **kw})
    return out, counts, warnings


def file_digests(out: Path) -> dict:
    paths = [out, *sorted(shard_dir(out).iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def mpiexec(ranks: int, args, env=None, rank_env=None, timeout=120):
    """`hpcdl data convert folder ARGS` on `ranks` processes; rank_env applies to the last rank only."""
    launcher = shutil.which("mpiexec")
    assert launcher, "mpiexec not on PATH (pip install mpich)"
    command = [*HPCDL, "data", "convert", "folder", *map(str, args)]
    if rank_env:
        extra = [f"{k}={v}" for k, v in rank_env.items()]
        full = [launcher, "-n", str(ranks - 1), *command, ":", "-n", "1", "env", *extra, *command]
    else:
        full = [launcher, "-n", str(ranks), *command]
    started = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return proc, time.perf_counter() - started


# -- IDX ---------------------------------------------------------------------------------------

def test_convert_idx_to_hdf5(tiny_idx_dir, tmp_path, capsys):
    out = tmp_path / "out.h5"
    assert data_main(["convert", "idx", "--data-dir", str(tiny_idx_dir), "--out", str(out)]) == 0
    assert "40 train + 12 test images 1×6×5, 4 classes" in capsys.readouterr().out
    source = load_dataset("idx", data_dir=str(tiny_idx_dir))
    converted = load_dataset("hdf5", path=str(out))
    for field in ("train_images", "train_labels", "test_images", "test_labels", "mean", "std"):
        np.testing.assert_array_equal(getattr(converted, field), getattr(source, field))
    assert converted.class_names == ("0", "1", "2", "3")  # not Fashion-MNIST by checksum: numbered classes
    assert read_hdf5_meta(out)["format_version"] == 2
    assert data_main(["info", str(out)]) == 0
    assert "train        40 images 1×6×5" in capsys.readouterr().out

    data_main(["idx", "--data-dir", str(tiny_idx_dir), "--out", str(out), "--class-names", "a,b,c,d",
               "--layout", "chunked", "--chunk-rows", "8"])
    assert load_dataset("hdf5", path=str(out)).class_names == ("a", "b", "c", "d")
    assert read_hdf5_meta(out)["format_version"] == 1
    with pytest.raises(ConfigError) as excinfo:
        data_main(["idx", "--data-dir", str(tiny_idx_dir), "--out", str(out), "--compression", "gzip"])
    one_line_error(excinfo, "--layout chunked")


# -- geometry ----------------------------------------------------------------------------------

def test_size_and_resize_store_the_final_centre_crop(tmp_path):
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (6, 12, 3), dtype=np.uint8)     # H=6, W=12: crop columns 3..9
    tall = rng.integers(0, 256, (10, 6, 3), dtype=np.uint8)     # H=10, W=6: crop rows 2..8
    gray = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    smooth = np.full((16, 20, 3), (200, 40, 90), np.uint8)
    root = tree(tmp_path / "train", {"zebra/w.png": png(wide), "zebra/g.png": png(gray),
                                     "ant/t.png": png(tall), "ant/deep/s.jpg": jpeg(smooth)})
    (root / "ant" / "notes.txt").write_text("not an image")
    val = tree(tmp_path / "val", {"zebra/v.png": png(tall)})
    out = tmp_path / "f.h5"
    counts = convert_folder(root, out, size=6, val_root=val, log=quiet)
    assert (counts["train"], counts["test"], counts["classes"], counts["ignored"], counts["skipped"]) == (4, 1, 2, 1, 0)
    assert counts["shape"] == (3, 6, 6) and read_hdf5_meta(out)["short_side"] == 0  # stored at the final size

    data = load_dataset("hdf5", path=str(out))
    assert data.class_names == ("ant", "zebra")  # sorted folder names -> labels 0, 1
    rows = stored(out)
    # resize == shorter side, so each stored image is exactly the centre crop
    assert rows["zebra/w.png"][0] == 1 and np.array_equal(rows["zebra/w.png"][1], wide[:, 3:9].transpose(2, 0, 1))
    assert np.array_equal(rows["zebra/g.png"][1], np.repeat(gray[None], 3, axis=0))
    assert rows["ant/t.png"][0] == 0 and np.array_equal(rows["ant/t.png"][1], tall[2:8].transpose(2, 0, 1))
    np.testing.assert_allclose(rows["ant/deep/s.jpg"][1].mean(axis=(1, 2)), (200, 40, 90), atol=3)  # lossy but close
    np.testing.assert_array_equal(data.test_images[0], tall[2:8].transpose(2, 0, 1))
    assert data.test_labels.tolist() == [1]


def test_holdout_is_per_class_and_workers_do_not_change_the_bytes(tmp_path):
    rng = np.random.default_rng(1)
    root = tree(tmp_path / "tree", {f"{c}/{i}.png": png(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8))
                                    for c in ("a", "b") for i in range(10)})
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    counts = convert_folder(root, tmp_path / "1" / "x.h5", size=4, resize=5, test_fraction=0.2, log=quiet)
    assert (counts["train"], counts["test"]) == (16, 4)
    convert_folder(root, tmp_path / "2" / "x.h5", size=4, resize=5, test_fraction=0.2, workers=2,
                   shard_images=3, log=quiet)
    for split in ("train", "test"):
        for a, b in zip(read_hdf5(tmp_path / "1" / "x.h5", split), read_hdf5(tmp_path / "2" / "x.h5", split)):
            np.testing.assert_array_equal(a, b)
    assert np.bincount(read_hdf5(tmp_path / "1" / "x.h5", "test")[1]).tolist() == [2, 2]


def test_short_side_stores_the_centre_square_of_the_image_scaled_to_short_side(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    wide = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)   # 5:3, short side 60
    out, counts, _ = convert_small(tmp_path, {"a/wide.png": png(wide)}, short_side=24)
    assert counts["shape"] == (3, 24, 24) and read_hdf5_meta(out)["short_side"] == 24
    # The reference: Pillow scales the whole image to short side 24 (40×24), numpy crops columns 8..32.
    scaled = np.asarray(Image.fromarray(wide).resize((40, 24), Image.BILINEAR), dtype=np.int16)
    got = stored(out)["a/wide.png"][1].transpose(1, 2, 0).astype(np.int16)
    assert np.abs(got - scaled[:, 8:32]).max() <= 1


def test_jpeg_is_decoded_at_reduced_scale_only_down_to_the_short_side(tmp_path):
    from PIL import Image

    path = imagegen.write_jpeg(tmp_path / "big.jpg", np.asarray(imagegen.photo_like(np.random.default_rng(3), 640, 480)),
                               quality=90)
    small = decode(path, Geometry(100, 100))
    assert small.decoded_size == (160, 120)  # 1/4 scale: 480 // 4 = 120 ≥ 100, 1/8 would be 60 < 100
    assert decode(path, Geometry(240, 240)).decoded_size == (320, 240) and \
        decode(path, Geometry(300, 300)).decoded_size == (640, 480)
    with Image.open(path) as full:  # the same geometry from a full-size decode differs by a little detail
        reference = np.asarray(full.convert("RGB").resize((100, 100), Image.BILINEAR, box=(80, 0, 560, 480)))
    assert np.abs(small.pixels.transpose(1, 2, 0).astype(int) - reference).mean() < 3.0
    assert small.crc32 == row_checksums(small.pixels[None])[0]


# -- files that are not plain RGB images -------------------------------------------------------

def test_truncated_jpeg_is_skipped_with_one_warning_naming_it(tmp_path):
    files = {"a/cut.jpg": lambda p: imagegen.write_truncated_jpeg(p, imagegen.smooth_rgb(64, 48), keep=0.6)}
    out, counts, warnings = convert_small(tmp_path, files)
    assert counts["skipped"] == 1 and counts["train"] == 1 and list(stored(out)) == ["a/good.png"]
    assert len(warnings) == 1 and str(tmp_path / "tree" / "a" / "cut.jpg") in warnings[0]
    assert "truncated" in warnings[0] and "\n" not in warnings[0]


def test_corrupt_jpeg_is_skipped(tmp_path):
    out, counts, warnings = convert_small(tmp_path, {"a/bad.jpg": lambda p: imagegen.write_corrupt_jpeg(
        p, imagegen.smooth_rgb())})
    assert counts["skipped"] == 1 and list(stored(out)) == ["a/good.png"]
    assert len(warnings) == 1 and "a/bad.jpg" in warnings[0]


def test_non_image_files_with_image_suffixes_are_skipped(tmp_path):
    files = {"a/notes.jpg": lambda p: p.write_text("shopping list"), "a/empty.png": lambda p: p.write_bytes(b""),
             "a/readme.txt": lambda p: p.write_text("ignored: no image suffix")}
    out, counts, warnings = convert_small(tmp_path, files)
    assert (counts["skipped"], counts["ignored"], counts["train"]) == (2, 1, 1)
    assert sorted(w.split(":")[0] for w in warnings) == [f"skipped {tmp_path / 'tree' / 'a' / n}"
                                                         for n in ("empty.png", "notes.jpg")]
    assert all("not an image" in w for w in warnings)
    with ImageRows(out, "train") as rows:
        assert rows.count == 1  # the skipped files left no rows behind


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    photo = imagegen.smooth_rgb(32, 24, seed=4)
    out, counts, warnings = convert_small(tmp_path, {"a/cmyk.jpg": jpeg(photo, mode="CMYK")}, size=24, short_side=None)
    assert not warnings and counts["source_modes"] == {"CMYK": 1, "RGB": 1}
    got = stored(out)["a/cmyk.jpg"][1].transpose(1, 2, 0).astype(int)
    assert np.abs(got - photo[:, 4:28]).mean() < 3  # Adobe's inverted CMYK read the right way round


def test_grayscale_jpeg_and_png_become_three_equal_channels(tmp_path):
    gray = imagegen.smooth_rgb(8, 8)[..., 0]
    out, counts, _ = convert_small(tmp_path, {"a/g.png": png(gray), "a/g.jpg": jpeg(gray)})
    rows = stored(out)
    assert counts["source_modes"]["L"] == 2
    np.testing.assert_array_equal(rows["a/g.png"][1], np.repeat(gray[None], 3, 0))  # lossless: exact
    jpg = rows["a/g.jpg"][1]
    assert (jpg[0] == jpg[1]).all() and (jpg[1] == jpg[2]).all() and np.abs(jpg[0].astype(int) - gray).max() <= 4


def test_palette_png_becomes_its_rgb_colours(tmp_path):
    from PIL import Image

    colours = np.array([[255, 0, 0], [0, 128, 255], [20, 200, 20]], np.uint8)
    index = np.random.default_rng(5).integers(0, 3, (8, 8)).astype(np.uint8)

    def write(path):
        image = Image.fromarray(index, "P")
        image.putpalette(colours.reshape(-1).tolist())
        image.save(path)

    out, counts, _ = convert_small(tmp_path, {"a/p.png": write})
    assert counts["source_modes"]["P"] == 1
    np.testing.assert_array_equal(stored(out)["a/p.png"][1], colours[index].transpose(2, 0, 1))


def test_png_with_alpha_is_flattened_onto_white(tmp_path):
    from PIL import Image

    rgb = imagegen.smooth_rgb(8, 8, seed=6)
    alpha = np.tile(np.array([0, 64, 128, 255] * 2, np.uint8), (8, 1))  # columns: clear ... opaque
    gray = rgb[..., 1]

    def palette_with_transparency(path):
        image = Image.fromarray(np.tile(np.array([0, 1], np.uint8), (8, 4)), "P")
        image.putpalette([10, 20, 30, 200, 100, 50])
        image.save(path, transparency=0)  # palette entry 0 is see-through

    files = {"a/rgba.png": png(np.dstack([rgb, alpha]), "RGBA"), "a/la.png": png(np.dstack([gray, alpha]), "LA"),
             "a/pt.png": palette_with_transparency}
    out, counts, _ = convert_small(tmp_path, files)
    rows = stored(out)
    a = alpha[..., None].astype(np.float64) / 255
    expected = np.round(rgb * a + 255 * (1 - a))
    assert np.abs(rows["a/rgba.png"][1].transpose(1, 2, 0) - expected).max() <= 1
    expected_gray = np.round(gray * a[..., 0] + 255 * (1 - a[..., 0]))
    assert np.abs(rows["a/la.png"][1][0] - expected_gray).max() <= 1
    assert np.array_equal(rows["a/rgba.png"][1][:, :, 0], np.full((3, 8), 255))  # clear = white, whatever RGB says
    pt = rows["a/pt.png"][1].transpose(1, 2, 0)
    assert (pt[:, 0::2] == 255).all() and (pt[:, 1::2] == (200, 100, 50)).all()


def test_16_bit_png_keeps_the_high_byte(tmp_path):
    from PIL import Image

    deep = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1031)   # 0 ... 64953
    rgb16 = (np.arange(8 * 8 * 3, dtype=np.uint16).reshape(8, 8, 3) * 337)

    def write_rgb16(path):
        Image.frombytes("RGB", (8, 8), rgb16.astype(">u2").tobytes(), "raw", "RGB;16B").save(path)

    out, counts, _ = convert_small(tmp_path, {"a/deep.png": png(deep), "a/rgb16.png": write_rgb16})
    rows = stored(out)
    assert "I;16" in counts["source_modes"]
    np.testing.assert_array_equal(rows["a/deep.png"][1], np.repeat((deep >> 8)[None].astype(np.uint8), 3, 0))
    np.testing.assert_array_equal(rows["a/rgb16.png"][1], (rgb16 >> 8).astype(np.uint8).transpose(2, 0, 1))


def test_png_named_jpeg_is_read_by_its_content(tmp_path):
    rgb = imagegen.smooth_rgb(8, 8, seed=7)
    out, counts, warnings = convert_small(tmp_path, {"a/actually_png.JPEG": lambda p: imagegen.write_png(p, rgb)})
    assert not warnings
    np.testing.assert_array_equal(stored(out)["a/actually_png.JPEG"][1], rgb.transpose(2, 0, 1))


def test_float_tiff_and_non_utf8_file_names_are_kept(tmp_path):
    from PIL import Image

    values = np.linspace(-20, 300, 64, dtype=np.float32).reshape(8, 8)
    name = os.fsdecode(b"caf\xe9.tif")  # Latin-1 bytes: not UTF-8
    out, counts, warnings = convert_small(tmp_path, {f"a/{name}": lambda p: Image.fromarray(values, "F").save(p)})
    assert not warnings and counts["source_modes"]["F"] == 1
    import h5py

    with h5py.File(out, "r") as f:
        assert b"a/caf\xe9.tif" in list(f["train/files"][...])
    row = read_hdf5(out, "train")[0][list(stored_names(out)).index(f"a/{name}")]
    np.testing.assert_array_equal(row, np.repeat(np.clip(values, 0, 255).astype(np.uint8)[None], 3, 0))


def stored_names(path, split="train"):
    import h5py

    with h5py.File(path, "r") as f:
        return [os.fsdecode(n) for n in f[f"{split}/files"][...]]


def test_class_folder_whose_every_image_is_unusable_is_an_error_naming_it(tmp_path):
    root = tree(tmp_path / "tree", {"a/ok.png": png(GOOD), "b/x.jpg": lambda p: p.write_text("no"),
                                    "b/y.png": lambda p: p.write_bytes(b"\x89PNG\r\n")})
    out = tmp_path / "out.h5"
    with pytest.raises(DataError) as excinfo:
        convert_folder(root, out, short_side=8, test_fraction=0.0, log=quiet, warn=quiet)
    one_line_error(excinfo, str(root / "b"), "no usable image")
    assert not out.exists()


def test_class_folder_without_image_files_is_an_error_before_any_decoding(tmp_path):
    root = tree(tmp_path / "tree", {"a/ok.png": png(GOOD), "b/notes.txt": lambda p: p.write_text("x")})
    with pytest.raises(DataError) as excinfo:
        convert_folder(root, tmp_path / "out.h5", short_side=8, log=quiet)
    one_line_error(excinfo, str(root / "b"), "no image files")
    assert not shard_dir(tmp_path / "out.h5").exists()


# -- validation labels -------------------------------------------------------------------------

def test_validation_labels_from_a_csv_by_class_name_or_index(tmp_path):
    rng = np.random.default_rng(8)
    images = {f"v{i}.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(4)}
    root = tree(tmp_path / "train", {"cat/a.png": png(GOOD), "dog/b.png": png(GOOD)})
    val = tree(tmp_path / "val", {**{n: png(a) for n, a in images.items()}, "extra.png": png(GOOD)})
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n# a comment\nv0.png,dog\nv1.png, 0\n\nv2.png,cat\nv3.png,1\n")
    out = tmp_path / "out.h5"
    counts = convert_folder(root, out, short_side=8, val_csv=csv, val_dir=val, log=quiet)
    assert (counts["test"], counts["unlisted"]) == (4, 1)
    rows = stored(out, "test")
    assert {name: label for name, (label, _) in rows.items()} == {"v0.png": 1, "v1.png": 0, "v2.png": 0, "v3.png": 1}
    np.testing.assert_array_equal(rows["v2.png"][1], images["v2.png"].transpose(2, 0, 1))


@pytest.mark.parametrize("lines, line, fragment", [
    ("v0.png,dgo\n", 1, "unknown class 'dgo' (did you mean dog?)"),
    ("file,label\nv0.png,7\n", 2, "unknown class '7'"),
    ("v0.png,dog\nmissing.png,cat\n", 2, "no such file"),
    ("v0.png,dog\nv1.png,cat\nv0.png,cat\n", 3, "v0.png is listed again (first on line 1)"),
    ("v0.png,dog,extra\n", 1, "expected 2 fields"),
    ("v0.png,dog\n../train/cat/a.png,cat\n", 2, "must be a path relative to"),
    ("v0.png,dog\nsub/../../train/cat/a.png,cat\n", 2, "must be a path relative to"),
    ("v0.png,dog\n./v0.png,cat\n", 2, "is listed again (first on line 1)"),
])
def test_validation_csv_errors_name_the_csv_and_the_line(tmp_path, lines, line, fragment):
    root = tree(tmp_path / "train", {"cat/a.png": png(GOOD), "dog/b.png": png(GOOD)})
    val = tree(tmp_path / "val", {"v0.png": png(GOOD), "v1.png": png(GOOD)})
    csv = tmp_path / "labels.csv"
    csv.write_text(lines)
    with pytest.raises(DataError) as excinfo:
        convert_folder(root, tmp_path / "out.h5", short_side=8, val_csv=csv, val_dir=val, log=quiet)
    one_line_error(excinfo, f"{csv}:{line}:", fragment)


def test_validation_folder_with_a_class_training_lacks_is_an_error(tmp_path):
    root = tree(tmp_path / "train", {"cat/a.png": png(GOOD)})
    val = tree(tmp_path / "val", {"cat/v.png": png(GOOD), "emu/w.png": png(GOOD)})
    with pytest.raises(DataError) as excinfo:
        convert_folder(root, tmp_path / "out.h5", short_side=8, val_root=val, log=quiet)
    one_line_error(excinfo, str(val), "emu", "not among the 1 training classes")


# -- shards, ranks, resume ---------------------------------------------------------------------

MIXED_TREE_SHARD = 7


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory):
    """Photo-like JPEGs in 3 classes with val folders, plus files every decoder path meets, and its 1-process result."""
    base = tmp_path_factory.mktemp("mixed")
    imagegen.write_tree(base, classes=3, per_class=12, val_per_class=3, size="96x72", seed=1)
    train = base / "train"
    imagegen.write_truncated_jpeg(train / "n00000000" / "cut.JPEG", imagegen.smooth_rgb(64, 48))
    (train / "n00000001" / "text.JPEG").write_text("not a jpeg")
    imagegen.write_jpeg(train / "n00000001" / "cmyk.JPEG", imagegen.smooth_rgb(80, 60), mode="CMYK")
    imagegen.write_png(train / "n00000002" / "alpha.png", np.dstack([imagegen.smooth_rgb(70, 50),
                                                                       np.full((50, 70), 99, np.uint8)]), "RGBA")
    reference = base / "one" / "out.h5"
    reference.parent.mkdir()
    counts = convert_folder(train, reference, short_side=32, val_root=base / "val", shard_images=MIXED_TREE_SHARD,
                            log=quiet, warn=quiet)
    assert (counts["train"], counts["test"], counts["skipped"], counts["shards"]) == (38, 9, 2, 8)
    return base, reference


def mixed_args(base: Path, out: Path):
    return ["--root", base / "train", "--val-root", base / "val", "--short-side", 32, "--out", out,
            "--shard-images", MIXED_TREE_SHARD]


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, workers", [(2, 1), (3, 2)])
def test_the_result_does_not_depend_on_the_number_of_ranks(mixed_tree, tmp_path, ranks, workers):
    base, reference = mixed_tree
    out = tmp_path / "out.h5"
    proc, _ = mpiexec(ranks, [*mixed_args(base, out), "--workers", workers])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert file_digests(out) == file_digests(reference)  # the stitched file and every shard, byte for byte
    assert sum("skipped" in line and "cut.JPEG" in line for line in proc.stderr.splitlines()) == 1
    assert f"rank {ranks - 1}/{ranks}: " in proc.stderr


@pytest.mark.mpi
def test_a_conversion_killed_halfway_resumes_to_the_identical_result(mixed_tree, tmp_path):
    base, reference = mixed_tree
    out = tmp_path / "out.h5"
    killed, seconds = mpiexec(2, mixed_args(base, out), rank_env={"HPCDL_FAULT_INJECT": "convert-shard:2"})
    assert killed.returncode != 0 and "killing pid" in killed.stderr and seconds < 60
    assert not out.exists()
    left = sorted(p.name for p in shard_dir(out).iterdir())
    assert ".train-00003.h5.part" in left  # rank 1's second shard, cut off halfway
    finished = [name for name in left if not name.startswith(".") and name.endswith(".h5")]
    assert 0 < len(finished) < 8

    resumed, _ = mpiexec(2, mixed_args(base, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'"reused": {len(finished)}' in resumed.stdout
    assert file_digests(out) == file_digests(reference)
    assert not [p for p in shard_dir(out).iterdir() if p.name.startswith(".")]


@pytest.mark.mpi
def test_a_rank_that_cannot_write_stops_every_rank_quickly_naming_the_file(mixed_tree, tmp_path):
    base, _ = mixed_tree
    out = tmp_path / "out.h5"
    (shard_dir(out) / "train-00001.h5").mkdir(parents=True)  # in the way of rank 1's first shard
    proc, seconds = mpiexec(2, mixed_args(base, out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert seconds < 30
    assert "train-00001.h5: cannot write shard" in proc.stderr and "aborting all ranks" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.mpi
def test_an_error_found_while_listing_on_another_rank_is_printed_once(tmp_path):
    root = tree(tmp_path / "tree", {"a/ok.png": png(GOOD), "b/notes.txt": lambda p: p.write_text("x")})
    proc, seconds = mpiexec(2, ["--root", root, "--short-side", 8, "--out", tmp_path / "out.h5"])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("no image files") == 1 and "aborting" not in proc.stderr  # rank 1 listed b/
    assert f"hpcdl: error: {root / 'b'}: class folder has no image files" in proc.stderr


def copy_conversion(reference: Path, target_dir: Path) -> Path:
    target_dir.mkdir()
    shutil.copytree(shard_dir(reference), shard_dir(target_dir / reference.name))
    return target_dir / reference.name


def test_rerun_after_an_interrupt_inside_a_shard_keeps_the_finished_ones(mixed_tree, tmp_path, monkeypatch):
    from hpcdl.data import convert

    base, reference = mixed_tree
    out = tmp_path / "out.h5"
    calls = []

    def interrupt_in_third_shard():
        def for_shard(spec):
            calls.append(spec.name)
            if len(calls) == 3:
                def interrupt(temp):
                    raise KeyboardInterrupt
                return interrupt
            return None
        return for_shard

    monkeypatch.setattr(convert, "_fault_hook", interrupt_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        convert_folder(base / "train", out, short_side=32, val_root=base / "val", shard_images=MIXED_TREE_SHARD,
                       log=quiet, warn=quiet)
    assert sorted(p.name for p in shard_dir(out).iterdir()) == ["manifest.json", "train-00000.h5", "train-00001.h5"]
    monkeypatch.undo()
    lines = []
    counts = convert_folder(base / "train", out, short_side=32, val_root=base / "val",
                            shard_images=MIXED_TREE_SHARD, log=lines.append, warn=lines.append)
    assert counts["reused"] == 2 and file_digests(out) == file_digests(reference)
    # The skipped files of reused shards are named again, so every run's log names every skipped file.
    assert sum("cut.JPEG" in line for line in lines) == 1


def test_changed_arguments_are_refused_until_restart(mixed_tree, tmp_path):
    base, reference = mixed_tree
    out = copy_conversion(reference, tmp_path / "c")
    with pytest.raises(DataError) as excinfo:
        convert_folder(base / "train", out, short_side=40, val_root=base / "val", shard_images=MIXED_TREE_SHARD,
                       log=quiet, warn=quiet)
    one_line_error(excinfo, "manifest.json", "short_side was 32, now 40", "size was 32, now 40", "--restart")
    shutil.copy(reference, out)
    lines = []
    counts = convert_folder(base / "train", out, short_side=40, val_root=base / "val",
                            shard_images=MIXED_TREE_SHARD, restart=True, log=lines.append, warn=quiet)
    assert counts["reused"] == 0 and counts["shape"] == (3, 40, 40)
    assert any("--restart: removed 10 files" in line for line in lines), lines  # 8 shards, manifest, output


def test_a_damaged_shard_is_found_and_converted_again(mixed_tree, tmp_path):
    base, reference = mixed_tree
    out = copy_conversion(reference, tmp_path / "d")
    victim = shard_dir(out) / "train-00002.h5"
    with ImageRows(victim, "train") as rows:
        offset = rows.extents[0].offset + 3 * rows.row_bytes + 17
    data = bytearray(victim.read_bytes())
    data[offset] ^= 0x10
    victim.write_bytes(bytes(data))
    lines = []
    counts = convert_folder(base / "train", out, short_side=32, val_root=base / "val",
                            shard_images=MIXED_TREE_SHARD, log=lines.append, warn=quiet)
    assert counts["reused"] == 7
    assert any("train-00002.h5" in line and "row 3: CRC-32 mismatch" in line for line in lines), lines
    assert file_digests(out) == file_digests(reference)


def test_a_changed_source_file_redoes_only_its_shard(mixed_tree, tmp_path):
    import h5py

    base, reference = mixed_tree
    out = copy_conversion(reference, tmp_path / "e")
    with h5py.File(reference, "r") as f:
        first_test_file = f["test/files"][0].decode()
    source = base / "val" / first_test_file
    stat = source.stat()
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        lines = []
        counts = convert_folder(base / "train", out, short_side=32, val_root=base / "val",
                                shard_images=MIXED_TREE_SHARD, log=lines.append, warn=quiet)
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert counts["reused"] == 7
    assert any("test-00000.h5" in line and "a source file changed" in line for line in lines), lines


def test_the_output_moves_with_its_shards_and_describes_itself(mixed_tree, tmp_path, capsys, monkeypatch):
    import h5py

    _, reference = mixed_tree
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(reference, moved / reference.name)
    shutil.copytree(shard_dir(reference), shard_dir(moved / reference.name))
    monkeypatch.chdir(tmp_path)  # virtual sources resolve against the file's folder, not the working one
    expected, labels = read_hdf5(reference, "train")
    got, got_labels = read_hdf5(moved / reference.name, "train")
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got_labels, labels)
    with h5py.File(moved / reference.name, "r") as f:  # plain h5py reads the virtual dataset too
        np.testing.assert_array_equal(f["train/images"][5:9], expected[5:9])
        assert len(f["train/skipped"]) == 2
    assert data_main(["info", str(moved / reference.name)]) == 0
    text = capsys.readouterr().out
    assert "virtual over 6 contiguous sources in 6 file(s)" in text and "at short side 32" in text
    assert "2 unusable file(s) skipped" in text
    assert data_main(["info", str(shard_dir(reference) / "test-00001.h5")]) == 0
    assert "shard 1 of the test split: 2 of 2 files usable" in capsys.readouterr().out
