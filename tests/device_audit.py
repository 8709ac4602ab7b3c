"""A device audit that runs on the CPU: would this code keep its tensors on the right device on a GPU?

On a CPU-only machine every tensor lives on the one device, so nothing can fail for mixing devices. The
audit gives every tensor a *logical* device and follows it through each op a TorchFunctionMode sees:

* `accel`, the model's device: what `.to(device)` / `device=` puts on a device that is not the literal
  string "cpu" (Accelerate's `acc.device`, `x.device` of an `accel` tensor), and everything computed
  from an `accel` tensor;
* `host`: tensors created without a device (or `device="cpu"`, which code uses for host-side tensors
  on purpose), `.cpu()` results, and everything computed from host tensors only.

Tags are kept per storage (parameters, `.data` and views share their tensor's tag). On the CPU a move
is a no-op that returns the same tensor; the audit returns a copy instead when the logical device
changes, as a real move would. Recorded, with the project line that did it (mtu_dist/ and bench/; the
loaders in mtu_dist/data/ make host batches by design and are exempt from the factory rule):

* mixing: an op on `accel` and `host` tensors that CUDA refuses. A 0-dim host tensor is a CPU scalar,
  which elementwise ops accept; an in-place op must write to the common device; `copy_` and basic
  `t[i] = v` copy across devices; host index tensors may index an `accel` tensor;
* collectives: a tensor handed to torch.distributed that is not `accel` (NCCL takes GPU tensors only);
* factories: a tensor created by torch.zeros/ones/empty/full/arange/tensor/eye/rand*/randint/randperm/
  linspace/as_tensor without an explicit `device=` (the pattern that lands on the CPU on a GPU machine);
* `expect_on_accelerator(model)`: a parameter left on the host.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
ACCEL, HOST = "accel", "host"
PROJECT = (ROOT / "mtu_dist", ROOT / "bench")
NO_FACTORY_RULE = (ROOT / "mtu_dist" / "data",)  # loaders: host batches by design
SKIP_FRAMES = (str(Path(torch.__file__).parent), __file__)

FACTORIES = {
    getattr(torch, n)
    for n in (
        "zeros",
        "ones",
        "empty",
        "full",
        "arange",
        "tensor",
        "as_tensor",
        "eye",
        "rand",
        "randn",
        "randint",
        "randperm",
        "linspace",
        "logspace",
        "empty_strided",
        "scalar_tensor",
    )
}
LIKE = {
    getattr(torch, n)
    for n in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like")
}
NEW = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
# ops whose CUDA kernels accept a CPU scalar (0-dim tensor) beside device tensors (TensorIterator ops)
ELEMENTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "true_divide",
    "truediv",
    "floor_divide",
    "floordiv",
    "remainder",
    "mod",
    "fmod",
    "pow",
    "where",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "lerp",
    "addcdiv",
    "addcmul",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_xor",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
    "and",
    "or",
    "xor",
    "masked_fill",
    "atan2",
    "hypot",
    "copysign",
    "rsub",
}
INPLACE_DUNDERS = {
    "__iadd__",
    "__isub__",
    "__imul__",
    "__itruediv__",
    "__ifloordiv__",
    "__imod__",
    "__ipow__",
    "__iand__",
    "__ior__",
    "__ixor__",
}
# read only the other tensor's metadata (shape): no device check on CUDA either
QUERIES = {"_has_compatible_shallow_copy_type", "is_same_size", "is_set_to", "view_as", "expand_as", "reshape_as"}
COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "reduce",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter",
    "all_to_all_single",
    "gather",
    "scatter",
)


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _base(name: str) -> str:
    """`__iadd__` / `__radd__` / `add_` -> `add`."""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name[:1] in "ir" and name[1:] in ELEMENTWISE:
            name = name[1:]
    return name.rstrip("_")


def _inplace(name: str) -> bool:
    return name in INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


class DeviceAudit(TorchFunctionMode):
    def __init__(self, project=PROJECT, exempt=NO_FACTORY_RULE):
        super().__init__()
        self.project = tuple(str(p) for p in project)
        self.exempt = tuple(str(p) for p in exempt)
        self.tags: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> ACCEL | HOST
        self.devices: dict[int, tuple[str | None, torch.device]] = {}  # id(device read off a tensor) -> its tag
        self.found: Counter = Counter()
        self.collectives: Counter = Counter()
        self._saved = {}

    # ------------------------------------------------------------------ tags
    def tag(self, t: torch.Tensor) -> str | None:
        """ACCEL or HOST; a tensor the audit has not seen made is a CPU tensor (torch.from_numpy, a file
        read); None for a tensor without storage."""
        try:
            return self.tags.get(t.untyped_storage(), HOST)
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (e.g. inside vmap)
            return None

    def _set(self, t: torch.Tensor, tag: str | None, force: bool = False) -> None:
        if tag is None:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return
        if force or storage not in self.tags:  # a view keeps the tag of the storage it shares
            self.tags[storage] = tag

    def _device_tag(self, device) -> str | None:
        """The logical device a `device=` / `.to(...)` argument names."""
        if device is None:
            return None
        if isinstance(device, str):
            return HOST if device == "cpu" else ACCEL
        if isinstance(device, int):
            return ACCEL  # a CUDA index
        seen = self.devices.get(id(device))
        return seen[0] if seen is not None and seen[1] is device else ACCEL

    # ------------------------------------------------------------------ reporting
    def _where(self, direct: bool = False) -> str | None:
        """file:line of the project code that called into torch, or None when the call does not come
        from project code. `direct`: only a direct call counts (not one made inside torch on its behalf,
        such as nn.Conv2d creating its weight), and not from the exempt folders."""
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename.startswith(SKIP_FRAMES[1 if direct else 0 :]):
            f = f.f_back
        file = f.f_code.co_filename if f is not None else ""
        if not file.startswith(self.project) or (direct and file.startswith(self.exempt)):
            return None
        return f"{Path(file).relative_to(ROOT) if file.startswith(str(ROOT)) else file}:{f.f_lineno}"

    def _report(self, what: str, direct: bool = False) -> None:
        where = self._where(direct)
        if where is not None:
            self.found[f"{where}: {what}"] += 1

    @property
    def violations(self) -> list[str]:
        return [f"{k} (x{n})" for k, n in sorted(self.found.items())]

    def expect_on_accelerator(self, model: torch.nn.Module, what: str = "model") -> None:
        host = [n for n, p in model.named_parameters() if self.tag(p) != ACCEL]
        if host:
            self.found[f"{what}: parameters not on the accelerator: {host[:3]}{'...' if len(host) > 3 else ''}"] += 1

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name in ("__get__", "__set__"):  # a tensor attribute: func is the descriptor's bound __get__/__set__
            return self._attribute(func, name, getattr(func.__self__, "__name__", ""), args, kwargs)
        if func in FACTORIES:
            return self._factory(func, name, args, kwargs)
        if func in LIKE or name in NEW:
            out = func(*args, **kwargs)
            given = self._device_tag(kwargs.get("device"))
            self._set(out, given or self.tag(args[0]), force=True)
            return out
        if name in ("to", "cpu", "cuda"):
            return self._move(func, name, args, kwargs)
        self._check(name, args, kwargs)
        out = func(*args, **kwargs)
        self._tag_outputs(name, args, kwargs, out)
        return out

    def _attribute(self, func, name, attr, args, kwargs):
        out = func(*args, **kwargs)
        if name == "__get__" and attr == "device" and isinstance(out, torch.device):
            self.devices[id(out)] = (self.tag(args[0]), out)  # kept alive: the id stays unique
        elif name == "__get__" and isinstance(out, torch.Tensor):
            self._set(out, self.tag(args[0]), force=attr == "grad")  # autograd made .grad where its parameter is
        elif name == "__set__" and attr == "grad" and isinstance(args[1], torch.Tensor):
            if {self.tag(args[0]), self.tag(args[1])} == {ACCEL, HOST}:
                self._report("a gradient assigned on another device than its parameter")
        return out

    def _factory(self, func, name, args, kwargs):
        device = kwargs.get("device")
        if device is None:
            self._report(f"torch.{name} without device=", direct=True)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._set(out, self._device_tag(device) or HOST, force=True)
        return out

    def _move(self, func, name, args, kwargs):
        src = args[0]
        if name == "cpu":
            target = HOST
        elif name == "cuda":
            target = ACCEL
        else:
            target = self._device_tag(kwargs.get("device"))
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    target = self.tag(a)
                elif isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
                    target = self._device_tag(a)
        out = func(*args, **kwargs)
        before = self.tag(src)
        if target is None or target == before:
            if out is not src:
                self._set(out, before)
            return out
        if out is src:  # a no-op on the CPU: a real move copies
            out = out.clone()
        self._set(out, target, force=True)
        return out

    def _check(self, name, args, kwargs) -> None:
        tensors = _tensors((args, kwargs))
        tags = [self.tag(t) for t in tensors]
        if ACCEL not in tags or HOST not in tags or name in QUERIES:
            return
        if name == "copy_":
            return
        if name in ("__getitem__", "__setitem__"):
            self._check_index(name, args)
            return
        base = _base(name)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if _inplace(name) and first is not None and self.tag(first) == HOST:
            self._report(f"{name} writes into a host tensor from accelerator tensors")
            return
        bad = [t for t, g in zip(tensors, tags) if g == HOST and (t.dim() > 0 or base not in ELEMENTWISE)]
        if bad:
            shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in bad[:3])
            self._report(f"{name} mixes accelerator and host tensors (host: {shapes})")

    def _check_index(self, name, args) -> None:
        self_tag = self.tag(args[0])
        index = _tensors(args[1])
        if self_tag == HOST and any(self.tag(i) == ACCEL for i in index):
            self._report(f"{name}: a host tensor indexed by accelerator tensors")
        if (
            name == "__setitem__"
            and index
            and isinstance(args[2], torch.Tensor)
            and args[2].dim() > 0
            and {self_tag, self.tag(args[2])} == {ACCEL, HOST}
        ):
            self._report("__setitem__ with tensor indices and values on another device")

    def _tag_outputs(self, name, args, kwargs, out) -> None:
        outs = _tensors(out)
        if not outs:
            return
        tag = ACCEL if ACCEL in {self.tag(t) for t in _tensors((args, kwargs))} else HOST
        for t in outs:
            self._set(t, tag)

    # ------------------------------------------------------------------ collectives
    def _collective(self, fn, name):
        def checked(*args, **kwargs):
            tensors = _tensors((args, kwargs))
            off = [t for t in tensors if self.tag(t) != ACCEL]
            if off:
                self._report(
                    f"torch.distributed.{name} on {[self.tag(t) or 'untracked' for t in off][:3]} tensors "
                    f"(NCCL takes GPU tensors only)"
                )
            elif tensors and self._where() is not None:
                self.collectives[name] += 1
            return fn(*args, **kwargs)

        return checked

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name)
            self._saved[name] = fn
            setattr(dist, name, self._collective(fn, name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return super().__exit__(*exc)


# ---------------------------------------------------------------------- the pass: the real loops, audited
TINY = ROOT / "configs" / "tiny.yaml"
BASE = ("tracking.enabled=false", "data.workers=0", "train.epochs=1")
# a couple of steps through the whole loop: the stop rule's forget-pair evaluation and the sync check included
UNLEARN = ("unlearn.steps=2", "unlearn.checkpoint_every=0", "unlearn.check_sync=true", "unlearn.stop_drop=0.5")
SMALL = {
    "iamu": ("unlearn.options.subspace_batches=2",),
    "iamu_no_proj": ("unlearn.options.subspace_batches=2",),
    "iamu_no_orth": ("unlearn.options.subspace_batches=2",),
    "iamu_no_norm": ("unlearn.options.subspace_batches=2",),
    "iamu_no_momentum": ("unlearn.options.subspace_batches=2",),
    "salun": ("unlearn.options.saliency_batches=2",),
}


def _session(root, out, command: str, name: str, sets=(), request=None, run_dir=None):
    from mtu_dist.compliance.request import load_request
    from mtu_dist.config import load_config
    from mtu_dist.data.manifest import load_manifest
    from mtu_dist.runner.session import open_session

    cfg = load_config([str(TINY)], [f"data.root={root}", f"out={Path(out) / 'runs'}", *BASE, *sets])
    manifest = load_manifest(cfg.data.dataset, cfg.data.root)
    return open_session(
        cfg,
        command,
        name,
        manifest=manifest,
        request=request and load_request(request, manifest),
        overwrite=True,
        run_dir=run_dir,
    )


def make_request(root, out) -> Path:
    """A partial request (seg and normal forgotten, depth kept): random targets of both kinds, kept tasks."""
    from mtu_dist.compliance.request import make_request as make
    from mtu_dist.compliance.request import write_request
    from mtu_dist.data.manifest import load_manifest

    path = Path(out) / "partial.yaml"
    write_request(
        make(load_manifest("synth-indoor", root), fraction=0.2, setting="partial", tasks=["seg", "normal"], seed=0),
        path,
        overwrite=True,
    )
    return path


def train_pass(root, out, sets=()) -> tuple[DeviceAudit, Path]:
    """`fit` under the audit; the audit and the checkpoint it wrote."""
    from mtu_dist.runner.checkpoint import latest_checkpoint
    from mtu_dist.runner.train import fit

    s = _session(root, out, "train", "original", sets)
    with DeviceAudit() as audit:
        model, _, _ = fit(s)
    audit.expect_on_accelerator(model)
    return audit, latest_checkpoint(s.run_dir / "checkpoints")


def unlearn_pass(root, out, ckpt, request, method: str, sets=()) -> DeviceAudit:
    """Loading the original and `unlearn` (setup and the steps) with `method`, under the audit."""
    from mtu_dist.runner.unlearn import load_original, unlearn

    s = _session(
        root,
        out,
        "unlearn",
        f"unlearn-{method}",
        [f"unlearn.method={method}", *UNLEARN, *SMALL.get(method, ()), *sets],
        request,
    )
    with DeviceAudit() as audit:
        model, _ = load_original(s, ckpt)
        model, _, _ = unlearn(s, model, None)
    audit.expect_on_accelerator(model)
    return audit


def eval_pass(root, out, ckpt, request) -> DeviceAudit:
    """What `mtu eval` does (load, evaluate every split) under the audit."""
    from mtu_dist.evaluation.evaluate import evaluate
    from mtu_dist.runner.unlearn import load_original

    s = _session(root, out, "eval", "eval", request=request, run_dir=Path(out) / "eval")
    with DeviceAudit() as audit:
        model, _ = load_original(s, ckpt)
        evaluate(model, s, s.request)
    audit.expect_on_accelerator(model)
    return audit
