"""Finding media files, their labels (real/fake) and splits, and splitting by source without leakage.

Layouts understood (folder names case-insensitive):
  <data_dir>/{real,fake}/**            (also original/manipulated, and MesoNet's df/f2f for fakes)
  <data_dir>/{train,val,test}/{real,fake}/**   (val may be missing: it is then split off train;
                                                MesoNet's train_test/validation folders work too)
Sources: all frames of one video (images in one sub-folder, or named <video>_<frame>), a fake and
its original when metadata.csv / metadata.json says so (DFDC "original" column), and FaceForensics++
names (xxx, xxx_yyy, <prefix>_xxx_yyy) are kept in one split.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import logging
import os
import re
from typing import Iterable, Iterator

import numpy as np

from data_pipelines.preprocessing import MediaError, media_kind

REAL, FAKE = 1.0, 0.0
CLASS_FOLDERS = {"real": REAL, "original": REAL, "originals": REAL,
                 "fake": FAKE, "fakes": FAKE, "manipulated": FAKE,
                 "df": FAKE, "deepfake": FAKE, "deepfakes": FAKE, "f2f": FAKE}  # MesoNet's folders: df, f2f
SPLIT_FOLDERS = {"train": "train", "training": "train", "train_test": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test"}
METADATA_FILES = ("metadata.csv", "metadata.json")

_FFPP_NAME = re.compile(r"(?:[a-z0-9]+_)*?(\d{3})(?:_(\d{3}))?")
_FRAME_SUFFIX = re.compile(r"(.+?)[_-](?:frame|frm|f)?\d+")


@dataclasses.dataclass(frozen=True)
class LabelledFile:
    """A media file with its label (1.0 = real), source group (files of one source video or FF++ group
    share a split) and the name of the data source it belongs to (``DataSource.name``; "" for one folder)."""

    path: str
    label: float
    source: str
    source_name: str = ""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A named labelled folder and its share of every training batch (weights are normalised over sources)."""

    name: str
    path: str
    weight: float = 1.0


