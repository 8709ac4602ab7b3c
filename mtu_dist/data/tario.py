"""Read shard entries in memory with the standard tarfile module (never extracted to disk)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from mtu_dist.errors import UserError


def split_member_name(name: str) -> tuple[str, str]:
    """`synth-indoor/train/000001.image.png` -> (key, 'image.png'); WebDataset's rule: the key ends
    at the first dot of the last path component."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"member '{name}' has no extension")
    return (f"{head}/{stem}" if head else stem), ext


def iter_entries(path: Path, data: bytes | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {member: bytes}) in archive order (from `data`, the file's bytes already read and
    checked, when given). Raises UserError on a corrupt/truncated tar."""
    try:
        with tarfile.open(path, "r:") if data is None else tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            key, members = None, {}
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member_name(info.name)
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                if ext in members:  # two different bytes for one member: which one a reader took would be arbitrary
                    raise UserError(f"{path}: {k}: member {ext} appears twice")
                members[ext] = tar.extractfile(info).read()
            if key is not None:
                yield key, members
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or truncated tar ({type(e).__name__}: {e})") from None
