"""`mtu data verify`: check every shard against the manifest and report each problem by file and key."""

from __future__ import annotations

from mtu_dist.data.manifest import Manifest
from mtu_dist.data.sample import decode_sample
from mtu_dist.data.tario import iter_entries
from mtu_dist.errors import UserError
from mtu_dist.utils.fileio import sha256_file


def verify_dataset(manifest: Manifest, check_samples: bool = True) -> list[str]:
    """Return a list of problems (empty = all good): missing shards, sha256 and count mismatches,
    keys out of order, members missing, wrong shapes/dtypes, out-of-range or non-finite values."""
    problems = []
    for split in manifest.splits.values():
        expected_keys = iter(split.keys)
        for shard in split.shards:
            problems += _verify_shard(manifest, shard, expected_keys, check_samples)
    return problems


def _verify_shard(manifest: Manifest, shard, expected_keys, check_samples: bool) -> list[str]:
    path = manifest.shard_path(shard)
    wanted = [next(expected_keys, None) for _ in range(shard.num_samples)]
    if not path.is_file():
        return [f"{path}: shard missing from disk"]
    problems = []
    digest = sha256_file(path)
    if digest != shard.sha256:
        problems.append(f"{path}: sha256 {digest[:12]}... does not match manifest {shard.sha256[:12]}...")
    seen = 0
    try:
        for i, (key, members) in enumerate(iter_entries(path)):
            seen += 1
            if i >= len(wanted):
                problems.append(f"{path}: {key}: unexpected key (not listed in manifest.json for this shard)")
            elif key != wanted[i]:
                problems.append(f"{path}: {key}: unexpected key (manifest lists {wanted[i]} here)")
            if check_samples:
                try:
                    decode_sample(
                        members, manifest.tasks, manifest.resolution, manifest.num_classes, where=f"{path}: {key}"
                    )
                except UserError as e:
                    problems.append(str(e))
    except UserError as e:
        problems.append(str(e))
    if seen != shard.num_samples:
        problems.append(f"{path}: {seen} samples, manifest says {shard.num_samples}")
    return problems


def summarize(manifest: Manifest) -> str:
    lines = [
        f"{manifest.dataset}: tasks {', '.join(manifest.tasks)}; {manifest.num_classes} classes; "
        f"{manifest.resolution[0]}x{manifest.resolution[1]}"
    ]
    for name, split in manifest.splits.items():
        lines.append(f"  {name:<6} {split.num_samples:>7} samples in {len(split.shards)} shards")
    return "\n".join(lines)