_SOURCE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_data_sources(spec: str) -> list[DataSource]:
    """``--data_dir``: one folder, or several named ones with weights, ``name=path[:weight],...``.

    One plain folder is the source named after it, weight 1. ValueError (one line) for a malformed spec,
    a repeated name, a non-positive weight or a name that is not an identifier.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("--data_dir is empty")
    if "=" not in spec:
        return as_data_sources(spec)
    found: list[DataSource] = []
    for item in spec.split(","):
        name, separator, rest = item.strip().partition("=")
        if not separator or not rest:
            raise ValueError(f"--data_dir item {item!r}: expected name=path[:weight]")
        path, weight = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                pass  # a colon in the path itself
        if not _SOURCE_NAME.fullmatch(name):
            raise ValueError(f"--data_dir source name {name!r}: use letters, digits and _ (starting with a letter)")
        if not weight > 0 or weight != weight or weight == float("inf"):
            raise ValueError(f"--data_dir source {name}: weight {tail} must be a positive number")
        if any(source.name == name for source in found):
            raise ValueError(f"--data_dir names source {name!r} twice")
        found.append(DataSource(name, path, weight))
    return found


@dataclasses.dataclass
class LabelledSplits:
    """Labelled files per split; test is empty when the data has no test/ folder."""

    train: list[LabelledFile]
    val: list[LabelledFile]
    test: list[LabelledFile]


def link_problem(path: str | os.PathLike) -> str | None:
    """"broken symbolic link" or "symbolic link loop" when ``path`` is a link that leads nowhere, else None."""
    try:
        if not os.path.islink(path):
            return None
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
    return None


def _walk_files(root: str) -> Iterator[str]:
    """All files below ``root``, sorted per directory, following symlinks once (no loops), skipping dot-folders.

    Streams: one directory is listed at a time, so memory does not grow with the number of files.
    A symbolic link that leads nowhere (dangling, or a loop) is yielded too, so that whoever reads it
    reports it (see link_problem) instead of it vanishing silently. Other non-regular files (FIFOs,
    sockets, devices) are skipped: opening them could block.
    """
    visited: set[str] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        real_dir = os.path.realpath(directory)
        if real_dir in visited:
            continue
        visited.add(real_dir)
        try:
            with os.scandir(directory) as scanner:
                entries = sorted(scanner, key=lambda e: e.name)
        except OSError as err:
            logging.warning("cannot list %s: %s", directory, err.strerror or err)
            continue
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:  # e.g. ELOOP: a link to itself
                is_dir = is_file = False
            if is_dir:
                if not entry.name.startswith("."):
                    subdirs.append(entry.path)
            elif is_file or (entry.is_symlink() and link_problem(entry.path)):
                yield entry.path
        del entries
        stack.extend(reversed(subdirs))


def find_media(path: str | os.PathLike, kinds: Iterable[str] = ("image", "video")) -> Iterator[str]:
    """Media files at ``path``: the file itself, or every image/video below a folder (sorted, streaming).

    An explicitly named file is yielded whatever its extension (reading it reports unsupported types).
    """
    path = os.fspath(path)
    kinds = tuple(kinds)
    if os.path.isfile(path) or link_problem(path):  # a named broken link: reading it says so
        yield path
        return
    if not os.path.isdir(path):
        raise MediaError(f"{path}: no such file or directory")
    for file_path in _walk_files(path):
        if media_kind(file_path) in kinds:
            yield file_path


def _child_folders(directory: str, names: dict) -> dict[str, list[str]]:
    """Sub-folders of ``directory`` whose lower-cased name is a key of ``names``, grouped by its value."""
    found: dict = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.is_dir() and entry.name.lower() in names:
            found.setdefault(names[entry.name.lower()], []).append(entry.path)
    return found


@dataclasses.dataclass(frozen=True)
class _SourceInfo:
    video: str
    original: str | None


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name.strip()))[0].lower()


def normalised_csv_rows(handle: Iterable[str]) -> Iterator[dict[str, str]]:
    """The rows of a metadata.csv as dicts, column names lower-cased and values stripped (raises csv.Error)."""
    for row in csv.DictReader(handle):
        yield {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}


def _read_metadata(path: str) -> dict[str, _SourceInfo]:
    """name stem -> (video, original) from a DFDC-style metadata.csv / metadata.json."""
    entries: dict[str, _SourceInfo] = {}

    def add(names: list[str], video: str, original: str | None) -> None:
        info = _SourceInfo(_stem(video), _stem(original) if original else None)
        for name in names:
            if name:
                entries[_stem(name)] = info

    try:
        with open(path, encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                for row in normalised_csv_rows(f):
                    names = [row.get(k, "") for k in ("file", "filename", "path", "name", "video")]
                    # DFDC names a file's video; FaceForensics++ crops name their group (a real frame and
                    # the fakes made on it), which must share a split just the same.
                    video = row.get("video") or row.get("group") or next((n for n in names if n), "")
                    if video:
                        add(names, video, row.get("original"))
            else:
                data = json.load(f)
                records = data.items() if isinstance(data, dict) else (
                    (r.get("file") or r.get("filename") or r.get("video", ""), r) for r in data)
                for name, record in records:
                    if isinstance(record, dict) and name:
                        add([name], record.get("video") or name, record.get("original"))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, csv.Error) as err:
        logging.warning("ignoring unreadable metadata file %s: %s", path, " ".join(str(err).split()))
    return entries


def _source_keys(path: str, class_dir: str, metadata: dict[str, _SourceInfo]) -> list[str]:
    """Keys naming the source(s) of a file; files sharing any key must share a split."""
    relative_parts = os.path.relpath(path, class_dir).split(os.sep)
    stem = _stem(path)
    if media_kind(path) == "image" and len(relative_parts) > 1:
        name = relative_parts[-2].lower()  # frames of one video in one folder
    elif media_kind(path) == "image" and not _FFPP_NAME.fullmatch(stem) and _FRAME_SUFFIX.fullmatch(stem):
        name = _FRAME_SUFFIX.fullmatch(stem).group(1)
    else:
        name = stem
    info = metadata.get(stem) or metadata.get(name)
    if info is not None:
        names = [info.video] + ([info.original] if info.original else [])
    else:
        names = [name]
    keys = []
    for source_name in names:
        ffpp = _FFPP_NAME.fullmatch(source_name)
        if ffpp:
            keys += [f"ffpp:{number}" for number in ffpp.groups() if number]
        else:
            keys.append(f"name:{source_name}")
    return keys


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        root = key
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[key] != root:
            self.parent[key], key = root, self.parent[key]
        return root

    def union(self, keys: list[str]) -> None:
        roots = sorted({self.find(k) for k in keys})
        for other in roots[1:]:
            self.parent[other] = roots[0]


def _labelled_files(split_dir: str, kinds: tuple[str, ...], required: bool) -> list[tuple[str, float, str]]:
    """(path, label, class folder) for every media file below the class folders of ``split_dir``."""
    class_dirs = _child_folders(split_dir, CLASS_FOLDERS)
    files = []
    for label, folder_name in ((REAL, "real (or original)"), (FAKE, "fake (or manipulated)")):
        count = 0
        for class_dir in class_dirs.get(label, []):
            for path in find_media(class_dir, kinds):
                files.append((path, label, class_dir))
                count += 1
        if required and count == 0:
            raise ValueError(f"no {'/'.join(kinds)} files in a {folder_name} folder under {split_dir}; "
                             f"expected {split_dir}/real/... and {split_dir}/fake/...")
    return files


def load_labelled_splits(data_dir: str | os.PathLike, kinds: Iterable[str] = ("image", "video"),
                         val_fraction: float = 0.1, seed: int = 0, require_fakes: bool = True,
                         allow_one_class: bool = False) -> LabelledSplits:
    """Labelled train/val/test files of ``data_dir`` (see module docstring for layouts).

    Without a val/ folder, ``val_fraction`` of the train files is split off by source.
    Raises ValueError (one line) for a missing folder or a class without files (any one class will do
    with ``allow_one_class``, e.g. to evaluate a set of fakes; real files alone with not ``require_fakes``).
    """
    data_dir = os.fspath(data_dir)
    kinds = tuple(kinds)
    if os.path.isfile(data_dir):
        raise ValueError(f"data directory {data_dir} is a file; give the folder that holds real/ and fake/ "
                         "(or train/ and val/)")
    if not os.path.isdir(data_dir):
        raise ValueError(f"data directory {data_dir} does not exist")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise ValueError(f"data directory {data_dir} cannot be read (permission denied)")
    split_dirs = _child_folders(data_dir, SPLIT_FOLDERS)
    if split_dirs and "train" not in split_dirs:
        raise ValueError(f"{data_dir} has {'/'.join(sorted(split_dirs))} folders but no train/ folder")
    roots = {split: dirs[0] for split, dirs in split_dirs.items()} if split_dirs else {"train": data_dir}
    if not _child_folders(roots["train"], CLASS_FOLDERS):
        raise ValueError(f"no real/ or fake/ folders under {roots['train']} "
                         f"(expected real/ and fake/, or train/real, train/fake, ...)")
    metadata: dict[str, _SourceInfo] = {}
    for path in _walk_files(data_dir):
        if os.path.basename(path).lower() in METADATA_FILES:
            metadata.update(_read_metadata(path))

    union_find = _UnionFind()
    splits: dict[str, list[LabelledFile]] = {"train": [], "val": [], "test": []}
    keyed: dict[str, list[tuple[str, float, list[str]]]] = {}
    for split, root in roots.items():
        files = _labelled_files(root, kinds, required=(split == "train") and require_fakes and not allow_one_class)
        if split == "train" and not files and allow_one_class:
            raise ValueError(f"no {'/'.join(kinds)} files in the real/ or fake/ folders under {root}")
        if split == "train" and not require_fakes and not any(label == REAL for _, label, _ in files):
            raise ValueError(f"no {'/'.join(kinds)} files in a real (or original) folder under {root}")
        keyed[split] = []
        for path, label, class_dir in files:
            keys = _source_keys(path, class_dir, metadata)
            union_find.union(keys)
            keyed[split].append((path, label, keys))
    for split, files in keyed.items():
        splits[split] = [LabelledFile(path, label, union_find.find(keys[0])) for path, label, keys in files]

    if "val" not in roots:
        splits["train"], splits["val"] = split_by_source(splits["train"], val_fraction, seed)
    for split, files in splits.items():
        if files:
            logging.info("%s split: %d files (%d real, %d fake) from %d sources", split, len(files),
                         sum(f.label == REAL for f in files), sum(f.label == FAKE for f in files),
                         len({f.source for f in files}))
    return LabelledSplits(**splits)


def as_data_sources(data: str | os.PathLike | list[DataSource]) -> list[DataSource]:
    """``data`` as a list of sources: a folder path is the one source named after it."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        return [DataSource(re.sub(r"\W", "_", os.path.basename(os.path.normpath(path))) or "data", path)]
    return list(data)


