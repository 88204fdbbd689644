"""Streaming prepare: a split goes through in chunks (memory bounded whatever its size), and the bytes do not
depend on the chunk size, the shard writers' pool, or whether the split was held in memory."""

import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
from PIL import Image

from data_prep import prepare as prepare_module
from data_prep import shards as shard_io
from data_prep.prepare import PrepareConfig, prepare
from data_prep.source_types import Source, SourceSplit
from test_data_imagenet import make_imagenet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def run(dataset, root, out, **options):
    return prepare(PrepareConfig(dataset=dataset, root=str(root), out=str(out), progress=False, **options))


def test_chunked_imagenet_is_byte_identical_to_one_chunk(tmp_path, monkeypatch):
    make_imagenet(tmp_path / "src", 32, per_batch=7, n_val=9)
    options = dict(bins=64, order="patch:4", seed=2, shard_size=5)
    run("imagenet32", tmp_path / "src", tmp_path / "one", chunk_size=10**6, workers=1, **options)
    run("imagenet32", tmp_path / "src", tmp_path / "small", chunk_size=3, workers=1, **options)
    monkeypatch.setattr(shard_io, "PARALLEL_MIN_SAMPLES", 1)  # whole shards gathered for 2 writer processes
    run("imagenet32", tmp_path / "src", tmp_path / "pool", chunk_size=4, workers=2, **options)
    one = folder_bytes(tmp_path / "one")
    assert len(one) == 14 + 2 + 2  # 70 train in shards of 5, 9 test, preview, manifest
    assert folder_bytes(tmp_path / "small") == one
    assert folder_bytes(tmp_path / "pool") == one


# prepare in a fresh process whose training split goes to 2 writer processes: which of torch and webdataset
# its own process has loaded once the split is written, and (in the file WRITERS_LOG names) the split of
# each shard a writer process wrote and whether that process had torch.
NO_TORCH = """
import json, os, sys
from data_prep import prepare, shards
shards.PARALLEL_MIN_SAMPLES = 1
loaded, write_split_stream = {}, shards.write_split_stream
def spy(out_dir, split, *args, **kwargs):
    info = write_split_stream(out_dir, split, *args, **kwargs)
    loaded[split] = sorted(name for name in ("torch", "webdataset") if sys.modules.get(name) is not None)
    return info
shards.write_split_stream = spy
write_shard = shards._write_shard
def writer_spy(job):  # runs in a writer process: notes whether torch is loaded there
    with open(os.environ["WRITERS_LOG"], "a") as log:
        log.write(f"{job[1]} {sys.modules.get('torch') is not None}\\n")
    return write_shard(job)
shards._write_shard = writer_spy
print(json.dumps({"code": prepare.main(sys.argv[1:]), "loaded": loaded}))
"""


def test_writers_without_torch_write_the_same_bytes(tmp_path):
    """Neither prepare's own process (until the preview) nor its writer processes load torch (webdataset would
    bring it in: 500 MB each), and the writers' shards, made with webdataset's stand-ins for torch, are the
    same bytes as those written in this process, which has torch."""
    make_imagenet(tmp_path / "src", 32, per_batch=7, n_val=9)
    options = dict(bins=64, order="patch:4", seed=2, shard_size=5, chunk_size=4)
    flags = [text for key, value in options.items() for text in (f"--{key.replace('_', '-')}", str(value))]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "--dataset", "imagenet32", "--root", str(tmp_path / "src"),
                           "--out", str(tmp_path / "pool"), "--workers", "2", "--no-progress", *flags],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO, WRITERS_LOG=str(tmp_path / "writers.log")))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["loaded"]["train"] == [], result  # the preview comes after it
    writers = sorted(line.split() for line in (tmp_path / "writers.log").read_text().splitlines())
    # shards of 5: 70 training images, 9 test (forked after the preview loaded torch)
    assert writers == [["test", "True"]] * 2 + [["train", "False"]] * 14, writers
    run("imagenet32", tmp_path / "src", tmp_path / "here", workers=1, **options)
    assert folder_bytes(tmp_path / "pool") == folder_bytes(tmp_path / "here")


