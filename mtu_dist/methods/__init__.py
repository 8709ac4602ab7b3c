"""The method registry: the runner looks methods up here and never names one."""

from __future__ import annotations

from mtu_dist.errors import UserError
from mtu_dist.methods.base import Method
from mtu_dist.methods.finetune import Finetune
from mtu_dist.methods.grad_ascent import GradAscent
from mtu_dist.methods.iamu import Iamu, IamuNoMomentum, IamuNoNorm, IamuNoOrth, IamuNoProj
from mtu_dist.methods.l1_sparse import L1Sparse
from mtu_dist.methods.neggrad_plus import NegGradPlus
from mtu_dist.methods.orthograd import OrthoGrad
from mtu_dist.methods.pcgrad import PCGrad
from mtu_dist.methods.random_label import RandomLabel
from mtu_dist.methods.salun import SalUn
from mtu_dist.methods.scrub import Scrub

METHODS: dict[str, type[Method]] = {
    "finetune": Finetune,
    "grad_ascent": GradAscent,
    "neggrad_plus": NegGradPlus,
    "random_label": RandomLabel,
    "l1_sparse": L1Sparse,
    "salun": SalUn,
    "scrub": Scrub,
    "pcgrad": PCGrad,
    "orthograd": OrthoGrad,
    "iamu": Iamu,
    "iamu_no_proj": IamuNoProj,
    "iamu_no_orth": IamuNoOrth,
    "iamu_no_norm": IamuNoNorm,
    "iamu_no_momentum": IamuNoMomentum,
}


def build_method(name: str, options: dict) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (available: {', '.join(sorted(METHODS))})")
    from pydantic import ValidationError

    try:
        return METHODS[name](options)
    except ValidationError as e:
        fields = "; ".join(f"unlearn.options.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise UserError(f"method '{name}': invalid options: {fields}") from None


def resolved_options(name: str, options: dict) -> dict:
    """The options a run of `name` actually uses: the given ones with the method's defaults filled in (and an
    ablation's fixed switches). What decides a run's result, so records of finished runs hash it: a run
    whose method's defaults changed is a different run."""
    return build_method(name, options).opts.model_dump(mode="json")
