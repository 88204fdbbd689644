"""Your own images: a folder in torchvision's ImageFolder layout, decoded and resized by PIL/torchvision.

    ROOT/cat/001.jpg, ROOT/cat/002.png, ROOT/dog/x.webp ...   one sub-folder per class (sorted names)
    ROOT/001.jpg, ROOT/002.png ...                            no sub-folders: one class, named after ROOT

Every file whose extension PIL knows is an image; other files are ignored (and counted). An image
file PIL cannot read stops preparing with one line naming it, or is skipped (and counted) with
skip_bad. Images are resized so that the shorter side fits and centre-cropped to HxW ("crop"), or
resized to exactly HxW ("exact"); transparent pixels are composited onto white. Links are followed,
each folder walked once (a link loop ends) and each image file listed once, whatever the links to it.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from data_prep.errors import DataError, one_line
from data_prep.source_types import Source, SourceSplit

RESIZE_MODES = ("crop", "exact")
# Below this many images a process pool costs more than it saves.
PARALLEL_MIN_IMAGES = 2000


@dataclass
class FolderImages:
    """The images found in one folder: paths (sorted by class, then path), labels, class names."""

    root: str
    paths: list[str]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    flat: bool  # True: no class sub-folders, every image is class 0
    ignored: int  # files that are not images by their extension, and further links to an image listed


def image_extensions() -> tuple[str, ...]:
    """Lower-case extensions (with the dot) of every format PIL can open here."""
    from PIL import Image

    Image.init()  # registers the plugins, so registered_extensions() lists them all
    return tuple(sorted(extension.lower() for extension in Image.registered_extensions()))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folder: str, seen: dict[str, str]) -> list[str]:
    """Visible files under folder, sorted as torchvision's ImageFolder sorts them (by folder, then name).

    Links are followed, but a folder whose real path is in `seen` (real path -> path first met) is
    never entered again: a link loop (`a/loop -> ..`) or a second link to one folder is walked once.
    """
    groups = []
    for top, folders, names in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(folders):
            real = os.path.realpath(os.path.join(top, name))
            if _visible(name) and real not in seen:
                seen[real] = os.path.join(top, name)
                kept.append(name)
        folders[:] = kept  # os.walk enters only these
        groups.append((top, sorted(name for name in names if _visible(name))))
    return [os.path.join(top, name) for top, names in sorted(groups) for name in names]


def list_images(root: str) -> FolderImages:
    """Find the images of a folder in ImageFolder's layout (or a flat folder as one class).

    An image file reached by several paths (links) is listed once, under its first path; in two
    classes it is a DataError, since it would be trained on with two labels.
    """
    if not os.path.isdir(root):
        raise DataError(f"--root {root}: no such folder")
    extensions = image_extensions()
    seen = {os.path.realpath(root): root}  # folders walked or to be walked: no class folder re-enters root
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and _visible(entry.name))
    folders = [os.path.join(root, name) for name in classes]
    for folder in folders:
        real = os.path.realpath(folder)
        if real in seen:
            raise DataError(f"{folder}: a link to {seen[real]}, which is already listed; a class folder must "
                            f"be a folder of its own")
        seen[real] = folder
    paths, labels, files, first = [], [], 0, {}  # first: real path of each image -> its index
    for label, folder in enumerate(folders or [root]):
        for path in _walk_files(folder, seen):
            files += 1
            if not path.lower().endswith(extensions):
                continue
            real = os.path.realpath(path)
            if real in first:
                if labels[first[real]] != label:
                    raise DataError(f"{path} is the image {paths[first[real]]} (a link): one image in two classes")
                continue  # the same image again in its own class: counted as ignored
            first[real] = len(paths)
            paths.append(path)
            labels.append(label)
    if classes:
        files += len(_walk_files(root, seen))  # ROOT's own files (README.txt ...): every sub-folder is walked
    labels = np.asarray(labels, dtype=np.int64)
    class_names = classes or [os.path.basename(os.path.normpath(os.path.abspath(root)))]
    empty = [name for index, name in enumerate(class_names) if not np.any(labels == index)]
    if classes and empty:
        raise DataError(f"{os.path.join(root, empty[0])}: class folder holds no image files")
    if not paths:
        raise DataError(f"--root {root}: no image files found (looked for {', '.join(extensions[:8])}, ...)")
    return FolderImages(root, paths, labels, class_names, flat=not classes, ignored=files - len(paths))


def parse_size(text: str) -> tuple[int, int]:
    """'32x48' -> (32, 48) as (height, width); '32' -> (32, 32); DataError otherwise."""
    parts = str(text).lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DataError(f"--size {text!r} not understood: use HxW, e.g. 32x32 (or one number for a square)")
    return int(parts[0]), int(parts[-1])


def load_image(path: str, height: int, width: int, channels: int, resize: str = "crop") -> np.ndarray:
    """One image file -> uint8 [height, width, channels]; DataError naming the file if PIL cannot read it."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as opened:
            opened.load()  # Image.open is lazy: a truncated or corrupt file fails here
            picture = opened
            if picture.mode == "I" or picture.mode.startswith("I;16"):
                # 16-bit grey (PNG, TIFF): keep the top byte; PIL's own convert clips at 255 (all white)
                values = np.clip(np.asarray(picture, dtype=np.int64), 0, 65535) >> 8
                picture = Image.fromarray(values.astype(np.uint8), "L")
            if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
                # transparency composited onto white (what a viewer shows)
                rgba = picture.convert("RGBA")
                picture = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            picture = picture.convert("L" if channels == 1 else "RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise DataError(f"{path}: not an image PIL can read ({one_line(error)})") from None
    source_width, source_height = picture.size
    if resize == "exact":
        picture = F.resize(picture, [height, width], interpolation=InterpolationMode.BICUBIC)
    else:
        # The smallest scale at which the image covers HxW, then the centre HxW of it.
        scale = max(height / source_height, width / source_width)
        size = [max(height, round(source_height * scale)), max(width, round(source_width * scale))]
        if size != [source_height, source_width]:
            picture = F.resize(picture, size, interpolation=InterpolationMode.BICUBIC)
        picture = F.center_crop(picture, [height, width])
    return np.asarray(picture, dtype=np.uint8).reshape(height, width, channels)


def _load_or_none(job) -> np.ndarray | str:
    """load_image for a pool: the pixels, or the one-line error for a bad file."""
    path, height, width, channels, resize = job
    try:
        return load_image(path, height, width, channels, resize)
    except DataError as error:
        return str(error)


def decode_chunks(paths: list[str], height: int, width: int, channels: int, resize: str = "crop",
                  skip_bad: bool = False, workers: int | None = None, chunk_size: int | None = None):
    """Decode paths chunk_size at a time: yields (images uint8 [n, H, W, C], indices of the paths kept, bad paths).

    One process pool for all chunks; without skip_bad the first unreadable file (in path order, whatever
    the workers) raises DataError.
    """
    jobs = [(path, height, width, channels, resize) for path in paths]
    chunk_size = chunk_size or max(1, len(jobs))
    workers = 1 if len(jobs) < PARALLEL_MIN_IMAGES else min(workers or os.cpu_count() or 1, len(jobs))
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for start in range(0, len(jobs), chunk_size):
            part = jobs[start:start + chunk_size]
            results = list(pool.map(_load_or_none, part, chunksize=max(1, min(64, len(part) // (4 * workers))))
                           if pool else map(_load_or_none, part))
            bad = [index for index, result in enumerate(results) if isinstance(result, str)]
            if bad and not skip_bad:
                raise DataError(f"{results[bad[0]]}; pass --skip-bad to leave such files out")
            kept = [index for index, result in enumerate(results) if not isinstance(result, str)]
            images = (np.stack([results[index] for index in kept]) if kept
                      else np.zeros((0, height, width, channels), np.uint8))
            yield images, start + np.asarray(kept, dtype=np.int64), [paths[start + index] for index in bad]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def split_test_fraction(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: (train indices, test indices), each sorted; every class keeps a train image."""
    rng = np.random.default_rng([seed, 13])
    test = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(int(round(fraction * len(members))), len(members) - 1)
        if count > 0:
            test.append(rng.permutation(members)[:count])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    if len(test) == 0:
        raise DataError(f"--test-fraction {fraction} of {len(labels)} images leaves no test images; "
                        f"raise it or pass --test-root")
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def match_test_classes(train: FolderImages, test: FolderImages) -> np.ndarray:
    """The test folder's labels in the training folder's class numbering; DataError if they do not match."""
    if train.flat != test.flat:
        layout = {True: "a flat folder (one class)", False: "class sub-folders"}
        raise DataError(f"--test-root {test.root} has {layout[test.flat]} but --root {train.root} has "
                        f"{layout[train.flat]}; use the same layout for both")
    if train.flat:
        return np.zeros(len(test.paths), dtype=np.int64)
    unknown = [name for name in test.class_names if name not in train.class_names]
    if unknown:
        raise DataError(f"{os.path.join(test.root, unknown[0])}: class {unknown[0]!r} is not a class folder "
                        f"of --root {train.root}")
    mapping = np.asarray([train.class_names.index(name) for name in test.class_names], dtype=np.int64)
    return mapping[test.labels]


DEFAULT_TEST_FRACTION = 0.1


def load_folder(config):
    """The images of a --dataset folder PrepareConfig as a Source: shuffled train and test splits, captions.

    The splits stream: images are decoded a chunk at a time as the shards are written, and `info`
    (files skipped, captions used) is complete once both streams have run.
    """
    from data_prep.captions import caption_key, check_caption, read_captions_file

    height, width = parse_size(config.size)
    found = list_images(config.root)
    parts = {}  # split -> (paths, labels, root the paths are relative to)
    fraction = DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction
    if config.test_root is not None:
        test = list_images(config.test_root)
        shared = set(map(os.path.realpath, test.paths)).intersection(map(os.path.realpath, found.paths))
        if shared:
            raise DataError(f"--test-root {config.test_root} and --root {config.root} share {len(shared)} image "
                            f"file(s), e.g. {min(shared)}: test images must not be trained on")
        parts["train"] = (found.paths, found.labels, config.root)
        parts["test"] = (test.paths, match_test_classes(found, test), config.test_root)
        ignored = found.ignored + test.ignored
    else:
        train_index, test_index = split_test_fraction(found.labels, fraction, config.seed)
        for split, index in (("train", train_index), ("test", test_index)):
            parts[split] = ([found.paths[i] for i in index], found.labels[index], config.root)
        ignored = found.ignored
    # Class folders come sorted, so unshuffled shards would each hold one class; the reader's shuffle
    # buffer cannot mix that. The training split is written in a seeded random order.
    paths, labels, root = parts["train"]
    permutation = np.random.default_rng([config.seed, 14]).permutation(len(paths))
    parts["train"] = ([paths[i] for i in permutation], labels[permutation], root)

    table = read_captions_file(config.captions) if config.captions else {}
    # Captions are matched and checked now, before any image is decoded or anything written.
    split_captions = dict.fromkeys(parts)  # None: template captions only
    matched: set[str] = set()
    for split, (paths, labels, root) in parts.items() if table else ():
        captions = []
        for path in paths:
            key = caption_key(os.path.relpath(path, root))
            entry = table.get(key)
            if entry is not None:
                matched.add(key)
                check_caption(entry[0], f"{path} (caption from {entry[1]})")
            captions.append(None if entry is None else entry[0])
        split_captions[split] = captions
    unknown = sorted(set(table) - matched)
    if unknown:
        raise DataError(f"{table[unknown[0]][1]}: no image {unknown[0]} under --root {config.root}"
                        + (f" or --test-root {config.test_root}" if config.test_root else "")
                        + " (paths are relative to the folder the image is in)")
    info = {  # the roots, made absolute, are recorded by prepare
        "test_fraction": None if config.test_root is not None else fraction,
        "resize": config.resize,
        "captions": "templates",
        "captions_file": None if config.captions is None else os.path.abspath(config.captions),
        "captions_from_file": 0,
        "skipped_bad": 0,
        "skipped_bad_files": [],
        "ignored_files": ignored,
    }
    skipped: list[str] = []  # over both splits, as the streams run
    total = sum(len(paths) for paths, _, _ in parts.values())

    def stream(split, paths, labels, root, captions, chunk_size: int):
        kept_here = 0
        for images, kept, bad in decode_chunks(paths, height, width, config.channels, config.resize,
                                               skip_bad=config.skip_bad, workers=config.workers, chunk_size=chunk_size):
            skipped.extend(bad)
            kept_here += len(kept)
            given = None if captions is None else [captions[index] for index in kept.tolist()]
            from_file = info["captions_from_file"] + (0 if given is None else sum(c is not None for c in given))
            # final once both streams have run: every image then either kept or skipped
            kind = "templates" if not from_file else "file" if from_file == total - len(skipped) else "file+templates"
            info.update(captions=kind, captions_from_file=from_file, skipped_bad=len(skipped),
                        skipped_bad_files=sorted(skipped)[:100])
            if len(kept):
                yield images, labels[kept], given
        if kept_here == 0:
            raise DataError(f"{root}: no readable images for the {split} split")

    splits = {split: SourceSplit(None, None, size=len(paths),
                                 stream=functools.partial(stream, split, paths, labels, root, split_captions[split]))
              for split, (paths, labels, root) in parts.items()}
    return Source("folder", list(found.class_names), splits, info=info)
