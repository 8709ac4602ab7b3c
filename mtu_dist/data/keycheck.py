"""Shard members against the manifest: the n-th sample of a shard must carry the n-th key the manifest
lists for that shard, and a shard must hold exactly its listed count.

A member renamed inside a shard (its sha256 updated in the manifest) would otherwise be read as an
unlisted instance, and the retain mask — keyed by instance id — would let a renamed copy of a forgotten
instance supervise a retrain. Every reader checks keys while it reads.
"""

from __future__ import annotations

from mtu_dist.data.manifest import Manifest, shard_keys
from mtu_dist.errors import UserError


class KeyCheck:
    def __init__(self, manifest: Manifest, split: str):
        info = manifest.split(split)
        self.expected = {str(manifest.shard_path(sh)): keys for sh, keys in zip(info.shards, shard_keys(info))}
        self.seen: dict[str, int] = {}

    def check(self, shard: str, key: str) -> None:
        want, n = self.expected[shard], self.seen.get(shard, 0)
        if n >= len(want):
            raise UserError(
                f"{shard}: {key}: not listed in manifest.json (the shard holds more than the "
                f"{len(want)} samples listed for it)"
            )
        if key != want[n]:
            raise UserError(
                f"{shard}: {key}: not the key manifest.json lists at position {n} of this shard "
                f"({want[n]}): a renamed, unlisted or reordered member"
            )
        self.seen[shard] = n + 1

    def finish(self, shard: str) -> None:
        want, n = self.expected[shard], self.seen.get(shard, 0)
        if n != len(want):
            raise UserError(f"{shard}: holds {n} samples, manifest.json lists {len(want)} (first missing: {want[n]})")
