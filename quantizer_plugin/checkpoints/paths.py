"""File names that come from a checkpoint, checked before anything is opened or written.

A checkpoint may come from anyone on the Hub. The names it carries (shard names in model.safetensors.index.json,
the paths of a Hub repository's files, the entries of its folder that a conversion copies into its output) are
data, never trusted as paths: a shard named `../evil.safetensors` must not make us read a file outside the
checkpoint's folder, nor write one outside the output folder.

- `plain_file_name`: a name that must be one file of one folder (a shard): no path separator, NUL, `.` or `..`.
- `relative_path`: a path below a folder (a Hub repository's file): relative, no `..` part, no NUL, no backslash.
- `inside`: where a path really leads (symbolic links followed) lies inside a folder. A folder of the Hub's cache
  (`models--owner--name/snapshots/<revision>`) links each file to `../../blobs/`, so there the repository's cache
  folder is the bound.
Each error names the file or entry that carries the bad name.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

HUB_CACHE_KINDS = ("models--", "datasets--", "spaces--")


class CheckpointPathError(ValueError):
    """A name from a checkpoint that would lead outside its folder; the message names where the name came from."""


def plain_file_name(name: object, source: str) -> str:
    """`name` if it is one plain file name; `source` says which file and entry carried it."""
    if not isinstance(name, str) or not name:
        raise CheckpointPathError(f"{source}: {name!r} is not a file name")
    if "\0" in name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointPathError(f"{source}: {name!r} is not a plain file name (a path separator, NUL, '.' or '..')")
    return name


def relative_path(name: object, source: str) -> PurePosixPath:
    """`name` as a path below a folder, if it stays below it."""
    if not isinstance(name, str) or not name:
        raise CheckpointPathError(f"{source}: {name!r} is not a path")
    path = PurePosixPath(name)
    if "\0" in name or "\\" in name or path.is_absolute() or ".." in path.parts or not path.parts:
        raise CheckpointPathError(f"{source}: {name!r} leads outside its folder (an absolute path, '..', NUL or '\\')")
    return path


def bound_of(folder: Path) -> Path:
    """The folder the files of `folder` may really lie in: `folder`, or for a Hub cache snapshot its repository's
    cache folder (whose blobs/ the snapshot's links point into)."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(HUB_CACHE_KINDS):
        return real.parent.parent
    return real


def inside(folder: Path, path: Path, source: str) -> Path:
    """`path`, if it (symbolic links followed) lies inside `folder`'s bound."""
    bound = bound_of(folder)
    real = Path(os.path.realpath(path))
    if real != bound and bound not in real.parents:
        raise CheckpointPathError(f"{source}: {path} leads outside {folder} (to {real})")
    return path


def check_tree(folder: Path, top: Path, source: str) -> None:
    """Every entry under `top` (itself included) lies inside `folder`'s bound, symbolic links followed: what a copy
    of `top` would read."""
    inside(folder, top, source)
    if top.is_dir() and not top.is_symlink():
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                inside(folder, Path(root) / name, source)


def check_checkpoint_files(files: list[str] | None, name_or_path: str | None) -> None:
    """The safetensors files transformers resolved for a load from a local folder (joined from the index's shard
    names) lie inside that folder. Files of a Hub repository are kept inside its snapshot folder by huggingface_hub,
    which refuses a name that would leave it."""
    if not files or not name_or_path or not Path(name_or_path).is_dir():
        return
    folder = Path(name_or_path)
    for file in files:
        source = f"{folder}: checkpoint file {file}"
        if ".." in Path(file).parts:
            raise CheckpointPathError(f"{source} leads outside the folder ('..' in a shard name of its index)")
        inside(folder, Path(file), source)
