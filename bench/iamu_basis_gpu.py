"""iamu's basis arithmetic on every ResNet-18/50 layer shape on CUDA: exact (dense eigh) vs the default.

Needs only torch and torchvision (runs on a GPU image before the package is installed: lowrank.py is
loaded by path). Per shared conv layer of torchvision's ResNet-18 and ResNet-50 ([out, in*k*k]), 3 tasks
x 8 batches of synthetic rank-32-plus-noise gradients: the covariance sums and dense eigh (exact) or, for
rows of at least 768, the sketch sums and the Nyström basis (the iamu defaults: lowrank_min_in 768,
max_rank 128, oversample 16); the time to draw the gradients is measured apart and subtracted. Also the
gradient passes of a real setup's size: 8 x (one forward + 3 backward) of the GroupNorm ResNet at batch
64, 48x64 images. Prints one JSON line per depth and one with everything.

    python bench/iamu_basis_gpu.py        # CUDA only
"""

import importlib.util
import json
import time
from pathlib import Path

import torch
import torchvision

_spec = importlib.util.spec_from_file_location("lowrank", Path(__file__).parent.parent / "mtu_dist/methods/lowrank.py")
lr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lr)
DEV = "cuda"
TASKS, BATCHES, MIN_IN, K, MAX_RANK = 3, 8, 768, 144, 128


def sync():
    torch.cuda.synchronize()


def layer_shapes(depth):
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    return [(p.shape[0], p[0].numel()) for n, p in net.named_parameters() if p.dim() >= 2 and not n.startswith("fc")]


def gradient(out, n, gen):
    return torch.randn(out, 32, device=DEV, generator=gen) @ torch.randn(
        32, n, device=DEV, generator=gen
    ) + 0.1 * torch.randn(out, n, device=DEV, generator=gen)


def basis_time(shapes, lowrank: bool):
    gen = torch.Generator(device=DEV).manual_seed(0)
    sync()
    t0 = time.perf_counter()
    dims = []
    for out, n in shapes:
        sketch = lowrank and n >= MIN_IN and K < n
        omega = lr.gaussian_sketch(n, K, 0, torch.float32, DEV) if sketch else None
        for _ in range(TASKS):
            acc, tr = 0, 0
            for _ in range(BATCHES):
                g = gradient(out, n, gen)
                if sketch:
                    acc, tr = acc + g.T @ (g @ omega), tr + g.pow(2).sum()
                else:
                    acc = acc + g.T @ g
            if sketch:
                basis, _ = lr.lowrank_basis(acc, omega, float(tr), 0.97, MAX_RANK)
            else:
                vals, vecs = torch.linalg.eigh(acc)
                vals = vals.flip(0).clamp(min=0)
                k = int(torch.searchsorted(torch.cumsum(vals, 0) / vals.sum(), torch.tensor(0.97, device=DEV))) + 1
                basis = vecs.flip(1)[:, :k]
            dims.append(basis.shape[1])
    sync()
    return time.perf_counter() - t0, sum(dims) / len(dims)


def draw_time(shapes):
    gen = torch.Generator(device=DEV).manual_seed(0)
    sync()
    t0 = time.perf_counter()
    for out, n in shapes:
        for _ in range(TASKS * BATCHES):
            gradient(out, n, gen)
    sync()
    return time.perf_counter() - t0


def grad_passes(depth, batch=64):
    net = getattr(torchvision.models, f"resnet{depth}")(
        weights=None, norm_layer=lambda c: torch.nn.GroupNorm(32, c)
    ).to(DEV)
    params = list(net.parameters())
    x = torch.rand(batch, 3, 48, 64, device=DEV)
    for _ in range(2):  # the second run is timed
        sync()
        t0 = time.perf_counter()
        for _ in range(BATCHES):
            out = net(x)
            for t in range(TASKS):
                torch.autograd.grad(out[:, t::3].pow(2).mean(), params, retain_graph=t < TASKS - 1)
        sync()
        t = time.perf_counter() - t0
    return t


def main():
    res = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    for depth in (18, 50):
        shapes = layer_shapes(depth)
        basis_time(shapes[:3], True)  # warm-up (kernels, solver handles)
        base = draw_time(shapes)
        r = {
            name: dict(zip(("basis_s", "mean_dim"), basis_time(shapes, low)))
            for name, low in (("default", True), ("exact", False))
        }
        for v in ("default", "exact"):
            r[v]["basis_s"] -= base
        r["grad_passes_s"], r["gradient_draws_s"] = grad_passes(depth), base
        res[f"resnet{depth}"] = r
        print(json.dumps({f"resnet{depth}": r}), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
