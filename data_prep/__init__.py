"""Data preparation: images -> quantized byte sequences in webdataset shards, and the reader for them.

This is the package's one door: train and sample import only the names below (tests/test_imports.py
checks). They load on first use (PEP 562), so `python -m data_prep.prepare` and its worker processes
do not pay for torch, torchvision and webdataset until something asks for the reader or a grid.
Preparing and verifying are the command modules themselves (python -m data_prep.prepare / .verify,
lit-prepare / lit-verify): their names here would be the submodules, so they are not re-exported.
"""

import importlib

_EXPORTS = {
    "manifest": ["Manifest", "load_manifest", "manifest_path"],
    "reader": ["train_batches", "eval_batches", "read_samples"],
    "codec": ["encode_images", "decode_sequences"],
    "captions": ["caption_for"],
    "grids": ["grid_tensor", "save_grid", "save_png", "to_chw"],
    "errors": ["DataError"],
    "verify": ["shard_file_problems"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    """The exported name from its module, imported on first use."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    return getattr(importlib.import_module(f"data_prep.{_MODULE_OF[name]}"), name)
