"""The device pass, proven on the CPU: train, every registered unlearning method (setup and two steps
through the real loop, the stop rule's evaluation and the sync check included) and an evaluation run
under tests/device_audit.py, which follows each tensor's logical device (the model's, or the host's)
and fails on what a GPU would refuse: an op mixing the two, a collective on a host tensor, a tensor
created in project code without `device=`, or parameters left on the host. At 2 real gloo ranks it also
checks every tensor handed to torch.distributed (sharded reduction)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, accelerate_launch
from device_audit import ACCEL, HOST, DeviceAudit, eval_pass, make_request, train_pass, unlearn_pass

from mtu_dist.methods import METHODS


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("device")
    audit, ckpt = train_pass(tiny_root, out)
    return out, audit, ckpt, make_request(tiny_root, out)


def test_training_keeps_every_tensor_on_the_model_device(trained):
    _, audit, _, _ = trained
    assert audit.violations == []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unlearning_keeps_every_tensor_on_the_model_device(tiny_root, trained, method):
    out, _, ckpt, request = trained
    assert unlearn_pass(tiny_root, out, ckpt, request, method).violations == []


def test_evaluation_keeps_every_tensor_on_the_model_device(tiny_root, trained):
    out, _, ckpt, request = trained
    assert eval_pass(tiny_root, out, ckpt, request).violations == []


def test_the_audit_flags_what_a_gpu_refuses():
    """Each line below the model's move is legal on the CPU; the audit must flag exactly the ones CUDA
    would refuse."""
    lin = torch.nn.Linear(3, 2)
    with DeviceAudit(project=(__file__,)) as audit:
        lin.to(torch.device("cpu"))  # a device object: the model's device
        x = torch.ones(4, 3, device="cpu")  # a host batch
        lin(x.to(lin.weight.device))  # moved first: fine
        lin.weight.sum() * torch.tensor(2.0, device="cpu")  # a CPU scalar in an elementwise op: fine
        lin.bias[torch.tensor([1], device="cpu")]  # host indices into a device tensor: fine
        lin.weight.detach().cpu().tolist()  # leaving the step: fine
        lin(x)  # 1: host batch meets the parameters
        torch.cat([lin.bias, torch.zeros(2, device="cpu")])  # 2: cat across devices
        torch.zeros(2) + lin.bias  # 3: created without device= (and 4: mixed)
        x[0, :2].add_(lin.bias)  # 5: in place into a host tensor
    assert audit.tag(lin.weight) == ACCEL and audit.tag(x) == HOST
    found = "\n".join(audit.violations)
    assert len(audit.violations) == 5, found
    for what in ("linear mixes", "cat mixes", "torch.zeros without device=", "add mixes", "add_ writes into a host"):
        assert what in found, (what, found)


@pytest.mark.slow
def test_two_ranks_hand_only_device_tensors_to_collectives(tiny_root, trained, tmp_path):
    """iamu in the sharded mode (reduce-scatter, all-gather, Gram all-reduce, the `auto` engine's broadcast),
    salun (saliency all-reduce, mask broadcast), neggrad_plus (DDP, the global counts), the sync check's
    all_gather and the evaluation's meter all-reduce, on real gloo ranks."""
    _, _, ckpt, request = trained
    accelerate_launch(
        [
            ROOT / "tests" / "scripts" / "device_pass.py",
            tiny_root,
            tmp_path,
            ckpt,
            request,
            "iamu,salun,neggrad_plus",
            "--set",
            "unlearn.reduction=sharded",
            "--set",
            "unlearn.signal_engine=auto",
        ],
        nproc=2,
        cwd=tmp_path,
    )
    for rank in range(2):
        audits = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {k: a["violations"] for k, a in audits.items() if a["violations"]} == {}
        used = set().union(*(a["collectives"] for a in audits.values()))
        assert {"all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "all_gather"} <= used
