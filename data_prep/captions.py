"""Captions: from templates (a few dozen per dataset, filled with the class name and chosen by the seed),
or from a captions file (JSONL or CSV: image path relative to the root, caption)."""

from __future__ import annotations

import csv
import json
import os
import random

import numpy as np

from data_prep.errors import DataError

# Captions are fed to the model as UTF-8 bytes padded to a fixed length (model.caption_len = 48).
MAX_CAPTION_BYTES = 48

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {word}: "seven", {digit}: "7".  Handwriting and print templates both fit MNIST and the built-in digits.
DIGIT_TEMPLATES = [
    "a handwritten {word}",
    "the digit {digit}",
    "the digit {word}",
    "a handwritten {digit}",
    "the number {word}",
    "the number {digit}",
    "a {word}",
    "a {digit}",
    "{word}",
    "{digit}",
    "a handwritten digit {digit}",
    "a handwritten number {word}",
    "a sloppy {word}",
    "a neat {word}",
    "a neatly written {digit}",
    "a quickly scribbled {word}",
    "a scribbled {digit}",
    "a {word} written by hand",
    "a {digit} written by hand",
    "the digit {word}, handwritten",
    "a white {word} on black",
    "a white digit {digit} on a black background",
    "a small grayscale image of a {digit}",
    "a grayscale picture of the digit {word}",
    "a drawing of the number {word}",
    "a pen drawing of a {word}",
    "an image of the digit {digit}",
    "a picture of a handwritten {word}",
    "handwritten digit: {digit}",
    "digit {digit}",
    "number {word}",
    "a bold {word}",
    "a thin {word}",
    "a slanted {word}",
    "a tilted handwritten {digit}",
    "someone wrote a {word}",
]

# {a}: "a" or "an" for the name, {name}: "frog".
OBJECT_TEMPLATES = [
    "a small picture of {a} {name}",
    "a photo of {a} {name}",
    "a picture of {a} {name}",
    "an image of {a} {name}",
    "a tiny photo of {a} {name}",
    "a low-resolution photo of {a} {name}",
    "a blurry photo of {a} {name}",
    "a pixelated photo of {a} {name}",
    "a small color photo of {a} {name}",
    "a color image of {a} {name}",
    "a close-up photo of {a} {name}",
    "a photo of the {name}",
    "a picture of the {name}",
    "a snapshot of {a} {name}",
    "a cropped photo of {a} {name}",
    "a 32x32 photo of {a} {name}",
    "a thumbnail of {a} {name}",
    "{a} {name}",
    "the {name}",
    "{name}",
    "a photo showing {a} {name}",
    "an image showing {a} {name}",
    "a bright photo of {a} {name}",
    "a dark photo of {a} {name}",
    "a photo of {a} {name} outdoors",
    "a grainy photo of {a} {name}",
    "a low-quality photo of {a} {name}",
    "there is {a} {name} in this photo",
    "this is {a} {name}",
    "{a} {name} in a small photo",
    "a centered photo of {a} {name}",
    "a photo of one {name}",
]

# Photos of any size: the object templates less the one that names CIFAR's 32x32.
PHOTO_TEMPLATES = [template for template in OBJECT_TEMPLATES if "32x32" not in template]

TEMPLATES = {"mnist": DIGIT_TEMPLATES, "digits": DIGIT_TEMPLATES, "cifar10": OBJECT_TEMPLATES,
             "imagenet32": OBJECT_TEMPLATES, "imagenet64": PHOTO_TEMPLATES, "folder": PHOTO_TEMPLATES}


def _digit_of(class_name: str) -> int:
    """'7', '7 - seven' or 'seven' -> 7."""
    head = class_name.split(" ")[0].strip()
    if head.isdigit() and 0 <= int(head) <= 9:
        return int(head)
    if class_name in DIGIT_WORDS:
        return DIGIT_WORDS.index(class_name)
    raise DataError(f"class name {class_name!r} is not a digit")


