"""File safety, one way for every package: a file or a folder is written under a temporary name
beside its final one and renamed into place, so that a crash leaves the old one or the new one,
never half of one; fsync makes the renames durable; sha256 checks a file read back later."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path) -> None:
    """Flush a written file to disk, so that a rename that publishes it cannot outlive its bytes."""
    with open(path, "rb") as stream:
        os.fsync(stream.fileno())


@contextlib.contextmanager
def atomic_file(path, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary stream to a temporary file beside path (same folder, so os.replace is atomic): it
    becomes path when the block ends without an error and is removed otherwise. durable=False skips
    the fsync, for many small outputs that can be made again (per-image PNGs: after a power cut the
    newest may be empty, never half of an old and a new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.chmod(temporary, 0o644)  # mkstemp makes 0600; outputs are meant to be shared and viewed
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def fsync_folder(path) -> None:
    """Make the renames inside a folder durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def publish_folder(temporary, final) -> None:
    """Rename a fully written folder to `final`; an older `final` is renamed aside (FINAL.replaced-XXXX),
    then deleted, so that a crash leaves the old folder or the new one, never a mixture."""
    fsync_folder(temporary)
    aside = f"{final}.replaced-{secrets.token_hex(4)}" if os.path.exists(final) else None
    if aside:
        os.replace(final, aside)
    try:
        os.replace(temporary, final)
    except BaseException:
        if aside:
            os.replace(aside, final)
        raise
    if aside:
        shutil.rmtree(aside, ignore_errors=True)
    fsync_folder(os.path.dirname(os.path.abspath(final)))


def check_writable(folder) -> None:
    """OSError now, before any work is done, if files cannot be created in folder (or in the folders
    that would be made for it); nothing is left behind."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
    tempfile.TemporaryFile(dir=existing).close()


def writable_message(flag: str, path, error: OSError) -> str:
    """One line for an output path that cannot be written: the flag, the path and why."""
    return f"{flag} {path}: cannot write there ({error.strerror or error}: {error.filename or path})"
