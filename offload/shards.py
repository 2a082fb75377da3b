"""Converted expert weights on disk: written once per (model file, layer, backend version), memory-mapped
on every later start, rebuilt when stale or damaged.

A layer's shard is one file of named arrays, each (E, ...) with one slice per expert:
    magic "DSRUNSHD" | u32 format | u32 manifest length | sha256 of the manifest (32 bytes) | manifest JSON
    | zero padding to ALIGN | each array, ALIGN-aligned
The manifest holds what the shard was made from (`meta`: model key, backend, version, the layer's GGUF
tensors), the file's size, and per array its dtype, shape, offset and a hash of sampled pages. A shard
is used only if the magic, the manifest hash, the meta, the size and every sample hash agree: a
truncated file, a shard of another model or backend version, or damaged pages at the sampled places
are rebuilt, never read. Checking every byte would read the whole model at each start; sampling
SAMPLES pages of each array costs about a millisecond.

Files are written under a temporary name and renamed into place, so a crash mid-conversion leaves
nothing that looks like a shard. Layout under the cache root ($DSRUN_CACHE_DIR, default ~/.cache/dsrun):
    shards/<model stem>-<hash of its path>/<model key>/<backend>-v<version>/blk.<layer>.shard
When a model file changes (new size, mtime or header), its shards get a new model key and the old
key's directory is removed.

Legend: E experts, n_items experts converted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from dsrun.gguf_file import TensorInfo

MAGIC = b"DSRUNSHD"
FORMAT = 1
ALIGN = 4096  # page-aligned arrays map straight into views
PREFIX = struct.Struct("<8sII32s")  # magic, format, manifest length, manifest sha256
HEADER_HASH_BYTES = 1 << 20  # the model key hashes the file's first MiB: GGUF metadata and tensor table
SAMPLES = 16  # pages hashed per array
PAGE = 4096
MAX_MANIFEST = 1 << 24

Convert = Callable[[int], dict[str, np.ndarray]]  # expert -> its arrays (same names and shapes for all)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("DSRUN_CACHE_DIR") or Path.home() / ".cache" / "dsrun"
    return Path(root).expanduser()


def model_key(path: Path) -> str:
    """Identifies one version of a model file: its size, mtime and the hash of its header bytes."""
    st = path.stat()
    with open(path, "rb") as fh:
        head = hashlib.sha256(fh.read(HEADER_HASH_BYTES)).hexdigest()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{head}".encode()).hexdigest()[:16]


def layer_meta(backend: str, version: int, layer: int, tensors: tuple[TensorInfo, ...]) -> dict:
    """What a layer's shard is made from: a shard whose meta differs is stale."""
    return {
        "backend": backend,
        "version": version,
        "layer": layer,
        "tensors": [[t.name, t.qtype.name, list(t.shape), t.offset] for t in tensors],
    }


