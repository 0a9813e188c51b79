"""Damage done to a closed store's files, as a disk, a careless hand or a crash would: random bytes
over a RocksDB blob or SST file, a deleted blob file or MANIFEST, a truncated LMDB map, random
bytes over LMDB's meta pages or the catalog's data. Each returns what it did, for the reports."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

Damage = Callable[[Path], str]


def _largest(directory: Path, suffix: str) -> Path:
    files = sorted(directory.glob(f"*{suffix}"), key=lambda p: p.stat().st_size)
    if not files:
        raise FileNotFoundError(f"no {suffix} file in {directory}")
    return files[-1]


def scribble(path: Path, offset: int, n: int, seed: int = 7) -> None:
    """Overwrite ``n`` bytes at ``offset`` (clamped to the file) with seeded random bytes."""
    size = path.stat().st_size
    offset = max(0, min(offset, size - 1))
    n = min(n, size - offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(seed).randbytes(n))


def blob_bytes(tier: str, n: int = 64 << 10) -> Damage:
    def damage(data: Path) -> str:
        blob = _largest(data / tier, ".blob")
        scribble(blob, blob.stat().st_size // 4, n)
        return f"{n} random bytes in {tier}/{blob.name}"
    return damage


def sst_bytes(tier: str, n: int = 2 << 10) -> Damage:
    def damage(data: Path) -> str:
        sst = _largest(data / tier, ".sst")
        scribble(sst, 0, n)
        return f"{n} random bytes at the start of {tier}/{sst.name}"
    return damage


def delete_blob(tier: str) -> Damage:
    def damage(data: Path) -> str:
        blob = _largest(data / tier, ".blob")
        blob.unlink()
        return f"deleted {tier}/{blob.name}"
    return damage


def delete_manifest(tier: str) -> Damage:
    def damage(data: Path) -> str:
        for manifest in (data / tier).glob("MANIFEST-*"):
            manifest.unlink()
        return f"deleted {tier}'s MANIFEST"
    return damage


def truncate_map(part: str) -> Damage:
    def damage(data: Path) -> str:
        path = data / part / "data.mdb"
        os.truncate(path, path.stat().st_size // 2)
        return f"truncated {part}/data.mdb to half"
    return damage


def meta_pages(part: str) -> Damage:
    def damage(data: Path) -> str:
        scribble(data / part / "data.mdb", 0, 8192)
        return f"random bytes over {part}'s LMDB meta pages"
    return damage


def map_bytes(part: str, n: int = 64 << 10) -> Damage:
    def damage(data: Path) -> str:
        path = data / part / "data.mdb"
        scribble(path, path.stat().st_size // 3, n)
        return f"{n} random bytes in {part}/data.mdb, past its meta pages"
    return damage


def catalog_bytes(n: int = 16 << 10) -> Damage:
    def damage(data: Path) -> str:
        path = data / "catalog" / "data.mdb"
        scribble(path, path.stat().st_size // 2, n)
        return f"{n} random bytes in the middle of the catalog"
    return damage


DAMAGE: dict[str, Damage] = {
    "cool_blob_bytes": blob_bytes("cool"),
    "cold_blob_bytes": blob_bytes("cold"),
    "cool_sst_bytes": sst_bytes("cool"),
    "cold_sst_bytes": sst_bytes("cold"),
    "cool_blob_deleted": delete_blob("cool"),
    "cool_manifest_deleted": delete_manifest("cool"),
    "warm_map_truncated": truncate_map("warm"),
    "warm_meta_pages": meta_pages("warm"),
    "warm_map_bytes": map_bytes("warm"),
    "catalog_bytes": catalog_bytes(),
    "catalog_truncated": truncate_map("catalog"),
}
"""Every kind of damage the fault-injection suite injects, by name."""