def test_chunked_folder_with_a_bad_file_is_byte_identical_to_one_chunk(tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for index in range(23):
        folder = root / ("a" if index % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9 + index % 4, 10, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    options = dict(size="8x8", channels=3, test_fraction=0.25, skip_bad=True, shard_size=4, seed=1)
    first = run("folder", root, tmp_path / "one", chunk_size=1000, **options)
    run("folder", root, tmp_path / "small", chunk_size=2, **options)
    assert folder_bytes(tmp_path / "small") == folder_bytes(tmp_path / "one")
    assert first.source["skipped_bad"] == 1 and sum(i.total for i in first.splits.values()) == 23


def test_a_large_split_is_never_held_in_memory(tmp_path, monkeypatch):
    """A source streaming 12,000 images in chunks of 250: at no time are more than two of its chunks alive."""
    count, chunk = 12000, 250
    alive = {"images": 0, "most": 0, "yielded": 0}

    def released(size):
        alive["images"] -= size

    def stream(chunk_size):
        assert chunk_size == chunk
        rng = np.random.default_rng(0)
        for start in range(0, count, chunk_size):
            images = rng.integers(0, 256, size=(min(chunk_size, count - start), 32, 32, 3), dtype=np.uint8)
            alive["images"] += len(images)
            alive["yielded"] += len(images)
            alive["most"] = max(alive["most"], alive["images"])
            weakref.finalize(images, released, len(images))
            yield images, np.arange(start, start + len(images)) % 10, None
            del images

    def fake_source(*args, **kwargs):
        splits = {"train": SourceSplit(None, None, size=count, stream=stream),
                  "test": SourceSplit(np.zeros((3, 32, 32, 3), np.uint8), np.arange(3))}
        return Source("imagenet32", [str(c) for c in range(10)], splits)

    monkeypatch.setattr(prepare_module, "load_source", fake_source)
    manifest = run("imagenet32", tmp_path, tmp_path / "out", chunk_size=chunk, shard_size=1000, workers=1)
    assert alive["yielded"] == count and manifest.splits["train"].total == count
    assert alive["most"] <= 2 * chunk, alive  # a chunk, and the next one while the last is let go


# Imports alone (webdataset brings in torch) peak at several hundred MB, far above the data: the peak is
# reset after them (writing 5 to /proc/self/clear_refs resets VmHWM) and measured from the RSS there.
PEAK = """
import json, sys
import data_prep.imagenet, data_prep.prepare, tqdm
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024
with open("/proc/self/clear_refs", "w") as stream:
    stream.write("5")
before = status("VmRSS")
code = data_prep.prepare.main(sys.argv[1:])
print(json.dumps({"code": code, "growth_mb": status("VmHWM") - before}))
"""


def can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as stream:
            stream.write("5")
        return True
    except OSError:
        return False


def peak_of_prepare(root, out, *options):
    """How far prepare's resident memory rose above what the imports left (MB), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", PEAK, "--dataset", "imagenet64", "--root", str(root), "--out",
                           str(out), "--workers", "1", "--no-progress", *options],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    return result["growth_mb"]


@pytest.mark.skipif(not can_reset_peak(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """6,000 ImageNet-64 images (70 MB of pixels) take about as much memory as 100 (peak RSS of a subprocess);
    the whole split in memory would add at least the 70 MB."""
    make_imagenet(tmp_path / "small", 64, per_batch=10, n_val=10)
    make_imagenet(tmp_path / "large", 64, per_batch=600, n_val=10)
    pixels_mb = 6000 * 64 * 64 * 3 / 2**20
    small = peak_of_prepare(tmp_path / "small", tmp_path / "o1", "--chunk-size", "200")
    large = peak_of_prepare(tmp_path / "large", tmp_path / "o2", "--chunk-size", "200")
    assert large - small < pixels_mb / 3, (small, large, pixels_mb)
