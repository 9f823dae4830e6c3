"""KernelCache: LRU by entries and bytes, stats, thread safety, and the verified disk layer."""

import hashlib
import json
import os
import statistics
import threading
import time

import pytest
import torch
from torch import nn

from kasmina.cache import CacheEntry, KernelCache
from kasmina.errors import ChecksumMismatch

SIGNATURE = {"graft": "residual", "layout": "features", "in": 8, "out": 8, "dtype": "float32"}


def entry(kernel_id: str, size: int = 100, *, template: nn.Module | None = None) -> CacheEntry:
    artifact = (kernel_id.encode() * size)[:size]
    sha = hashlib.sha256(artifact).hexdigest()
    return CacheEntry(kernel_id, sha, dict(SIGNATURE), artifact, template)


def test_least_recently_used_entry_is_evicted_beyond_max_entries():
    cache = KernelCache(max_entries=2)
    cache.put(entry("a"))
    cache.put(entry("b"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put(entry("c"))
    assert "b" not in cache
    assert "a" in cache and "c" in cache
    assert cache.stats()["evictions"] == 1 and cache.stats()["entries"] == 2


def test_entries_are_evicted_oldest_first_until_the_bytes_fit():
    cache = KernelCache(max_entries=100, max_bytes=1000)
    for name in "abcd":
        cache.put(entry(name, 300))
    assert cache.stats()["bytes"] == 900
    cache.put(entry("e", 500))
    assert [k for k in "abcde" if k in cache] == ["d", "e"]
    assert cache.stats() | {"misses": 0} == {
        "hits": 0,
        "misses": 0,
        "evictions": 3,
        "bytes": 800,
        "entries": 2,
        "disk_hits": 0,
        "disk_corrupt": 0,
    }


def test_template_parameters_count_towards_the_bytes():
    template = nn.Linear(10, 10)  # 110 float32 = 440 bytes
    cache = KernelCache()
    cache.put(entry("a", 100, template=template))
    assert cache.stats()["bytes"] == 100 + 440


def test_an_entry_larger_than_max_bytes_is_not_kept_in_memory():
    cache = KernelCache(max_bytes=100)
    cache.put(entry("small", 50))
    cache.put(entry("huge", 101))
    assert "huge" not in cache and "small" in cache
    assert cache.stats()["bytes"] == 50


def test_replacing_an_entry_keeps_the_byte_count_exact():
    cache = KernelCache()
    cache.put(entry("a", 100))
    cache.put(entry("a", 300))
    assert cache.stats()["bytes"] == 300 and cache.stats()["entries"] == 1


def test_stats_count_hits_and_misses_and_get_returns_the_same_object():
    cache = KernelCache()
    stored = entry("a")
    cache.put(stored)
    assert cache.get("a") is stored  # no copy
    assert cache.get("missing") is None
    assert cache.get("a") is stored
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)


def test_clear_empties_memory():
    cache = KernelCache()
    cache.put(entry("a"))
    cache.clear()
    assert cache.get("a") is None
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_a_memory_hit_takes_well_under_50_microseconds():
    cache = KernelCache()
    for i in range(64):
        cache.put(entry(f"k{i}"))
    samples = []
    for i in range(20_000):
        key = f"k{i % 64}"
        started = time.perf_counter()
        cache.get(key)
        samples.append(time.perf_counter() - started)
    assert statistics.median(samples) < 50e-6


def test_concurrent_puts_and_gets_keep_the_accounting_consistent():
    cache = KernelCache(max_entries=16, max_bytes=16 * 150)
    errors = []

    def worker(offset: int) -> None:
        try:
            for i in range(300):
                cache.put(entry(f"k{(offset + i) % 40}", 100 + (i % 3) * 50))
                cache.get(f"k{(offset * 7 + i) % 40}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    assert stats["entries"] <= 16 and stats["bytes"] <= 16 * 150
    held = [cache.get(f"k{i}") for i in range(40)]
    assert stats["bytes"] == sum(len(e.artifact) for e in held if e is not None)
    assert stats["hits"] + stats["misses"] == 4 * 300


def test_disk_layer_survives_a_new_cache_instance(tmp_path):
    first = KernelCache(disk_dir=tmp_path)
    stored = entry("a", 1000)
    first.put(stored)
    assert (tmp_path / f"{stored.sha256}.pt2").read_bytes() == stored.artifact
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["kernels"]["a"] == {"sha256": stored.sha256, "signature": SIGNATURE}

    second = KernelCache(disk_dir=tmp_path)
    found = second.get("a")
    assert found is not None and found.template is None
    assert (found.artifact, found.sha256, found.signature) == (
        stored.artifact,
        stored.sha256,
        SIGNATURE,
    )
    assert second.stats()["disk_hits"] == 1 and second.stats()["misses"] == 0
    assert second.get("a") is found  # promoted to memory
    assert second.stats()["hits"] == 1


def test_disk_artifacts_are_found_by_sha256(tmp_path):
    stored = entry("a", 1000)
    KernelCache(disk_dir=tmp_path).put(stored)
    cache = KernelCache(disk_dir=tmp_path)
    assert cache.get_artifact(stored.sha256) == stored.artifact
    assert cache.get_artifact("0" * 64) is None


def test_evicted_entries_are_still_on_disk(tmp_path):
    cache = KernelCache(max_entries=1, disk_dir=tmp_path)
    cache.put(entry("a"))
    cache.put(entry("b"))
    assert "a" not in cache
    assert cache.get("a").artifact == entry("a").artifact
    assert cache.stats()["disk_hits"] == 1


def test_corrupt_disk_file_is_deleted_and_counted_as_a_miss(tmp_path):
    stored = entry("a", 1000)
    KernelCache(disk_dir=tmp_path).put(stored)
    path = tmp_path / f"{stored.sha256}.pt2"
    data = bytearray(path.read_bytes())
    data[500] ^= 0xFF
    path.write_bytes(bytes(data))

    cache = KernelCache(disk_dir=tmp_path)
    assert cache.get("a") is None
    assert not path.exists()
    assert "a" not in json.loads((tmp_path / "index.json").read_text())["kernels"]
    stats = cache.stats()
    assert (stats["misses"], stats["disk_hits"], stats["disk_corrupt"]) == (1, 0, 1)


def test_an_entry_whose_bytes_do_not_match_its_sha256_is_never_written_to_disk(tmp_path):
    cache = KernelCache(disk_dir=tmp_path)
    good = entry("a")
    bad = CacheEntry("a", good.sha256, SIGNATURE, b"tampered", None)
    with pytest.raises(ChecksumMismatch):
        cache.put(bad)
    assert list(tmp_path.glob("*.pt2")) == []


def test_disk_writes_leave_no_partial_files(tmp_path):
    cache = KernelCache(disk_dir=tmp_path)
    for name in "abc":
        cache.put(entry(name, 2000))
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 4 and "index.json" in names
    assert not [n for n in names if n.endswith(".partial")]


def test_an_unreadable_index_is_ignored_not_fatal(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    cache = KernelCache(disk_dir=tmp_path)
    assert cache.get("a") is None
    cache.put(entry("a"))
    assert KernelCache(disk_dir=tmp_path).get("a") is not None


def test_clear_with_disk_removes_the_files(tmp_path):
    cache = KernelCache(disk_dir=tmp_path)
    cache.put(entry("a"))
    cache.clear(disk=True)
    assert list(tmp_path.iterdir()) == []
    assert KernelCache(disk_dir=tmp_path).get("a") is None


def test_templates_are_kept_only_in_memory(tmp_path):
    cache = KernelCache(disk_dir=tmp_path)
    cache.put(entry("a", template=nn.Linear(2, 2)))
    assert cache.get("a").template is not None
    restarted = KernelCache(disk_dir=tmp_path)
    assert restarted.get("a").template is None
    assert torch.is_tensor(cache.get("a").template.weight)