class ShardStore:
    def __init__(self, cache_dir: str | Path | None = None):
        self.root = cache_root(cache_dir) / "shards"

    def model_dir(self, model_path: Path) -> tuple[Path, str]:
        """The directory of this model file's path and its current key."""
        model_path = Path(model_path).resolve()
        where = hashlib.sha256(str(model_path).encode()).hexdigest()[:8]
        return self.root / f"{model_path.stem}-{where}", model_key(model_path)

    def path_for(self, model_path: Path, meta: dict) -> Path:
        base, key = self.model_dir(model_path)
        return base / key / f"{meta['backend']}-v{meta['version']}" / f"blk.{meta['layer']}.shard"

    def load_or_convert(
        self, model_path: Path, meta: dict, n_items: int, convert: Convert, label: str
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The layer's arrays, memory-mapped from its shard; converted and written first if needed.
        Returns (arrays, whether it converted)."""
        base, key = self.model_dir(model_path)
        meta = meta | {"model_key": key}
        path = self.path_for(model_path, meta)
        arrays = open_shard(path, meta)
        if arrays is not None:
            return arrays, False
        remove_other_keys(base, key)
        write_shard(path, meta, n_items, convert, label)
        arrays = open_shard(path, meta)
        if arrays is None:
            raise OSError(f"the shard just written at {path} does not read back; is the disk full?")
        return arrays, True


def remove_other_keys(base: Path, key: str) -> None:
    """Shards of earlier versions of this model file: never valid again."""
    if base.is_dir():
        for old in base.iterdir():
            if old.name != key and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def convert_in_memory(n_items: int, convert: Convert) -> dict[str, np.ndarray]:
    """The arrays a shard would hold, in RAM (micro-benchmarks, one-off loads)."""
    first = convert(0)
    arrays = {name: np.empty((n_items, *a.shape), a.dtype) for name, a in first.items()}
    for i in range(n_items):
        for name, a in (first if i == 0 else convert(i)).items():
            arrays[name][i] = a
    return arrays


def write_shard(path: Path, meta: dict, n_items: int, convert: Convert, label: str) -> None:
    """Convert every item into a new shard file at `path`, with a progress bar on a terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
            task = bar.add_task(label, total=n_items)
            first = convert(0)
            layout, data_end = plan_layout(first, n_items)
            manifest = {"meta": meta, "file_size": data_end, "arrays": layout}
            with open(tmp, "wb") as fh:
                fh.truncate(data_end)
            maps = {
                name: np.memmap(tmp, a["dtype"], "r+", offset=a["offset"], shape=tuple(a["shape"]))
                for name, a in layout.items()
            }
            for i in range(n_items):
                for name, a in (first if i == 0 else convert(i)).items():
                    maps[name][i] = a
                bar.advance(task)
            for name, m in maps.items():
                m.flush()
                layout[name]["sample"] = sample_hash(m)
            del maps
            write_header(tmp, manifest)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plan_layout(first: dict[str, np.ndarray], n_items: int) -> tuple[dict[str, dict], int]:
    """Offsets of each (n_items, ...) array after a header page; returns the layout and the file size."""
    offset = ALIGN * 4  # room for the manifest; write_header checks it fits
    layout = {}
    for name, a in first.items():
        shape = [n_items, *a.shape]
        layout[name] = {"dtype": a.dtype.str, "shape": shape, "offset": offset}
        offset += _aligned(int(np.prod(shape)) * a.dtype.itemsize)
    return layout, offset


def write_header(path: Path, manifest: dict) -> None:
    body = json.dumps(manifest, sort_keys=True).encode()
    first_array = min(a["offset"] for a in manifest["arrays"].values())
    if PREFIX.size + len(body) > first_array:
        raise ValueError(f"shard manifest of {len(body)} bytes does not fit before the data")
    with open(path, "r+b") as fh:
        fh.write(PREFIX.pack(MAGIC, FORMAT, len(body), hashlib.sha256(body).digest()) + body)
        fh.flush()
        os.fsync(fh.fileno())


def read_manifest(path: Path) -> dict | None:
    """The manifest if the prefix and its hash are right, else None."""
    try:
        with open(path, "rb") as fh:
            magic, fmt, n, digest = PREFIX.unpack(fh.read(PREFIX.size))
            if magic != MAGIC or fmt != FORMAT or n > MAX_MANIFEST:
                return None
            body = fh.read(n)
    except (OSError, struct.error):
        return None
    if len(body) != n or hashlib.sha256(body).digest() != digest:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def open_shard(path: Path, meta: dict) -> dict[str, np.ndarray] | None:
    """The shard's arrays as copy-on-write memory maps, or None (and the file removed) if it is missing,
    stale or damaged."""
    if not path.exists():
        return None
    manifest = read_manifest(path)
    arrays = None
    if manifest is not None and manifest.get("meta") == meta and path.stat().st_size == manifest["file_size"]:
        arrays = _map_arrays(path, manifest["arrays"])
    if arrays is None:
        path.unlink(missing_ok=True)
    return arrays


def _map_arrays(path: Path, layout: dict[str, dict]) -> dict[str, np.ndarray] | None:
    arrays = {}
    for name, a in layout.items():
        # "c": writable views without writing back, so torch can wrap them without a copy
        m = np.memmap(path, np.dtype(a["dtype"]), "c", offset=a["offset"], shape=tuple(a["shape"]))
        if sample_hash(m) != a.get("sample"):
            return None
        arrays[name] = m
    return arrays


def sample_hash(a: np.ndarray) -> str:
    """sha256 of SAMPLES pages spread evenly over the array's bytes, first and last included."""
    raw = a.reshape(-1).view(np.uint8)
    starts = np.linspace(0, max(raw.size - PAGE, 0), SAMPLES).astype(np.int64)
    h = hashlib.sha256()
    for s in starts:
        h.update(raw[s : s + PAGE].tobytes())
    return h.hexdigest()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
