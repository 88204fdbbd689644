"""prepare: every source byte comes back from the shards, manifests are right, runs are reproducible,
and bad input gives a one-line error, the right exit code and no folder that looks complete."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds

from common.files import file_sha256
from data_prep.captions import MAX_CAPTION_BYTES, captions_for_class
from data_prep.codec import decode_sequences, dequantize, encode_images, quantize
from data_prep.errors import DataError
from data_prep.manifest import load_manifest
from data_prep.prepare import PrepareConfig, main, prepare
from conftest import make_tiny_cifar


def read_back(folder, split):
    """Every sample of a split through webdataset, in shard order: (seqs [N, L], labels, captions)."""
    manifest = load_manifest(folder)
    urls = [os.path.join(folder, name) for name in manifest.splits[split].shards]
    seqs, labels, captions, keys = [], [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False):
        assert "." not in sample["__key__"]
        seqs.append(np.frombuffer(sample["seq.bin"], np.uint8))
        labels.append(int(sample["cls"]))
        captions.append(sample["txt"].decode("utf-8"))
        keys.append(sample["__key__"])
    assert len(set(keys)) == len(keys)
    return np.stack(seqs), np.array(labels), captions


def run(dataset, out, root=None, **options):
    return prepare(PrepareConfig(dataset=dataset, out=str(out), root=None if root is None else str(root),
                                 progress=False, **options))


def test_mnist_every_byte_comes_back(tiny_mnist, tmp_path):
    manifest = run("mnist", tmp_path / "out", tiny_mnist.root)
    assert (manifest.height, manifest.width, manifest.channels, manifest.bins) == (28, 28, 1, 256)
    assert manifest.class_names == [str(d) for d in range(10)]
    for split, (images, labels) in tiny_mnist.splits.items():
        seqs, got_labels, captions = read_back(tmp_path / "out", split)
        assert np.array_equal(seqs, images.reshape(len(images), -1))
        assert np.array_equal(got_labels, labels)
        for caption, label in zip(captions, labels):
            assert caption in captions_for_class("mnist", str(label))
            assert len(caption.encode("utf-8")) <= MAX_CAPTION_BYTES


def test_cifar_quantized_patch_order_round_trip(tiny_cifar, tmp_path):
    manifest = run("cifar10", tmp_path / "out", tiny_cifar.root, bins=16, order="patch:4")
    assert manifest.seq_len == 32 * 32 * 3 and manifest.order == "patch:4"
    assert manifest.class_names[6] == "frog"
    for split, (images, labels) in tiny_cifar.splits.items():
        seqs, got_labels, _ = read_back(tmp_path / "out", split)
        assert seqs.max() < 16
        assert np.array_equal(seqs, encode_images(images, 16, "patch:4"))
        decoded = decode_sequences(seqs, 32, 32, 3, 16, "patch:4")
        assert np.array_equal(decoded, dequantize(quantize(images, 16), 16))
        assert np.abs(decoded.astype(int) - images).max() <= 9  # half a level of 17, plus rounding
        assert np.array_equal(got_labels, labels)


def test_manifest_names_shards_counts_and_checksums(prepared_digits):
    manifest = load_manifest(prepared_digits)
    data = json.loads((prepared_digits / "manifest.json").read_text())
    for key in ("format_version", "dataset", "height", "width", "channels", "bins", "order", "seed",
                "class_names", "splits"):
        assert key in data
    assert manifest.dataset == "digits" and manifest.seq_len == 784
    assert manifest.image_info() == dict(dataset="digits", height=28, width=28, channels=1, bins=256,
                                         order="raster", class_names=[str(d) for d in range(10)])
    for split, total in (("train", 1000), ("test", 200)):
        info = manifest.splits[split]
        assert info.total == total and len(info.shards) == 16  # at least 16 shards a split by default
        assert info.shards == [f"{split}-{i:06d}.tar" for i in range(16)]
        for name, digest in zip(info.shards, info.sha256):
            assert file_sha256(str(prepared_digits / name)) == digest
    assert sorted(p.name for p in prepared_digits.iterdir() if not p.name.endswith(".tar")) == [
        "manifest.json", "preview.png"]


def test_preview_is_a_ten_by_ten_grid(prepared_digits):
    from PIL import Image

    with Image.open(prepared_digits / "preview.png") as picture:
        # the project's one grid writer: 10 cells of 28 px scaled 2x, 2 px of white padding
        assert picture.size == (10 * (28 * 2 + 2) + 2, 10 * (28 * 2 + 2) + 2)
        pixels = np.asarray(picture.convert("L"))
    cells = pixels[2:58, 2:58]  # the first digit, inside the padding
    assert pixels.max() > 200 and 0.03 < (cells > 128).mean() < 0.6


def test_same_arguments_give_byte_identical_folders(tiny_cifar, tmp_path):
    first = run("cifar10", tmp_path / "a", tiny_cifar.root, shard_size=7, seed=3)
    second = run("cifar10", tmp_path / "b", tiny_cifar.root, shard_size=7, seed=3)
    assert first.splits["train"].sha256 == second.splits["train"].sha256
    assert first.splits["train"].counts == [7] * 7 + [1]
    for name in os.listdir(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # re-preparing in place (same arguments) is allowed and gives the same bytes again
    again = run("cifar10", tmp_path / "a", tiny_cifar.root, shard_size=7, seed=3)
    assert again.splits == first.splits
    other = run("cifar10", tmp_path / "c", tiny_cifar.root, shard_size=7, seed=4)
    assert other.splits["train"].sha256 != first.splits["train"].sha256  # the seed picks the captions


def test_digits_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = run("digits", tmp_path / "a", train_size=60, test_size=10, seed=7)
    b = run("digits", tmp_path / "b", train_size=60, test_size=10, seed=7, workers=2)
    c = run("digits", tmp_path / "c", train_size=60, test_size=10, seed=8)
    assert a.splits == b.splits
    assert read_back(tmp_path / "a", "train")[0].tolist() != read_back(tmp_path / "c", "train")[0].tolist()
    assert a.source["train_size"] == 60 and "pillow-default" in a.source["fonts"]


def test_cli_prepares_verifies_and_reports_speed(tiny_mnist_root, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", "--dataset", "mnist", "--root", str(tiny_mnist_root),
         "--out", str(out), "--bins", "8", "--order", "patch:7", "--shard-size", "16"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert "70 images" in last and "images/s" in last
    assert "writing shards" in done.stderr  # the progress bar
    assert load_manifest(out).splits["train"].counts == [16, 16, 16, 2]
    checked = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], capture_output=True,
                             text=True, timeout=120)
    assert checked.returncode == 0 and "OK" in checked.stdout


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_files_name_what_was_expected_and_mention_download(tmp_path, capsys):
    (tmp_path / "src" / "MNIST" / "raw").mkdir(parents=True)
    assert main(["--dataset", "mnist", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    line = error_line(capsys)
    assert "t10k-labels-idx1-ubyte" in line and "--download" in line
    assert main(["--dataset", "cifar10", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    line = error_line(capsys)
    assert "cifar-10-batches-py/data_batch_1" in line and "--download" in line
    assert not (tmp_path / "o").exists()


def test_gzipped_mnist_alone_points_to_download(tiny_mnist, tmp_path, capsys):
    import gzip

    raw = tmp_path / "src" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (tiny_mnist.root / "MNIST" / "raw").iterdir():
        (raw / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    assert main(["--dataset", "mnist", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    assert "only the .gz files; pass --download" in error_line(capsys)


def test_corrupt_idx_file_is_named(tiny_mnist, tmp_path, capsys):
    root = tmp_path / "src"
    shutil.copytree(tiny_mnist.root, root)
    bad = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x07" + bad.read_bytes()[4:])  # an idx type code that does not exist
    assert main(["--dataset", "mnist", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert str(bad) in error_line(capsys)
    images = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])  # truncated
    assert main(["--dataset", "mnist", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert str(images) in error_line(capsys)
    assert not (tmp_path / "o" / "manifest.json").exists()


@pytest.mark.parametrize("content", [b"not a pickle at all", b"\x80\x02}q\x00."])  # garbage; an empty dict
def test_corrupt_cifar_batch_is_named(tiny_cifar, tmp_path, capsys, content):
    root = tmp_path / "src"
    shutil.copytree(tiny_cifar.root, root)
    bad = root / "cifar-10-batches-py" / "data_batch_4"
    bad.write_bytes(content)
    assert main(["--dataset", "cifar10", "--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert str(bad) in error_line(capsys)


@pytest.mark.parametrize("arguments, message", [
    (["--bins", "1"], "bins 1 out of range"),
    (["--bins", "257"], "bins 257 out of range"),
    (["--order", "patch:5"], "patch size 5 does not divide"),
    (["--order", "spiral"], "not understood"),
    (["--shard-size", "0"], "--shard-size"),
])
def test_bad_arguments_exit_2_with_one_line(tiny_mnist_root, tmp_path, capsys, arguments, message):
    code = main(["--dataset", "mnist", "--root", str(tiny_mnist_root), "--out", str(tmp_path / "o"),
                 "--no-progress", *arguments])
    assert code == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_out_holding_another_dataset_is_refused_unless_overwrite(tiny_mnist_root, tiny_cifar_root, tmp_path, capsys):
    out = tmp_path / "o"
    run("mnist", out, tiny_mnist_root)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["--dataset", "cifar10", "--root", str(tiny_cifar_root), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    line = error_line(capsys)
    assert "'mnist'" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert main(args + ["--overwrite"]) == 0
    assert load_manifest(out).dataset == "cifar10"
    assert not any(name.startswith("train-") and name not in load_manifest(out).splits["train"].shards
                   for name in os.listdir(out))  # no stale shards from the old dataset


def folder_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_prepared_from_another_root_is_refused_unless_overwrite(tiny_cifar_root, tmp_path, capsys):
    """The same dataset from another source folder: refused with one line naming --out, both roots and
    --overwrite, before anything in the folder is touched; --overwrite replaces it."""
    other = make_tiny_cifar(tmp_path / "other_cifar", seed=9).root
    out = tmp_path / "o"
    run("cifar10", out, tiny_cifar_root)
    before = folder_state(out)
    args = ["--dataset", "cifar10", "--root", str(other), "--out", str(out), "--no-progress"]
    assert main(args) == 2
    line = error_line(capsys)
    assert str(out) in line and f"root {str(tiny_cifar_root)!r} there, {str(other)!r} now" in line
    assert "--overwrite" in line
    assert folder_state(out) == before  # nothing lost, nothing half-written
    assert main(args + ["--overwrite"]) == 0
    assert load_manifest(out).source["root"] == str(other)
    assert folder_state(out)["manifest.json"] != before["manifest.json"]


@pytest.mark.parametrize("arguments, difference", [
    (["--bins", "16"], "bins 256 there, 16 now"),
    (["--order", "patch:4"], "order 'raster' there, 'patch:4' now"),
    (["--seed", "5"], "seed 0 there, 5 now"),
])
def test_out_prepared_with_other_arguments_names_the_difference(tiny_cifar_root, tmp_path, capsys, arguments,
                                                                  difference):
    out = tmp_path / "o"
    run("cifar10", out, tiny_cifar_root)
    before = folder_state(out)
    assert main(["--dataset", "cifar10", "--root", str(tiny_cifar_root), "--out", str(out), "--no-progress",
                 *arguments]) == 2
    line = error_line(capsys)
    assert difference in line and "root '" not in line and "--overwrite" in line
    assert folder_state(out) == before


def test_same_arguments_again_rebuild_the_folder_in_place(tiny_cifar_root, tmp_path):
    """The same source by another path (a symlink) and another shard size are the same arguments: the
    folder is rebuilt, not refused."""
    out = tmp_path / "o"
    first = run("cifar10", out, tiny_cifar_root, shard_size=7)
    before = folder_state(out)
    assert run("cifar10", out, tiny_cifar_root, shard_size=7).splits == first.splits
    assert folder_state(out) == before
    (tmp_path / "link").symlink_to(tiny_cifar_root)
    again = run("cifar10", out, tmp_path / "link", shard_size=9)
    assert again.splits["train"].counts == [9] * 5 + [5]


def test_unreadable_manifest_in_out_is_refused(tiny_mnist_root, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    assert main(["--dataset", "mnist", "--root", str(tiny_mnist_root), "--out", str(out), "--no-progress"]) == 2
    line = error_line(capsys)
    assert "manifest.json" in line and "--overwrite" in line
    assert (out / "manifest.json").read_text() == "{not json"


def test_out_with_foreign_files_is_refused(tiny_mnist_root, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert main(["--dataset", "mnist", "--root", str(tiny_mnist_root), "--out", str(out), "--no-progress"]) == 2
    assert "thesis.tex" in error_line(capsys)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_run_that_dies_leaves_no_manifest(tiny_mnist_root, tmp_path, monkeypatch):
    out = tmp_path / "o"
    run("mnist", out, tiny_mnist_root)
    real_write = wds.ShardWriter.write
    calls = {"n": 0}

    def failing_write(self, sample):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError("disk full")
        return real_write(self, sample)

    monkeypatch.setattr(wds.ShardWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run("mnist", out, tiny_mnist_root, shard_size=8)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="preparation did not finish"):
        load_manifest(out)
    # the shard being written when it died keeps its temporary name
    assert any(name.endswith(".partial") for name in os.listdir(out))
    monkeypatch.undo()
    run("mnist", out, tiny_mnist_root)  # a new run cleans up and completes
    assert not any(name.endswith(".partial") for name in os.listdir(out))
