"""`iamu`: interference-aware multi-task unlearning ("Interference-Aware Multi-Task Unlearning",
arXiv 2605.19042; docs/design.md §4).

1. Task subspaces (setup): for every shared weight (gradient viewed as [out, in]) and task u, the
   top eigenvectors, up to energy `energy`, of C^u = sum_b G_b^u^T G_b^u over retain batches — from
   per-task retain *gradients* (an activation basis is the same for every task in a shared layer, so
   `subspace: activations` is only the task-agnostic, GPM-style ablation). Layers with rows of at
   least `lowrank_min_in` get a bounded-rank basis from a randomized sketch of C instead (never formed;
   `lowrank.py`); shorter rows keep the exact eigendecomposition. In `sharded` mode a rank builds and
   keeps only the bases of the layers whose rows it owns.
2. Task-aware projection (each step): target task t's forget gradient, layer by layer,
   G <- G (I - B B^T) with B the orthonormal union of the other tasks' bases (`off_others`; in the
   partial setting the others include the kept tasks of the same instances), or G <- G B_t B_t^T
   (`onto_own`), or onto the part of t's subspace orthogonal to the others' (`both`), or off every task's
   subspace, t's own included (`off_all`: its own retain gradients over `subspace_batches` batches are a
   memory of the retain instances' directions, so this also guards other instances). With `scaled_alpha`
   the projection is soft, as in Scaled Gradient Projection (Saha and Roy, "Continual Learning with Scaled
   Gradient Projection", AAAI 2023): each basis direction is removed (or kept) only by its importance
   lambda = (a+1)s / (a s+1), s its singular value over the largest, so the weak directions of a small
   layer's basis leave room to move; a -> inf is the hard projection.
3. Instance-level orthogonalization: the summed forget direction loses its component in the span of
   the retain gradients (per task, or per sample as in OrthoGrad), or with `remove: conflicts` only the
   part that conflicts with them (a non-negative least squares) — from a Gram matrix only. Optionally the
   span also holds the kept tasks' gradients on the forget instances (`kept_on_forget`) or the retain
   batch's gradients mirrored left-right (`mirror`), and `forget_on` limits the forget direction to the
   shared encoder or to the target heads.
4. Update: alpha * sum_u g_retain^u - (1 - alpha) * g_forget, g_forget of unit length (`forget_norm`);
   task heads follow their own forget/retain gradients (heads are never projected). The optimizer
   applies heavy-ball momentum to it (`momentum`, 0.9): what steps 2-3 leave of one batch's forget
   gradient changes from step to step, and the sum over steps keeps the part they share. With `focus`
   > 0 the forget loss weights each sample by (batch mean / its loss)^focus (objective.focused_losses),
   so the ascent pushes hardest on the instances the model still fits best.
All of it runs on the distributed step of `mtu_dist/distributed/gradstep.py`, in either reduction mode.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mtu_dist.data.stream import kept_view, mirrored
from mtu_dist.distributed.gradstep import allreduce_small, gather_blocks, gather_update
from mtu_dist.methods.base import StepContext
from mtu_dist.methods.lowrank import gaussian_sketch, lowrank_eig
from mtu_dist.methods.signal_method import SignalMethod
from mtu_dist.runner.objective import global_counts, normalised_losses


class IamuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    project: bool = True  # step 2 (off: ablation iamu_no_proj)
    orthogonalize: bool = True  # step 3 (off: ablation iamu_no_orth)
    subspace: Literal["gradients", "activations"] = "gradients"
    energy: float = Field(0.97, gt=0, le=1)  # epsilon: energy kept per task basis
    subspace_batches: int = Field(8, ge=1)  # retain batches used for the bases
    # bases of long rows from a randomized sketch (lowrank.py; measured in bench/iamu_setup.py): rows of at
    # least `lowrank_min_in` (ViT-B width and up; the default conv model's rows, <= 576, and ResNet's first
    # stage stay on the exact eigh of [in, in]), at most `max_rank` directions, a sketch of max_rank +
    # `oversample` columns, `power_iters` extra passes over the subspace batches
    lowrank_min_in: int = Field(768, ge=1)
    max_rank: int = Field(128, ge=1)
    oversample: int = Field(16, ge=0)
    power_iters: int = Field(0, ge=0)
    mode: Literal["off_others", "off_all", "onto_own", "both"] = "onto_own"  # measured best: see README "iamu"
    # soft projection (step 2, every mode but both): SGP's alpha, each basis direction weighted by
    # its importance (alpha+1)s/(alpha s+1) of its normalised singular value s; None: the hard projection
    scaled_alpha: float | None = Field(None, ge=0)
    span: Literal["per_task", "per_sample"] = "per_task"  # retain span for step 3
    # what step 3 removes: the forget direction's whole component in the retain span (`span`), or only
    # what conflicts (`conflicts`: the least change that leaves no retain gradient an ascent step would
    # climb, <g_f', r> <= 0 for every r; components that also lower a retain loss are kept)
    remove: Literal["span", "conflicts"] = "span"
    span_samples: int = Field(4, ge=1)  # per rank, for span: per_sample
    orth_heads: bool = True  # step 3 over the target tasks' head columns too (instance-level
    # interference also runs through a task's own head)
    # the length of the forget direction after steps 2-3 (over the shared and target-head columns):
    # `as_is` (what the constraints left: the step shrinks with what they removed, so one step size moves
    # a request by very different amounts), `restored` (its length before the constraints), or `unit`
    # (length 1: each step moves the parameters by lr * (1 - alpha) along it, whatever the constraints
    # removed and however the forget loss's gradient grows as it is ascended)
    forget_norm: Literal["as_is", "restored", "unit"] = "unit"  # measured best: see README "iamu"
    # step 4's heavy-ball momentum (the optimizer's: v <- momentum v + update): after steps 2-3 the forget
    # direction is what one batch's gradient keeps beyond its retain span, which changes from step to step;
    # momentum sums it over steps (about 1/(1 - momentum) of them). None: `unlearn.momentum`
    momentum: float | None = Field(0.9, ge=0, lt=1)  # measured best: see README "iamu"
    # the forget loss with each sample weighted by (batch mean / its loss)^focus (objective.focused_losses):
    # the ascent pushes hardest on the instances still fit best, which a membership attack picks out; 0: uniform
    focus: float = Field(0.0, ge=0)
    # partial requests: the kept tasks' losses on the forget instances themselves (the labels a partial
    # request leaves: retain pairs, carried by the forget batches), where the target task's ascent through
    # the shared encoder hurts them most. `span`: they join step 3's retain span (the forget direction loses
    # its component along them); `term`: step 4's retain term instead (the update keeps those pairs fitted);
    # `both`; `none` leaves them out. A full request keeps no task: nothing changes there
    kept_on_forget: Literal["none", "span", "term", "both"] = "none"  # measured: see README "iamu"
    # the retain batch mirrored left-right (images and labels; data/stream.py: mirrored): the same retain
    # pairs, which a memorising model fits far worse mirrored (synth-indoor seg loss: 0.20 as seen, 0.76
    # mirrored, 1.04 on val), so per task the gradient there points where the model's *general* fit lies,
    # not its memory of the instances; at a memorising minimum the retain gradients themselves are small
    # and say little about it. `span`: those gradients join step 3's span (the forget direction loses its
    # component along them); `term`: step 4's retain term; `both`; `none` leaves them out. One more
    # forward pass of the retain batch and one signal per task
    mirror: Literal["none", "span", "term", "both"] = "none"  # measured: see README "iamu"
    # which columns the forget direction moves: `all` (the shared encoder and the target tasks' heads),
    # `shared` (the encoder only: a head is shared by every instance of its task, so ascending it on the
    # forget instances lowers the task everywhere, its val level too) or `heads` (the target heads only:
    # the encoder features every other task reads, the kept tasks of a partial request's instances among
    # them, move only with the retain term). Step 3 and the unit length act on the same columns
    forget_on: Literal["all", "shared", "heads"] = "all"  # measured: see README "iamu"
    trace_dir: str | None = None  # tests/debugging: rank 0 dumps each step's tensors

    @model_validator(mode="after")
    def _scaled_needs_a_weighted_mode(self):
        if self.scaled_alpha is not None and self.mode == "both":
            raise ValueError("scaled_alpha applies to modes off_others, off_all and onto_own, not both")
        return self

    @model_validator(mode="after")
    def _heads_only_needs_its_columns(self):
        if self.forget_on == "heads" and not self.orth_heads:
            raise ValueError("forget_on: heads needs orth_heads (step 3 and the unit length act on the heads' columns)")
        return self


def _orth(mat: torch.Tensor, tol: float = 1e-7) -> torch.Tensor:
    """Orthonormal basis of the column space of `mat` [n, m] (possibly empty)."""
    if mat.numel() == 0 or mat.shape[1] == 0:
        return mat.new_zeros(mat.shape[0], 0)
    u, sv, _ = torch.linalg.svd(mat, full_matrices=False)
    return u[:, sv > tol * sv.max().clamp(min=1e-30)] if sv.max() > 0 else mat.new_zeros(mat.shape[0], 0)


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric PSD matrix."""
    try:
        vals, vecs = torch.linalg.eigh(cov)
        if torch.isfinite(vals).all() and torch.isfinite(vecs).all():
            return vals.flip(0), vecs.flip(1)
    except torch.linalg.LinAlgError:
        pass
    # On badly rank-deficient covariances (deep layers, barely trained models) float32 eigh may fail to
    # converge or silently return NaN; a PSD matrix's SVD is its eigendecomposition, and float64 converges.
    vecs, vals, _ = torch.linalg.svd(cov.double())
    return vals.to(cov.dtype), vecs.to(cov.dtype)


