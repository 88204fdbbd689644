"""prepare --dataset imagenet32|imagenet64: tiny npz batches in the distributed format (train_data_batch_1..10.npz,
val_data.npz; `data` rows in CIFAR's plane layout, 1-based `labels`) come back byte for byte."""

import numpy as np
import pytest

from data_prep.manifest import load_manifest
from data_prep.prepare import main
from data_prep.reader import read_samples


def make_imagenet(root, side, per_batch=2, n_val=3, seed=0, folders=True):
    """Write the 11 npz files (in the sub-folders the release's zips unpack into); return the HWC images and
    0-based labels, in file order."""
    rng = np.random.default_rng(seed)
    splits = {"train": ([], []), "test": ([], [])}
    files = [(f"train_data_batch_{i}.npz", "train", per_batch) for i in range(1, 11)]
    files.append(("val_data.npz", "test", n_val))
    for name, split, count in files:
        images = rng.integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)  # (N, H, W, C)
        labels = rng.integers(1, 1001, size=count)  # 1-based, as distributed
        folder = root / (f"Imagenet{side}_{'train' if split == 'train' else 'val'}_npz" if folders else "")
        folder.mkdir(parents=True, exist_ok=True)
        # data: all red values of the image, then green, then blue (CIFAR's layout); the release adds a mean
        np.savez(folder / name, data=images.transpose(0, 3, 1, 2).reshape(count, -1), labels=labels.tolist(),
                 mean=np.zeros(3 * side * side))
        splits[split][0].append(images)
        splits[split][1].append(labels - 1)
    return {split: (np.concatenate(i), np.concatenate(l)) for split, (i, l) in splits.items()}


@pytest.mark.parametrize("dataset, side", [("imagenet32", 32), ("imagenet64", 64)])
def test_every_byte_and_label_comes_back(tmp_path, dataset, side):
    expected = make_imagenet(tmp_path / "src", side)
    out = tmp_path / "out"
    assert main(["--dataset", dataset, "--root", str(tmp_path / "src"), "--out", str(out), "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert (manifest.height, manifest.width, manifest.channels) == (side, side, 3)
    assert manifest.class_names[:3] == ["1", "2", "3"] and len(manifest.class_names) == 1000
    for split, (images, labels) in expected.items():
        batch = read_samples(out, range(len(labels)), split=split)
        assert np.array_equal(batch.seqs.numpy(), images.reshape(len(images), -1))
        assert np.array_equal(batch.labels.numpy(), labels)


def test_class_names_from_the_devkit_map_and_flat_layout(tmp_path):
    make_imagenet(tmp_path / "src", 32, per_batch=1, n_val=1, folders=False)
    (tmp_path / "src" / "map_clsloc.txt").write_text(
        "".join(f"n{index:08d} {index} class_{index}\n" for index in range(1000, 0, -1)))
    assert main(["--dataset", "imagenet32", "--root", str(tmp_path / "src"), "--out", str(tmp_path / "o"),
                 "--no-progress", "--train-size", "4"]) == 0
    manifest = load_manifest(tmp_path / "o")
    assert manifest.class_names[0] == "class_1" and manifest.class_names[-1] == "class_1000"
    assert manifest.splits["train"].total == 4 and manifest.splits["test"].total == 1


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_wrong_size_and_bad_labels_are_named(tmp_path, capsys):
    root = tmp_path / "src"
    make_imagenet(root, 32, per_batch=1, n_val=1)
    args = ["--root", str(root), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(["--dataset", "imagenet64", *args]) == 1  # 32x32 rows where 64x64 are expected
    assert "train_data_batch_1.npz: data is uint8 (1, 3072)" in error_line(capsys)
    bad = root / "Imagenet32_train_npz" / "train_data_batch_7.npz"
    np.savez(bad, data=np.zeros((2, 3072), np.uint8), labels=[0, 5])  # 0-based: not the release's labels
    assert main(["--dataset", "imagenet32", *args]) == 1
    assert f"{bad}: labels must be 1..1000" in error_line(capsys)
    bad.write_bytes(b"not a zip")
    assert main(["--dataset", "imagenet32", *args]) == 1
    assert f"{bad}: not a readable npz file" in error_line(capsys)
    bad.unlink()
    assert main(["--dataset", "imagenet32", *args]) == 1
    assert "missing train_data_batch_7.npz" in error_line(capsys)
    assert not (tmp_path / "o" / "manifest.json").exists()
