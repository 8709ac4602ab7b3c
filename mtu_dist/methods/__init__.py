"""The method registry: the runner looks methods up here and never names one."""
from __future__ import annotations

from ..errors import UserError
from .base import Method
from .finetune import Finetune
from .grad_ascent import GradAscent
from .iamu import Iamu, IamuNoOrth, IamuNoProj
from .l1_sparse import L1Sparse
from .neggrad_plus import NegGradPlus
from .orthograd import OrthoGrad
from .pcgrad import PCGrad
from .random_label import RandomLabel
from .salun import SalUn
from .scrub import Scrub

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
