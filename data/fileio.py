"""Files: written so that readers never see half of one (temporary name, fsync, rename); jsonl read with file:line errors."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in chunks (shards and caches can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp creates 0600; the result gets the usual umask permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(content.encode() if isinstance(content, str) else content)


class JsonlError(ValueError):
    """A jsonl file that cannot be read as asked; the message names the file and line."""


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = (),
               skip_bad_last_line: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, each a JSON object holding the `required` keys.

    skip_bad_last_line: a last line that is not valid JSON is ignored (a writer killed mid-line left it)."""
    path = Path(path)
    if not path.is_file():
        raise JsonlError(f"{path}: file not found")
    pending = None  # a bad line that is fine only if nothing but blank lines follows it
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            if pending is not None:
                raise pending
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                pending = JsonlError(f"{path}:{line_no}: not valid JSON ({e})")
                if not skip_bad_last_line:
                    raise pending from None
                continue
            if not isinstance(obj, dict):
                raise JsonlError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise JsonlError(f"{path}:{line_no}: missing key(s) {missing}; expected {list(required)}")
            yield line_no, obj
