"""Verify a prepared folder: re-read every shard and check it against the manifest.

    python -m data_prep.verify DIR

Checks each shard's sha256, that it reads as a tar to the end, its sample count, that every sample
has seq.bin / cls / txt, sequence lengths (H*W*C), values below bins, labels below the number of
classes and captions of at most 48 UTF-8 bytes. Prints one line per problem, naming the shard.
Exit codes: 0 all good, 1 a shard is at fault, 2 not a prepared folder (or bad usage).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tarfile

import numpy as np

from data_prep.captions import MAX_CAPTION_BYTES
from data_prep.errors import DataError, one_line
from data_prep.manifest import Manifest, load_manifest
from common.exits import run_command
from common.files import file_sha256
from data_prep.shards import CAPTION_KEY, LABEL_KEY, SEQ_KEY

FIELDS = {SEQ_KEY, LABEL_KEY, CAPTION_KEY}


def check_shard(path: str, manifest: Manifest, count: int, sha256: str) -> list[str]:
    """Problems found in one shard (empty list: the shard is good)."""
    if not os.path.isfile(path):
        return [f"{path}: missing"]
    problems = []
    actual = file_sha256(path)
    if actual != sha256:
        problems.append(f"{path}: sha256 {actual[:16]}... does not match the manifest's {sha256[:16]}...")
    samples: dict[str, dict] = {}  # key -> {field: bytes}, in tar order
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in filter(tarfile.TarInfo.isfile, archive):
                key, _, field = os.path.basename(member.name).partition(".")
                # a member cut short raises tarfile.ReadError ("unexpected end of data")
                samples.setdefault(key, {})[field] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(f"{path}: unreadable tar after {len(samples)} samples ({one_line(error)})")
        return problems
    if len(samples) != count:
        problems.append(f"{path}: {len(samples)} samples, manifest says {count}")
    n_classes = len(manifest.class_names)
    for key, sample in samples.items():
        if set(sample) != FIELDS:
            problems.append(f"{path}: sample {key} has fields {sorted(sample)}, expected {sorted(FIELDS)}")
            break
        seq = np.frombuffer(sample[SEQ_KEY], dtype=np.uint8)
        if seq.size != manifest.seq_len:
            problems.append(f"{path}: sample {key} has {seq.size} sequence bytes, expected {manifest.seq_len}")
            break
        if seq.size and int(seq.max()) >= manifest.bins:
            problems.append(f"{path}: sample {key} has value {int(seq.max())}, bins is {manifest.bins}")
            break
        try:
            label = int(sample[LABEL_KEY].decode("ascii"))
            caption = sample[CAPTION_KEY].decode("utf-8")
        except (UnicodeDecodeError, ValueError):
            problems.append(f"{path}: sample {key} has an unreadable label or caption")
            break
        if not 0 <= label < n_classes:
            problems.append(f"{path}: sample {key} has label {label}, expected 0..{n_classes - 1}")
            break
        if len(sample[CAPTION_KEY]) > MAX_CAPTION_BYTES or not caption:
            problems.append(f"{path}: sample {key} has a caption of {len(sample[CAPTION_KEY])} bytes")
            break
    return problems


def min_shard_bytes(count: int, seq_len: int) -> int:
    """The fewest bytes a shard of `count` samples can hold: per sample three tar members (seq.bin and a
    non-empty cls and txt), each a 512-byte header and its data in 512-byte blocks, then the two zero
    blocks that end the archive (what shards.py writes, before tarfile pads it to a whole record)."""
    return count * 512 * (3 + math.ceil(seq_len / 512) + 2) + 1024


def shard_file_problems(data_dir, manifest: Manifest) -> list[str]:
    """Shards of any split that are missing or shorter than their sample count needs (no shard is read:
    cheap enough for every start of a run; a pipe or device, read like a file, is not sized)."""
    problems = []
    for info in manifest.splits.values():
        for shard, count in zip(info.shards, info.counts):
            path, least = os.path.join(os.fspath(data_dir), shard), min_shard_bytes(count, manifest.seq_len)
            if not os.path.exists(path):
                problems.append(f"{path}: shard listed in the manifest is missing")
            elif os.path.isfile(path) and os.path.getsize(path) < least:
                problems.append(f"{path}: {os.path.getsize(path)} bytes, too short for the manifest's {count} "
                                f"samples (at least {least}): truncated")
    return problems


def verify(data_dir) -> list[str]:
    """All problems in a prepared folder (empty: it matches its manifest). DataError if there is no manifest."""
    manifest = load_manifest(data_dir)
    problems = []
    for split, info in manifest.splits.items():
        if info.total == 0:
            problems.append(f"{data_dir}: split {split} has no samples")
        for shard, count, digest in zip(info.shards, info.counts, info.sha256):
            problems.extend(check_shard(os.path.join(os.fspath(data_dir), shard), manifest, count, digest))
    return problems


def main(argv=None) -> int:
    """Command line: print each problem, exit 1 if any, 2 if DIR is not a prepared folder."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.verify",
        description="Re-read every shard of a prepared folder and check it against manifest.json.",
    )
    parser.add_argument("data_dir", metavar="DIR", help="a folder written by python -m data_prep.prepare")
    args = parser.parse_args(argv)
    found, code = run_command("verify", lambda: (load_manifest(args.data_dir), verify(args.data_dir)), usage=(DataError,))
    if found is None:
        return code
    manifest, problems = found
    for problem in problems:
        print(f"verify: {problem}", file=sys.stderr)
    if problems:
        print(f"verify: FAILED: {len(problems)} problem(s) in {args.data_dir}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{info.total:,} {split} in {len(info.shards)} shards" for split, info in manifest.splits.items())
    print(f"verify: OK: {args.data_dir} ({manifest.dataset}, {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