def captions_for_class(dataset: str, class_name: str) -> list[str]:
    """Every caption the templates give for one class, in template order (each <= 48 UTF-8 bytes)."""
    if dataset not in TEMPLATES:
        raise DataError(f"no caption templates for dataset {dataset!r}")
    if TEMPLATES[dataset] is DIGIT_TEMPLATES:
        digit = _digit_of(class_name)
        fields = dict(word=DIGIT_WORDS[digit], digit=str(digit))
    else:
        name = class_name.replace("_", " ")
        fields = dict(name=name, a="an" if name[:1].lower() in "aeiou" else "a")
    # Keep the length contract even for unexpected class names: cut at a character boundary.
    return [_clip(template.format(**fields)) for template in TEMPLATES[dataset]]


def _clip(caption: str) -> str:
    return caption.encode("utf-8")[:MAX_CAPTION_BYTES].decode("utf-8", errors="ignore")


def caption_for(dataset: str, class_name: str, rng) -> str:
    """One caption for a class, the template chosen by rng (numpy Generator or random.Random)."""
    options = captions_for_class(dataset, class_name)
    if isinstance(rng, random.Random):
        return options[rng.randrange(len(options))]
    return options[int(np.asarray(rng.integers(len(options))))]


def captions_for_labels(dataset: str, class_names: list[str], labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Captions for many labels at once (one template draw per sample, vectorised)."""
    tables = [captions_for_class(dataset, name) for name in class_names]
    choices = rng.integers(0, len(tables[0]), size=len(labels))
    return [tables[label][choice] for label, choice in zip(labels.tolist(), choices.tolist())]


def check_caption(caption: str, where: str) -> str:
    """Return caption if it is 1..MAX_CAPTION_BYTES bytes of UTF-8, else DataError naming `where`."""
    size = len(caption.encode("utf-8"))
    if size == 0:
        raise DataError(f"{where}: empty caption")
    if size > MAX_CAPTION_BYTES:
        raise DataError(f"{where}: caption is {size} bytes of UTF-8, longer than the limit of {MAX_CAPTION_BYTES} "
                        f"(model.caption_len): {caption[:40]!r}...")
    return caption


def caption_key(relative_path: str) -> str:
    """The form captions-file paths are matched in: normalised, forward slashes."""
    return os.path.normpath(relative_path).replace(os.sep, "/")


def read_captions_file(path: str) -> dict[str, tuple[str, str]]:
    """A captions file -> {image path relative to the root: (caption, 'FILE line N')}.

    JSONL (.jsonl/.json): one object a line, {"image": "cats/001.jpg", "caption": "a cat on a mat"}.
    CSV (.csv): two columns, image and caption, with or without an `image,caption` header row.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".jsonl", ".json", ".csv"):
        raise DataError(f"--captions {path}: use a .jsonl or .csv file (image path relative to the root, caption)")
    try:
        # utf-8-sig: Excel and Notepad save "UTF-8" with a byte-order mark, which plain utf-8 keeps as
        # text (a CSV header no longer recognised, a JSONL first line that is not JSON)
        with open(path, encoding="utf-8-sig", newline="") as stream:
            rows = list(_jsonl_rows(stream, path) if extension != ".csv" else _csv_rows(stream, path))
    except UnicodeDecodeError as error:
        raise DataError(f"--captions {path}: not UTF-8 text ({error.reason})") from None
    found: dict[str, tuple[str, str]] = {}
    for line, image, caption in rows:
        where = f"{path} line {line}"
        if not isinstance(image, str) or not isinstance(caption, str) or not image:
            raise DataError(f"{where}: expected an image path and a caption, both text")
        key = caption_key(image)
        if key in found:
            raise DataError(f"{where}: a second caption for {image} (the first is at {found[key][1]})")
        found[key] = (caption, where)
    return found


def _jsonl_rows(stream, path: str):
    for line, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {line}: not JSON ({error.msg})") from None
        if not isinstance(entry, dict) or set(entry) != {"image", "caption"}:
            raise DataError(f'{path} line {line}: expected {{"image": PATH, "caption": TEXT}}')
        yield line, entry["image"], entry["caption"]


def _csv_rows(stream, path: str):
    reader = csv.reader(stream)
    for row in reader:
        line = reader.line_num  # the row's last line: a quoted caption may span several
        if not row:
            continue
        if line == 1 and [cell.strip().lower() for cell in row] == ["image", "caption"]:
            continue
        if len(row) != 2:
            raise DataError(f"{path} line {line}: expected 2 columns (image, caption), got {len(row)}")
        yield line, row[0], row[1]
