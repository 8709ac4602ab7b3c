"""iamu's task-subspace setup at model scale: exact vs bounded-rank bases (mtu_dist/methods/lowrank.py).

Models (random init, float32, GroupNorm, the project's three heads seg/depth/normal, 32x32 images):
  resnet50  ResNet-50's long-row layer shapes: a stride-8 stem 3->1024, one layer3 bottleneck (1x1
            1024->256, 3x3 256->256 [rows of 2304], 1x1 256->1024), layer4.0 (1x1 1024->512, 3x3 512->512
            [rows of 4608], 1x1 512->2048, downsample 1024->2048) and layer4.1 (1x1 2048->512 [2048], 3x3 [4608]).
  vitb      ViT-B blocks: patch-8 embedding 3->768 and 2 pre-norm transformer blocks (qkv 768->2304,
            proj 768->768, MLP 768->3072->768: fc2's rows are 3072 long).
Setup and training costs both grow linearly with the number of blocks, so setup / epoch of these
models stands for the full-depth ones (the heads are the same).

Measured (one intra-op thread; variants interleaved, order alternated between repeats; medians):
  * setup time of `Iamu.setup` (subspace_batches 8 of the default retain batch 16, sequential engine):
    `exact` (every layer a dense [in, in] eigh: lowrank_min_in above every row), `lowrank` (the
    defaults), `lowrank_p1` (one power iteration); at 1 rank (in this process) and at 2 gloo ranks
    (`sharded`, torchrun --standalone, OMP_NUM_THREADS=1, time = slowest rank).
  * per-rank basis memory (`Iamu.basis_bytes`): 1 rank vs each rank of 2 (sharded); goal: the larger
    rank <= 1.1 x (1-rank bytes / 2).
  * projection error against the exact bases, over the long-row layers (rows >= lowrank_min_in) and
    the three tasks: (a) share of C = sum_b G_b^T G_b's trace a basis keeps, tr(B^T C B) / tr(C), from
    one more gradient pass over the same batches, as low-rank / exact; (b) on a held-out retain batch,
    the relative error of the `onto_own` projection |G P_low - G P_exact|_F / |G P_exact|_F.
  * the epoch-equivalent: one training epoch of the default dataset (384 samples, `mtu data synth`'s
    default) at the default retain batch 16 = 24 steps of forward + backward + AdamW on the same model
    and images; time = median step x 24. The setup reads 8 x 16 = 128 samples with one forward and
    three backward passes each (about 0.8 of the epoch's work before any basis arithmetic), so "setup
    <= one epoch-equivalent" leaves the bases about a fifth of an epoch. Smaller images than the default
    48x64 make this conservative: the basis arithmetic does not shrink with the image, the epoch does.

    .venv/bin/python bench/iamu_setup.py            # both models, 1 and 2 ranks (~10 min on 2 cores)
    .venv/bin/python bench/iamu_setup.py --quick    # ViT-B shapes only, 1 repeat
Results: bench/results/iamu_setup.json and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import synthetic  # noqa: E402 (bench/ is on sys.path)
import torch
from timing import median, ordered
from torch import nn
from torchvision.models.resnet import Bottleneck

from mtu_dist.methods.iamu import Iamu
from mtu_dist.model import OUT_CHANNELS, Head, MultiTaskModel
from mtu_dist.runner.objective import global_counts, normalised_losses
from mtu_dist.utils.fileio import atomic_write_json

SIZE = 32
RETAIN_BATCH = 16
EPOCH_SAMPLES = 384
VARIANTS = {"exact": {"lowrank_min_in": 10**9}, "lowrank": {}, "lowrank_p1": {"power_iters": 1}}
SPEC = synthetic.Spec(height=SIZE, width=SIZE)
OUT = Path(__file__).resolve().parent / "results" / "iamu_setup.json"
REPO = Path(__file__).resolve().parent.parent


class ViTEncoder(nn.Module):
    def __init__(self, blocks: int = 2, dim: int = 768, patch: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    dim, 12, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(blocks)
            ]
        )
        self.out_channels = dim

    def forward(self, x):
        f = self.embed(x)
        b, c, h, w = f.shape
        return self.blocks(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


def resnet50_shapes() -> nn.Module:
    gn = lambda c: nn.GroupNorm(32, c)  # noqa: E731
    down = nn.Sequential(nn.Conv2d(1024, 2048, 1, bias=False), gn(2048))
    enc = nn.Sequential(
        nn.Conv2d(3, 1024, 8, 8, bias=False),
        gn(1024),
        nn.ReLU(inplace=True),
        Bottleneck(1024, 256, norm_layer=gn),
        Bottleneck(1024, 512, downsample=down, norm_layer=gn),
        Bottleneck(2048, 512, norm_layer=gn),
    )
    enc.out_channels = 2048
    return enc


def build(name: str) -> MultiTaskModel:
    torch.manual_seed(0)
    enc = resnet50_shapes() if name == "resnet50" else ViTEncoder()
    heads = {
        t: Head(enc.out_channels, synthetic.NUM_CLASSES if t == "seg" else OUT_CHANNELS[t], 32)
        for t in synthetic.TASK_NAMES
    }
    return MultiTaskModel(enc, heads).train()


def batches(world: int = 1, rank: int = 0) -> tuple[list[dict], dict]:
    """The 8 subspace batches and a held-out one (global batch 16; rank r takes its contiguous share)."""

    def share(b):
        return {k: (v.tensor_split(world)[rank] if torch.is_tensor(v) else v) for k, v in b.items()}

    return (
        [share(synthetic.make_batch(RETAIN_BATCH, 300 + i, SPEC)) for i in range(8)],
        share(synthetic.make_batch(RETAIN_BATCH, 999, SPEC)),
    )


def run_setup(model, options: dict, world=1, rank=0, reduction="replicated") -> tuple[float, Iamu, dict]:
    ctx = synthetic.make_ctx(model, world=world, rank=rank, reduction=reduction)
    method = Iamu(options)
    sub, _ = batches(world, rank)
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    logs = method.setup(ctx, iter(sub), None)
    t = time.perf_counter() - t0
    synthetic.clear_grads(method.params)
    return t, method, logs


def epoch_equivalent(model, steps: int) -> dict:
    """Median training step (forward + backward + AdamW, batch 16) x EPOCH_SAMPLES / 16."""
    m = copy.deepcopy(model)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 1):
        b = synthetic.make_batch(RETAIN_BATCH, 500 + i, SPEC)
        t0 = time.perf_counter()
        losses = normalised_losses(m(b["image"]), b, synthetic.TASK_NAMES, global_counts(b, 1))
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step = median(times[1:])  # the first step pays allocation
    return {"step_s": step, "steps": EPOCH_SAMPLES // RETAIN_BATCH, "epoch_s": step * EPOCH_SAMPLES // RETAIN_BATCH}


def quality(exact: Iamu, others: dict[str, dict], model) -> dict:
    """Per variant, over the long-row layers x tasks: kept trace share low/exact (one more pass over the
    subspace batches) and the held-out onto-projection error."""
    long_rows = [i for i in exact.projected_idx if Iamu({}).opts.lowrank_min_in <= exact.params[i][0].numel()]
    every = {"exact": exact.bases, **others}
    ctx = synthetic.make_ctx(model)
    sub, held = batches()

    def terms(i, t, g):
        if i not in long_rows:
            return {}
        return {("tot", i, t): g.pow(2).sum(), **{(v, i, t): (g @ b[t][i]).pow(2).sum() for v, b in every.items()}}

    kept = exact._pass(ctx, sub, terms)
    held_g = exact._pass(ctx, [held], lambda i, t, g: {("g", i, t): g} if i in long_rows else {})
    out = {
        "layers": len(long_rows),
        "exact_share_min": min(
            float(kept["exact", i, t] / kept["tot", i, t]) for i in long_rows for t in synthetic.TASK_NAMES
        ),
    }
    for v, b in others.items():
        ratio = [float(kept[v, i, t] / kept["exact", i, t]) for i in long_rows for t in synthetic.TASK_NAMES]
        err = []
        for i in long_rows:
            for t in synthetic.TASK_NAMES:
                g, be, bl = held_g["g", i, t], exact.bases[t][i], b[t][i]
                ref = (g @ be) @ be.T
                err.append(float(((g @ bl) @ bl.T - ref).norm() / ref.norm().clamp(min=1e-30)))
        dims = [b[t][i].shape[1] for i in long_rows for t in synthetic.TASK_NAMES]
        out[v] = {
            "share_ratio_min": min(ratio),
            "share_ratio_median": median(ratio),
            "proj_err_median": median(err),
            "proj_err_max": max(err),
            "rank_median": median(dims),
        }
    out["exact_rank_median"] = median([exact.bases[t][i].shape[1] for i in long_rows for t in synthetic.TASK_NAMES])
    return out


# --------------------------------------------------------------------------- 2 ranks (torchrun)


def worker(name: str, variants: list[str], repeats: int, out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(name)
    times = {v: [] for v in variants}
    last = {}
    for rep in range(repeats):
        for v in ordered(variants, rep):
            if v == "exact" and rep > 0:
                continue  # minutes on a CPU: once
            t, method, _ = run_setup(model, VARIANTS[v], world, rank, "sharded")
            slowest = torch.tensor([t])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times[v].append(float(slowest))
            last[v] = method
    for v, method in last.items():
        from safetensors.torch import save_file

        save_file(
            {f"{t}/{i}": b.contiguous() for t, per_i in method.bases.items() for i, b in per_i.items()},
            out / f"{v}-rank{rank}.safetensors",
        )
    (out / f"rank{rank}.json").write_text(
        json.dumps({"times": times, "basis_bytes": {v: m.basis_bytes() for v, m in last.items()}})
    )
    dist.barrier()
    dist.destroy_process_group()


def two_ranks(name: str, variants: list[str], repeats: int, tmp: Path) -> dict:
    from safetensors.torch import load_file

    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--worker",
        "--models",
        name,
        "--variants",
        *variants,
        "--repeats",
        str(repeats),
        "--worker-out",
        str(tmp),
    ]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    bases = {}
    for v in variants:  # every layer's basis, from whichever rank owns its rows (a split layer: both, equal)
        merged: dict = {}
        for r in range(2):
            for key, b in load_file(tmp / f"{v}-rank{r}.safetensors").items():
                t, i = key.split("/")
                merged.setdefault(t, {})[int(i)] = b
        bases[v] = merged
    return {
        "setup_s": {v: median(ranks[0]["times"][v]) for v in variants},
        "basis_bytes_per_rank": {v: [r["basis_bytes"][v] for r in ranks] for v in variants},
        "bases": bases,
        "command": "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/iamu_setup.py --worker ...",
    }


# --------------------------------------------------------------------------- one model


def measure(name: str, repeats: int, ranks: tuple[int, ...], epoch_steps: int) -> dict:
    model = build(name)
    variants = list(VARIANTS)
    times = {v: [] for v in variants}
    last, logs = {}, {}
    for rep in range(repeats):
        for v in ordered(variants, rep):
            if v == "exact" and rep > 0:
                continue  # minutes on a CPU: once
            t, last[v], logs[v] = run_setup(model, VARIANTS[v])
            times[v].append(t)
    epoch = epoch_equivalent(model, epoch_steps)
    one = {
        v: {
            "setup_s": median(times[v]),
            "runs": times[v],
            "basis_bytes": last[v].basis_bytes(),
            "setup_over_epoch": median(times[v]) / epoch["epoch_s"],
            "logs": {k: float(x) for k, x in logs[v].items()},
        }
        for v in variants
    }
    res = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "shared_params": sum(p.numel() for p in model.shared_parameters()),
        "epoch": epoch,
        "1": one,
        "quality_1": quality(last["exact"], {v: last[v].bases for v in variants if v != "exact"}, model),
    }
    if 2 in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            two = two_ranks(name, variants, repeats, Path(tmp))
        bases = two.pop("bases")
        res["quality_2"] = quality(last["exact"], {v: bases[v] for v in variants if v != "exact"}, model)
        for v in variants:
            per = two["basis_bytes_per_rank"][v]
            two.setdefault(v, {}).update(
                setup_s=two["setup_s"][v],
                basis_bytes_per_rank=per,
                setup_over_epoch=two["setup_s"][v] / epoch["epoch_s"],
                max_rank_over_ideal=max(per) / (one[v]["basis_bytes"] / 2),
                setup_speedup=one[v]["setup_s"] / two["setup_s"][v],
            )
        res["2"] = two
    return res


def report(results: list[dict]) -> str:
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    L = [
        "| model | variant | ranks | setup s | setup / epoch | basis MiB per rank | max rank / (1-rank / 2) | "
        "kept share low/exact (min, median) | held-out projection error (median, max) | rank (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for v in VARIANTS:
            o = r["1"][v]
            q = r["quality_1"].get(v)
            qtxt = (
                (
                    f"{q['share_ratio_min']:.3f}, {q['share_ratio_median']:.3f} | {q['proj_err_median']:.3f}, "
                    f"{q['proj_err_max']:.3f} | {q['rank_median']:.0f}"
                )
                if q
                else f"1 (ref.; exact keeps >= {r['quality_1']['exact_share_min']:.3f}) | 0 | "
                f"{r['quality_1']['exact_rank_median']:.0f}"
            )
            L.append(
                f"| {r['model']} | {v} | 1 | {o['setup_s']:.2f} | {o['setup_over_epoch']:.2f}x | "
                f"{mb(o['basis_bytes'])} | | {qtxt} |"
            )
            if "2" in r:
                t = r["2"][v]
                q2 = r["quality_2"].get(v)
                q2txt = (
                    (
                        f"{q2['share_ratio_min']:.3f}, {q2['share_ratio_median']:.3f} | {q2['proj_err_median']:.3f}, "
                        f"{q2['proj_err_max']:.3f} | {q2['rank_median']:.0f}"
                    )
                    if q2
                    else "| |"
                )
                L.append(
                    f"| {r['model']} | {v} | 2 sharded | {t['setup_s']:.2f} | {t['setup_over_epoch']:.2f}x | "
                    f"{' / '.join(mb(b) for b in t['basis_bytes_per_rank'])} | "
                    f"{t['max_rank_over_ideal']:.2f} | {q2txt} |"
                )
        e = r["epoch"]
        L.append(
            f"| {r['model']} | epoch-equivalent | 1 | {e['epoch_s']:.2f} ({e['steps']} x {e['step_s']:.3f} s) "
            "| 1x | | | | | |"
        )
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ViT-B shapes only, 1 repeat")
    p.add_argument("--models", nargs="+", default=["vitb", "resnet50"], choices=["vitb", "resnet50"])
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.worker:
        worker(a.models[0], a.variants, a.repeats, a.worker_out)
        return 0
    models, repeats = (["vitb"], 1) if a.quick else (a.models, a.repeats)
    results = []
    for m in models:  # written and printed after every model
        results.append(measure(m, repeats, tuple(a.ranks), epoch_steps=3 if a.quick else 5))
        atomic_write_json(
            a.out,
            {
                "results": results,
                "threads": 1,
                "image": [SIZE, SIZE],
                "retain_batch": RETAIN_BATCH,
                "epoch_samples": EPOCH_SAMPLES,
                "command": " ".join(["bench/iamu_setup.py", *(argv or sys.argv[1:])]),
            },
        )
        print(report(results[-1:]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
