"""Converted-weight shards: reused on the next load, rebuilt (never read) when stale or damaged.

Legend: E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_cpu_experts import layer_tensors, routed_step, write_expert_gguf

from dsrun.offload import shards
from dsrun.offload.cpu_experts import make_backend

META = {"backend": "test", "version": 1, "layer": 0, "tensors": []}


def items(i: int) -> dict[str, np.ndarray]:
    """A convert function: two arrays per item, distinct contents per item."""
    return {"a": np.full((300, 70), i, np.uint8), "b": np.arange(1000, dtype=np.float32) * (i + 1)}


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "blk.0.shard"
    shards.write_shard(path, META, 5, items, "test")
    return path


def test_written_shard_reads_back(shard):
    arrays = shards.open_shard(shard, META)
    assert arrays["a"].shape == (5, 300, 70) and np.all(arrays["a"][3] == 3)
    assert np.array_equal(arrays["b"][4], items(4)["b"])
    assert all(a.ctypes.data % shards.ALIGN == 0 for a in arrays.values())  # page-aligned maps


def test_other_meta_is_stale_and_removed(shard):
    assert shards.open_shard(shard, META | {"version": 2}) is None
    assert not shard.exists()


def test_truncated_shard_is_removed(shard):
    os.truncate(shard, shard.stat().st_size - 4096)
    assert shards.open_shard(shard, META) is None and not shard.exists()


def test_damaged_manifest_is_removed(shard):
    with open(shard, "r+b") as fh:
        fh.seek(shards.PREFIX.size + 5)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 1]))
    assert shards.open_shard(shard, META) is None and not shard.exists()


def test_damaged_data_page_is_removed(shard):
    offset = shards.read_manifest(shard)["arrays"]["a"]["offset"]  # the first sampled page of "a"
    with open(shard, "r+b") as fh:
        fh.seek(offset + 10)
        fh.write(b"\xff")
    assert shards.open_shard(shard, META) is None and not shard.exists()


def test_failed_conversion_leaves_no_file(tmp_path):
    def broken(i):
        if i == 3:
            raise RuntimeError("disk full")
        return items(i)

    path = tmp_path / "blk.0.shard"
    with pytest.raises(RuntimeError):
        shards.write_shard(path, META, 5, broken, "test")
    assert list(tmp_path.iterdir()) == []


def test_model_key_changes_with_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    key = shards.model_key(f)
    assert shards.model_key(f) == key
    os.utime(f, ns=(0, 10**9))
    assert shards.model_key(f) != key


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSRUN_CACHE_DIR", str(tmp_path))
    assert shards.ShardStore().root == tmp_path / "shards"


# --- through a backend ----------------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path):
    return write_expert_gguf(tmp_path / "model.gguf", (Q.Q4_K,) * 3, n_expert=16, hidden=512, ff=256)


def load(model, cache_dir, name="torch"):
    backend = make_backend(name, cache_dir=cache_dir)
    t0 = time.perf_counter()
    backend.load_layer(0, *layer_tensors(model))
    return backend, time.perf_counter() - t0


def output(backend):
    x, ids, weights, active = routed_step(seed=3, n_expert=16)
    return backend.forward(0, torch.nn.functional.pad(x, (0, 256)), ids, weights, active)  # D = 512


def test_second_load_maps_the_shard_without_converting(model, tmp_path):
    first, t_convert = load(model, tmp_path / "cache")
    second, t_reuse = load(model, tmp_path / "cache")
    assert first.converted == [0] and second.converted == [] and second.reused == [0]
    assert torch.equal(output(first), output(second))
    print(f"layer load: {t_convert * 1e3:.0f} ms converting, {t_reuse * 1e3:.0f} ms from the shard")
    assert t_reuse < t_convert


def test_truncated_shard_is_rebuilt_on_load(model, tmp_path):
    first, _ = load(model, tmp_path / "cache")
    expected = output(first)
    del first  # its map of the file would fault once the file is cut short
    (path,) = (tmp_path / "cache" / "shards").rglob("*.shard")
    os.truncate(path, path.stat().st_size // 2)
    again, _ = load(model, tmp_path / "cache")
    assert again.converted == [0] and torch.equal(output(again), expected)


def test_changed_model_file_converts_again_and_drops_old_shards(model, tmp_path):
    load(model, tmp_path / "cache")
    (old,) = (tmp_path / "cache" / "shards").rglob("*.shard")
    os.utime(model.path, ns=(0, 10**9))  # same bytes, another mtime: another version of the file
    again, _ = load(model, tmp_path / "cache")
    (new,) = (tmp_path / "cache" / "shards").rglob("*.shard")
    assert again.converted == [0] and new != old and not old.exists()


def test_each_backend_version_has_its_own_shard(model, tmp_path, monkeypatch):
    from dsrun.offload.backend_torch import TorchExperts

    load(model, tmp_path / "cache")
    monkeypatch.setattr(TorchExperts, "version", TorchExperts.version + 1)
    again, _ = load(model, tmp_path / "cache")
    assert again.converted == [0]
    assert len(list((tmp_path / "cache" / "shards").rglob("*.shard"))) == 2