def energy_eig(cov: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs of a PSD matrix holding `energy` of its trace: (vals [k] descending, vecs [n, k])."""
    vals, vecs = eigh_descending(cov)
    vals = vals.clamp(min=0)
    total = vals.sum()
    if total <= 0:
        return cov.new_zeros(0), cov.new_zeros(cov.shape[0], 0)
    level = torch.tensor(energy, dtype=vals.dtype, device=vals.device)
    k = min(int(torch.searchsorted(torch.cumsum(vals, 0) / total, level).item()) + 1, vals.numel())
    return vals[:k].contiguous(), vecs[:, :k].contiguous()  # a view would keep the whole [in, in] alive


def union_eig(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The span of several truncated eigendecompositions (vals_u, B_u) of PSD matrices C_u, rotated to the
    eigenvectors of sum_u C_u restricted to it (B^T sum_u B_u diag(vals_u) B_u^T B): the joint importance
    of each direction of the union."""
    basis = _orth(torch.cat([b for _, b in parts], dim=1))
    if basis.shape[1] == 0:
        return basis.new_zeros(0), basis
    restricted = sum(((basis.T @ b) * v) @ (b.T @ basis) for v, b in parts)
    vals, vecs = eigh_descending((restricted + restricted.T) / 2)
    return vals.clamp(min=0), basis @ vecs


def importance_scaled(vals: torch.Tensor, basis: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """SGP's soft basis W = B sqrt(Lambda), lambda_i = (alpha+1)s_i / (alpha s_i+1), s_i = sqrt(vals_i /
    max vals) (a direction's singular value over the largest): G - G W W^T removes lambda_i of G's
    component along b_i, G W W^T keeps lambda_i of it. alpha None: the basis itself (lambda = 1, the
    hard projection and the limit alpha -> inf)."""
    if alpha is None or basis.shape[1] == 0:
        return basis
    s = (vals.clamp(min=0) / vals.max().clamp(min=1e-30)).sqrt()
    lam = (alpha + 1) * s / (alpha * s + 1)
    return basis * lam.sqrt().to(basis.dtype)


def project_rows(g: torch.Tensor, basis: torch.Tensor, mode: str) -> torch.Tensor:
    """g [..., rows, in]: remove (off) or keep (onto) the component in span(basis) [in, q], row by row."""
    if basis.shape[1] == 0:
        return g if mode == "off" else torch.zeros_like(g)
    inside = (g @ basis) @ basis.T
    return g - inside if mode == "off" else inside


def orthogonalize(gram: torch.Tensor) -> torch.Tensor:
    """Coefficients c with g_f' = g_f - c @ R orthogonal to span(R), from the Gram of [g_f; R] only.

    gram [1+m, 1+m] = [[<g,g>, <g,R>], [<R,g>, R R^T]]; c = (R R^T)^+ R g. The pseudo-inverse handles
    rank-deficient spans (duplicate or zero retain gradients)."""
    return torch.linalg.pinv(gram[1:, 1:], hermitian=True, rtol=1e-10) @ gram[1:, 0]


def conflict_coefficients(gram: torch.Tensor) -> torch.Tensor:
    """Coefficients c >= 0 with g_f' = g_f - c @ R the nearest vector to g_f that conflicts with no row of R
    (<g_f', r> <= 0 for all r: an ascent step along g_f' raises no retain loss, to first order), from the
    Gram of [g_f; R] only: the non-negative least squares min_{c >= 0} |g_f - c R|^2, by Lawson and Hanson's
    active-set method on the Gram (finite; the same c on every rank, since every rank holds the same Gram)."""
    m = gram.shape[0] - 1
    b, q = gram[1:, 0], gram[1:, 1:]
    c = gram.new_zeros(m)
    tol = 1e-10 * (torch.diagonal(q).max().clamp(min=1e-30) * gram[0, 0].clamp(min=1e-30)).sqrt()
    active: list[int] = []  # rows with c > 0
    for _ in range(3 * m + 1):
        w = b - q @ c  # <g_f', r>: the conflict each row still has
        free = [j for j in range(m) if j not in active]
        if not free or float(w[free].max()) <= tol:
            break
        active.append(max(free, key=lambda j: float(w[j])))
        while True:
            s = gram.new_zeros(m)
            s[active] = torch.linalg.pinv(q[active][:, active], hermitian=True, rtol=1e-10) @ b[active]
            if bool((s[active] > 0).all()):
                c = s
                break
            # step from c towards s until the first coefficient reaches 0; drop it and solve again
            idx = [j for j in active if s[j] <= 0]
            step = min(float(c[j] / (c[j] - s[j])) for j in idx)
            c = (c + step * (s - c)).clamp(min=0)
            active = [j for j in active if c[j] > 0]
            if not active:
                break
    return c


class Iamu(SignalMethod):
    Options = IamuOptions

    @property
    def uses_kept(self) -> bool:
        return self.opts.kept_on_forget != "none"

    # ---------------------------------------------------------------- setup: layout + task subspaces
    def setup(self, ctx: StepContext, retain_batches, forget_batches) -> dict[str, float]:
        self.setup_layout(ctx)
        self.projected_idx = sorted(i for i in self.shared_idx if self.params[i].dim() >= 2)
        # the target tasks' heads only: a correction along a retain gradient must not leak into a kept
        # task's head, which the forget signal never touches
        heads = ctx.targets if self.opts.orth_heads and self.opts.forget_on != "shared" else ()
        self.orth_cols = self.column_mask(heads=heads)
        # the columns the forget direction may move (`forget_on`); None: every column its signals have
        self.forget_cols = None
        if self.opts.forget_on != "all":
            shared = self.column_mask(heads=())
            # heads: orth_cols holds the shared and target-head columns (orth_heads is required)
            self.forget_cols = shared if self.opts.forget_on == "shared" else self.orth_cols & ~shared
            if self.opts.forget_on == "heads":
                self.orth_cols = self.forget_cols
        logs = {}
        if self.opts.project:
            if self.opts.subspace == "gradients":
                own = self._gradient_bases(ctx, retain_batches, logs)
            else:
                own = {
                    i: {t: energy_eig(c, self.opts.energy) for t, c in per_t.items()}
                    for i, per_t in self._activation_covariances(ctx, retain_batches).items()
                }
            self.bases = self._bases(ctx, own)
            dims = [b.shape[1] for per_t in self.bases.values() for b in per_t.values()]
            logs["basis_dim_mean"] = sum(dims) / max(len(dims), 1)
            logs["basis_mb"] = self.basis_bytes() / 2**20
        return logs

    def basis_bytes(self) -> int:
        """Bytes of the task bases this rank keeps (each tensor once)."""
        held = {b.data_ptr(): b.numel() * b.element_size() for per_i in self.bases.values() for b in per_i.values()}
        return sum(held.values())

    def sketch_cols(self, n: int) -> int:
        return min(n, self.opts.max_rank + self.opts.oversample)

    def sketched(self, i: int) -> bool:
        """Layer i takes the randomized path: long rows, and a sketch thinner than the row."""
        n = self.params[i][0].numel()
        return n >= self.opts.lowrank_min_in and self.sketch_cols(n) < n

    def _gradient_bases(self, ctx: StepContext, retain_batches, logs) -> dict[int, dict[str, tuple]]:
        """Per owned layer and task: (eigenvalues, basis), the exact energy basis of C (short rows) or a
        randomized one (long rows)."""
        batches = [next(retain_batches) for _ in range(self.opts.subspace_batches)]
        mine = sorted({pc.index for pc in self.my_pieces(self.projected_idx)})
        p0 = self.params[0]
        omega = {}
        for i in filter(self.sketched, mine):  # one draw per layer, the same on every rank (its seed)
            n = self.params[i][0].numel()
            draw = gaussian_sketch(n, self.sketch_cols(n), ctx.seed * 100_003 + i, p0.dtype, p0.device)
            omega.update({(i, t): draw for t in ctx.tasks})

        def first(i, t, g):
            if (i, t) in omega:
                return {("y", i, t): g.T @ (g @ omega[i, t]), ("tr", i, t): g.pow(2).sum()}
            return {("cov", i, t): g.T @ g}

        acc = self._sum_split(self._pass(ctx, batches, first), ctx, ("cov", "y", "tr"))
        for _ in range(self.opts.power_iters):  # Omega <- orth(C Omega), one more pass over the same batches
            omega = {(i, t): torch.linalg.qr(acc["y", i, t])[0] for i, t in omega}
            again = self._pass(
                ctx,
                batches,
                lambda i, t, g, omega=omega: {("y", i, t): g.T @ (g @ omega[i, t])} if (i, t) in omega else {},
            )
            acc.update(self._sum_split(again, ctx, ("y",)))
        own, kept = {}, []
        for i in mine:
            own[i] = {}
            for t in ctx.tasks:
                if (i, t) in omega:
                    vals, basis, share = lowrank_eig(
                        acc["y", i, t], omega[i, t], float(acc["tr", i, t]), self.opts.energy, self.opts.max_rank
                    )
                    own[i][t] = vals, basis
                    kept.append(share)
                else:
                    own[i][t] = energy_eig(acc["cov", i, t], self.opts.energy)
        if kept:
            logs.update(lowrank_layers=len(kept) / len(ctx.tasks), lowrank_energy_min=min(kept))
        return own

    def _pass(self, ctx: StepContext, batches, terms) -> dict[tuple, torch.Tensor]:
        """Sum over the batches and this rank's rows of `terms(layer, task, G)` (G: a reduced retain gradient
        [rows, in]; terms returns named partial sums)."""
        acc: dict[tuple, torch.Tensor] = {}
        for batch in batches:
            losses = normalised_losses(ctx.model(batch["image"]), batch, ctx.tasks, global_counts(batch, ctx.world))
            sig = self.signals([losses[t] for t in ctx.tasks], ctx)
            for pc in self.my_pieces(self.projected_idx):
                g = sig[self.blocks.index(pc.rank), :, pc.dst : pc.dst + pc.n].view(len(ctx.tasks), -1, pc.row_size)
                for j, t in enumerate(ctx.tasks):
                    for key, val in terms(pc.index, t, g[j]).items():
                        acc[key] = acc.get(key, 0) + val
        return acc

    def _sum_split(self, acc, ctx: StepContext, names) -> dict[tuple, torch.Tensor]:
        """Sharded: a layer whose rows lie on several ranks has a partial sum on each of them; ONE
        all_reduce over those layers only (at most N-1; zeros from a rank that holds none of the rows)
        completes them. Every other layer's sum is already whole on the one rank that owns it."""
        if self.mode != "sharded" or ctx.world == 1:
            return acc
        owners: dict[int, set] = {}
        for pc in self.layout.pieces:
            owners.setdefault(pc.index, set()).add(pc.rank)
        split = [i for i in self.projected_idx if len(owners[i]) > 1]
        keys = [(name, i, t) for i in split for t in ctx.tasks for name in names if (name == "cov") != self.sketched(i)]
        if not keys:
            return acc
        p0 = self.params[0]
        shapes = {k: self._sum_shape(*k) for k in keys}
        flat = torch.cat([(acc[k] if k in acc else p0.new_zeros(shapes[k])).reshape(-1) for k in keys])
        torch.distributed.all_reduce(flat)
        out, off = dict(acc), 0
        for k in keys:
            n = shapes[k].numel()
            out[k] = flat[off : off + n].view(shapes[k])
            off += n
        return out

    def _sum_shape(self, name, i, t) -> torch.Size:
        n = self.params[i][0].numel()
        return torch.Size({"cov": (n, n), "y": (n, self.sketch_cols(n)), "tr": ()}[name])

    def _activation_covariances(self, ctx: StepContext, retain_batches) -> dict[int, dict[str, torch.Tensor]]:
        """GPM-style ablation: input-patch covariance per shared conv, identical for every task."""
        modules = {id(m.weight): m for m in ctx.model.modules() if isinstance(m, torch.nn.Conv2d)}
        acts: dict[int, torch.Tensor] = {}
        hooks = []
        for i in self.projected_idx:
            conv = modules.get(id(self.params[i]))
            if conv is None:
                continue

            def hook(mod, inp, out, i=i):
                x = torch.nn.functional.unfold(inp[0], mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                x = x.transpose(1, 2).reshape(-1, x.shape[1]).detach()
                acts[i] = acts.get(i, 0) + x.T @ x

            hooks.append(conv.register_forward_hook(hook))
        with torch.no_grad():
            for _ in range(self.opts.subspace_batches):
                batch = next(retain_batches)
                ctx.model(batch["image"][batch["valid"]])
        for h in hooks:
            h.remove()
        if ctx.world > 1:  # activations are local to each rank: always summed
            order = sorted(acts)
            flat = torch.cat([acts[i].reshape(-1) for i in order])
            torch.distributed.all_reduce(flat)
            sizes = [acts[i].numel() for i in order]
            acts = {i: part.view_as(acts[i]) for i, part in zip(order, flat.split(sizes))}
        return {i: {t: c for t in ctx.tasks} for i, c in acts.items()}

    def _bases(self, ctx: StepContext, own) -> dict[str, dict[int, torch.Tensor]]:
        """Per target task and layer: the basis implementing `mode` (`self.direction`: 'off' or 'onto'),
        from each task's own (eigenvalues, basis) per layer; weighted by importance with `scaled_alpha`."""
        bases: dict[str, dict[int, torch.Tensor]] = {}
        self.direction = "onto" if self.opts.mode in ("onto_own", "both") else "off"
        alpha = self.opts.scaled_alpha
        for t in ctx.targets:
            bases[t] = {}
            for i, per_t in own.items():
                if self.opts.subspace == "activations" or self.opts.mode == "onto_own":
                    # activations: task-agnostic, the same basis whatever the task
                    bases[t][i] = importance_scaled(*per_t[t], alpha)
                    continue
                # off_all: t's own retain subspace too (the retain instances' directions of the same task)
                others = [vb for u, vb in per_t.items() if u != t or self.opts.mode == "off_all"]
                if self.direction == "off" and alpha is not None:
                    bases[t][i] = importance_scaled(*union_eig(others), alpha)
                    continue
                union = _orth(torch.cat([b for _, b in others], dim=1))  # an SVD: only when used
                if self.direction == "off":
                    bases[t][i] = union
                else:  # both: t's own directions, minus what the others use
                    mine = per_t[t][1]
                    bases[t][i] = _orth(mine - union @ (union.T @ mine))
        return bases

    # ---------------------------------------------------------------- one step
    def step(self, ctx: StepContext, forget: dict, retain: dict) -> tuple[torch.Tensor, dict]:
        tasks, targets = ctx.tasks, ctx.targets
        f_losses, r_losses, preds = self.forward_losses(ctx, forget, retain, self.opts.focus)
        k_losses = self._kept_losses(ctx, forget, preds)
        m_losses = self._mirror_losses(ctx, retain)
        signals = [f_losses[t] for t in targets] + [r_losses[u] for u in tasks] + list(k_losses.values())
        signals += list(m_losses.values())
        if self.opts.span == "per_sample":  # per-sample retain rows (retain preds follow the forget ones)
            signals += self.per_sample_signals(
                preds, retain, ctx, self.opts.span_samples, start=forget["image"].shape[0]
            )
        x = self.signals(signals, ctx, probe=True)  # [blocks, K, S]
        logs, trace = {}, {}
        cols = self.orth_cols[self.blocks][:, None].to(x.dtype)
        rows = self._rows(len(targets), len(tasks), len(k_losses), len(m_losses), x.shape[1])
        pre_norm2 = (x[:, rows["forget"]].sum(1, keepdim=True) * cols).pow(2).sum()  # partial over owned columns
        if self.opts.trace_dir:
            trace["signals"] = self.layout.to_natural(gather_blocks(x, self.mode, ctx.world))
        if self.opts.project:
            logs.update(self._project(x, targets, ctx))
        g_f = x[:, rows["forget"]].sum(1)  # summed forget direction [blocks, S]
        if self.forget_cols is not None:
            g_f = g_f * self.forget_cols[self.blocks].to(g_f.dtype)
        g_r = x[:, rows["term"]].sum(1)  # step 4's retain gradient
        span = x[:, rows["span"]]  # step 3's span
        g_f = self._orthogonalize(g_f, g_r, span, ctx, logs, pre_norm2)
        update = ctx.alpha * g_r - (1 - ctx.alpha) * g_f
        self.write_update(update, ctx)
        if self.opts.trace_dir:  # tests: the whole update, gathered for the trace only
            full = gather_update(update, self.mode, ctx.world)
            self._dump(ctx, {**trace, "gram": self.last_gram, "update": self.layout.to_natural(full[:, None])[0]})
        stats = {
            **{k: v / ctx.world for k, v in logs.items()},
            **{f"kept/{u}": v for u, v in k_losses.items()},
            **{f"mirror/{u}": v for u, v in m_losses.items()},
        }
        return self.step_result(ctx, f_losses, r_losses, stats)  # logs are global, the kept losses rank shares

    def _rows(self, n_forget: int, n_tasks: int, n_kept: int, n_mirror: int, n_all: int) -> dict[str, list[int]]:
        """Which signal rows make the forget direction, step 4's retain term and step 3's span. Rows come in
        the order forget (per target task), retain (per task), kept pairs of the forget instances (per kept
        task), mirrored retain (per task), per-sample retain (`span: per_sample`)."""
        at = n_forget + n_tasks
        retain, kept = list(range(n_forget, at)), list(range(at, at + n_kept))
        mirror = list(range(at + n_kept, at + n_kept + n_mirror))
        samples = list(range(at + n_kept + n_mirror, n_all))
        in_term = {"term", "both"}
        in_span = {"span", "both"}
        return {
            "forget": list(range(n_forget)),
            "term": retain
            + (kept if self.opts.kept_on_forget in in_term else [])
            + (mirror if self.opts.mirror in in_term else []),
            "span": (retain if self.opts.span == "per_task" else [])
            + (kept if self.opts.kept_on_forget in in_span else [])
            + (mirror if self.opts.mirror in in_span else [])
            + samples,
        }

    def _mirror_losses(self, ctx: StepContext, retain: dict) -> dict[str, torch.Tensor]:
        """`mirror`: per task, this rank's share of its loss on the retain batch mirrored left-right (one more
        forward pass; the same pairs as the retain batch, so nothing new to record)."""
        if self.opts.mirror == "none":
            return {}
        batch = mirrored(retain, ctx.tasks)
        losses = normalised_losses(ctx.model(batch["image"]), batch, ctx.tasks, global_counts(batch, ctx.world))
        return {u: losses[u] for u in ctx.tasks}

    def _kept_losses(self, ctx: StepContext, forget: dict, preds: dict) -> dict[str, torch.Tensor]:
        """`kept_on_forget`: per kept task, this rank's share of its loss on the forget batch's own instances
        (their kept labels; predictions from the step's one forward pass). None in a full request."""
        if not self.uses_kept or not ctx.kept:
            return {}
        kept = kept_view(forget, ctx.tasks)
        nf = kept["image"].shape[0]
        f_preds = {t: p[:nf] for t, p in preds.items()}
        losses = normalised_losses(f_preds, kept, ctx.tasks, global_counts(kept, ctx.world))
        return {u: losses[u] for u in ctx.kept}

    def _project(self, x, targets, ctx: StepContext) -> dict[str, torch.Tensor]:
        before = x.new_zeros(len(targets))
        after = x.new_zeros(len(targets))
        for pc in self.my_pieces(self.projected_idx):
            blk = self.blocks.index(pc.rank)
            for j, t in enumerate(targets):
                basis = self.bases[t].get(pc.index)
                if basis is None:
                    continue
                g = x[blk, j, pc.dst : pc.dst + pc.n].view(-1, pc.row_size)
                before[j] += g.pow(2).sum()
                g.copy_(project_rows(g, basis.to(g.dtype), self.direction))
                after[j] += g.pow(2).sum()
        sums = allreduce_small(torch.cat([before, after]), self.mode, ctx.world)
        before, after = sums[: len(targets)], sums[len(targets) :]
        return {f"proj_removed/{t}": 1 - after[j] / before[j].clamp(min=1e-30) for j, t in enumerate(targets)}

    def _orthogonalize(self, g_f, g_r, span, ctx: StepContext, logs, pre_norm2) -> torch.Tensor:
        """Gram of [g_f; g_r; span] over this rank's shared columns -> one small all_reduce (which also
        completes the pre-projection norm of the forget direction)."""
        cols = self.orth_cols[self.blocks]  # [blocks, S]
        vecs = torch.cat([g_f[:, None], g_r[:, None], span], 1) * cols[:, None].to(g_f.dtype)
        local = torch.einsum("bks,bls->kl", vecs, vecs)
        packed = allreduce_small(torch.cat([local.reshape(-1), pre_norm2.reshape(1)]), self.mode, ctx.world)
        gram, pre_norm2 = packed[:-1].view_as(local), packed[-1]
        self.last_gram = gram
        keep = [0] + list(range(2, gram.shape[0]))  # [g_f; span]
        sub = gram[keep][:, keep]
        logs["cos_forget_retain/before"] = gram[0, 1] / (gram[0, 0] * gram[1, 1]).clamp(min=1e-30).sqrt()
        if not self.opts.orthogonalize:
            return self._rescaled(g_f, gram[0, 0], pre_norm2, cols)
        c = orthogonalize(sub) if self.opts.remove == "span" else conflict_coefficients(sub)
        g_new = g_f - torch.einsum("k,bks->bs", c, span * cols[:, None].to(g_f.dtype))
        # after: <g_f', g_r> and |g_f'|^2 from the same Gram, no second pass over the columns
        dot = gram[0, 1] - c @ gram[2:, 1]
        norm2 = gram[0, 0] - 2 * c @ gram[2:, 0] + c @ gram[2:, 2:] @ c
        logs["cos_forget_retain/after"] = dot / (norm2.clamp(min=1e-30) * gram[1, 1]).sqrt()
        return self._rescaled(g_new, norm2, pre_norm2, cols)

    def _rescaled(self, g_f, norm2, pre_norm2, cols) -> torch.Tensor:
        """`forget_norm`: the forget direction's length over `cols` (|g_f|^2 = norm2, global) set to its
        pre-constraint length (`restored`) or to 1 (`unit`); `as_is` leaves it, and so does every mode when
        the constraints removed (numerically) all of it: rounding noise is not a direction to step along.
        Target heads outside `cols` (`orth_heads: false`) keep their forget gradient as it is."""
        if self.opts.forget_norm == "as_is":
            return g_f
        target = pre_norm2 if self.opts.forget_norm == "restored" else torch.ones_like(norm2)
        removed = norm2 <= 1e-12 * pre_norm2
        scale = torch.where(removed, torch.ones_like(norm2), (target / norm2.clamp(min=1e-30)).sqrt())
        return torch.where(cols.bool(), g_f * scale, g_f)

    def _dump(self, ctx: StepContext, tensors: dict) -> None:
        if ctx.rank == 0:
            from pathlib import Path

            from safetensors.torch import save_file

            Path(self.opts.trace_dir).mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                Path(self.opts.trace_dir) / f"step-{ctx.step:04d}.safetensors",
            )

    def momentum(self, configured: float) -> float:
        return configured if self.opts.momentum is None else self.opts.momentum


class IamuNoProj(Iamu):
    """Ablation: iamu without the task-aware projection (step 2)."""

    def __init__(self, options: dict):
        super().__init__({**options, "project": False})


class IamuNoOrth(Iamu):
    """Ablation: iamu without the instance-level orthogonalization (step 3)."""

    def __init__(self, options: dict):
        super().__init__({**options, "orthogonalize": False})


class IamuNoNorm(Iamu):
    """Ablation: iamu with the forget direction's length as the constraints left it (`forget_norm: as_is`)."""

    def __init__(self, options: dict):
        super().__init__({**options, "forget_norm": "as_is"})


class IamuNoMomentum(Iamu):
    """Ablation: iamu with a plain SGD update, the forget direction of each step alone (`momentum: 0`)."""

    def __init__(self, options: dict):
        super().__init__({**options, "momentum": 0.0})
