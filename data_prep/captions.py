"""Captions from templates: a few dozen per dataset, filled with the class name and chosen by the seed."""

from __future__ import annotations

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

TEMPLATES = {"mnist": DIGIT_TEMPLATES, "digits": DIGIT_TEMPLATES, "cifar10": OBJECT_TEMPLATES}


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
    captions = [template.format(**fields) for template in TEMPLATES[dataset]]
    # Keep the length contract even for unexpected class names: cut at a character boundary.
    return [_clip(caption) for caption in captions]


def _clip(caption: str) -> str:
    data = caption.encode("utf-8")[:MAX_CAPTION_BYTES]
    return data.decode("utf-8", errors="ignore")


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
