"""manifest.json: what a prepared folder holds, written last so that its presence means 'complete'."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from common.files import atomic_file
from data_prep.codec import parse_order
from data_prep.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class SplitInfo:
    """The shards of one split: file names (relative to the folder), sample counts and sha256 digests."""

    shards: list[str]
    counts: list[int]
    sha256: list[str]

    @property
    def total(self) -> int:
        """Number of samples in the split."""
        return sum(self.counts)


@dataclass
class Manifest:
    """Everything needed to read a prepared folder and to turn its sequences back into images."""

    format_version: int
    dataset: str
    height: int
    width: int
    channels: int
    bins: int
    order: str
    seed: int
    class_names: list[str]
    splits: dict[str, SplitInfo]
    # Free-form facts about how the source was made (digits: sizes and fonts); not needed to read.
    source: dict = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        """Length of every byte sequence: height * width * channels."""
        return self.height * self.width * self.channels

    def image_info(self) -> dict:
        """What a model export stores to turn sequences back into images."""
        info = {key: getattr(self, key) for key in ("dataset", "height", "width", "channels", "bins", "order")}
        return dict(info, class_names=list(self.class_names))

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "Manifest":
        """Build from a parsed manifest.json; DataError naming the key at fault."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = names - {"source"}
        missing = sorted(required - data.keys())
        if missing:
            raise DataError(f"{where}: missing key {missing[0]!r}")
        unknown = sorted(data.keys() - names)
        if unknown:
            raise DataError(f"{where}: unknown key {unknown[0]!r}")
        if data["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{where}: format_version {data['format_version']!r} is not supported (expected {FORMAT_VERSION})"
            )
        for key in ("height", "width", "channels", "bins", "seed"):
            if not isinstance(data[key], int) or isinstance(data[key], bool):
                raise DataError(f"{where}: {key} must be an integer, got {data[key]!r}")
        # manifest.json is a file a user can edit: every value the readers, the trainer and the sampler
        # rely on is checked here, so a bad one is named here instead of failing later without a name.
        from data_prep.sources import DATASETS  # local import: sources is the heavier module

        for key, allowed, why in (("dataset", DATASETS, f"one of {', '.join(DATASETS)}"),
                                  ("channels", (1, 3), "1 or 3"), ("bins", range(2, 257), "in 2..256")):
            if data[key] not in allowed:
                raise DataError(f"{where}: {key} must be {why}, got {data[key]!r}")
        for key in ("height", "width"):
            if data[key] < 1:
                raise DataError(f"{where}: {key} must be at least 1, got {data[key]!r}")
        if not isinstance(data["class_names"], list) or not all(isinstance(n, str) for n in data["class_names"]):
            raise DataError(f"{where}: class_names must be a list of strings, got {data['class_names']!r:.80}")
        if not isinstance(data.get("source", {}), dict):
            raise DataError(f"{where}: source must be an object, got {data['source']!r:.80}")
        if not isinstance(data["splits"], dict) or not data["splits"]:
            raise DataError(f"{where}: splits must be a non-empty object")
        splits = {}
        for name, info in data["splits"].items():
            if not isinstance(info, dict) or set(info) != {"shards", "counts", "sha256"}:
                raise DataError(f"{where}: splits.{name} must hold exactly shards, counts, sha256")
            if not all(isinstance(info[key], list) for key in info):
                raise DataError(f"{where}: splits.{name}: shards, counts and sha256 must be lists")
            if not (len(info["shards"]) == len(info["counts"]) == len(info["sha256"])):
                raise DataError(f"{where}: splits.{name}: shards, counts and sha256 differ in length")
            for shard, count, digest in zip(info["shards"], info["counts"], info["sha256"]):
                # a plain file name: a path would make the readers read (and verify hash) files elsewhere
                if not isinstance(shard, str) or shard in ("", ".", "..") or os.path.basename(shard) != shard:
                    raise DataError(f"{where}: splits.{name}: shard {shard!r} must be a file name in the folder")
                if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                    raise DataError(f"{where}: splits.{name}: count {count!r} of {shard} must be an integer >= 0")
                if not isinstance(digest, str):
                    raise DataError(f"{where}: splits.{name}: sha256 {digest!r} of {shard} must be a string")
            splits[name] = SplitInfo(list(info["shards"]), list(info["counts"]), list(info["sha256"]))
        values = {k: data[k] for k in names if k in data and k != "splits"}
        return cls(splits=splits, **values)


def manifest_path(data_dir) -> str:
    """Path of the manifest inside a prepared folder."""
    return os.path.join(os.fspath(data_dir), MANIFEST_NAME)


def load_manifest(data_dir) -> Manifest:
    """Read DIR/manifest.json; DataError if it is missing (unfinished or not a prepared folder) or malformed."""
    path = manifest_path(data_dir)
    if not os.path.isfile(path):
        raise DataError(
            f"{path} not found: {data_dir} is not a prepared folder, or preparation did not finish; "
            f"run python -m data_prep.prepare"
        )
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not a readable manifest ({error})") from None
    manifest = Manifest.from_dict(data, where=path)
    parse_order(manifest.order, manifest.height, manifest.width)
    return manifest


def write_manifest(data_dir, manifest: Manifest) -> None:
    """Write DIR/manifest.json atomically (common.files.atomic_file: a temporary name beside it, then renamed)."""
    with atomic_file(manifest_path(data_dir)) as stream:
        stream.write((json.dumps(dataclasses.asdict(manifest), indent=2) + "\n").encode("utf-8"))