def load_sources(data_sources: list[DataSource], kinds: Iterable[str] = ("image", "video"),
                 val_fraction: float = 0.1, seed: int = 0, require_fakes: bool = True) -> LabelledSplits:
    """load_labelled_splits of every source, each file tagged with its source's name (source groups are
    kept apart across sources). With one source this is load_labelled_splits of its folder."""
    merged = LabelledSplits([], [], [])
    for data_source in data_sources:
        try:
            splits = load_labelled_splits(data_source.path, kinds, val_fraction, seed, require_fakes)
        except ValueError as error:
            if len(data_sources) == 1:
                raise
            raise ValueError(f"source {data_source.name}: {error}") from None
        for split in ("train", "val", "test"):
            getattr(merged, split).extend(
                dataclasses.replace(f, source=f"{data_source.name}/{f.source}", source_name=data_source.name)
                for f in getattr(splits, split))
    return merged


def split_by_source(files: list[LabelledFile], val_fraction: float,
                    seed: int) -> tuple[list[LabelledFile], list[LabelledFile]]:
    """(train, val): whole sources go to val, in a seeded random order, until val holds ``val_fraction`` of the files."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sources = sorted({f.source for f in files})
    sizes: dict[str, int] = {}
    for f in files:
        sizes[f.source] = sizes.get(f.source, 0) + 1
    target = val_fraction * len(files)
    val_sources: set[str] = set()
    val_size = 0
    for index in np.random.default_rng(seed).permutation(len(sources)):
        if val_size >= target or (val_size > 0 and val_size + sizes[sources[index]] > 1.5 * target):
            continue
        val_sources.add(sources[index])
        val_size += sizes[sources[index]]
    if val_fraction > 0 and len(val_sources) == len(sources):
        raise ValueError(f"cannot split {len(files)} files from {len(sources)} source(s) into train and val; "
                         "add more sources or provide train/ and val/ folders")
    train = [f for f in files if f.source not in val_sources]
    val = [f for f in files if f.source in val_sources]
    return train, val
