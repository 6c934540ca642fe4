"""BatchNorm over all processes on CPUs (gloo): two processes with half the batch each compute what one
BatchNorm computes on the whole batch: outputs, input and parameter gradients, running statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from distill.syncbn import CpuSyncBatchNorm, convert_sync_batchnorm

ROOT = Path(__file__).resolve().parents[1]

_WORKER = """
import json, sys, torch, torch.distributed as dist
from distill.syncbn import CpuSyncBatchNorm
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
g = torch.Generator().manual_seed(0)
x, w = torch.randn(8, 4, 3, 3, generator=g) * 3 + 1, torch.randn(8, 4, 3, 3, generator=g)
bn = CpuSyncBatchNorm(4, momentum=0.3)
with torch.no_grad():
    bn.weight.copy_(torch.linspace(0.5, 2.0, 4)); bn.bias.copy_(torch.linspace(-1.0, 1.0, 4))
local = x[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
y = bn(local)
(y * w[4 * rank: 4 * rank + 4]).sum().backward()
json.dump({"y": y.tolist(), "x_grad": local.grad.tolist(), "w_grad": bn.weight.grad.tolist(),
           "b_grad": bn.bias.grad.tolist(), "mean": bn.running_mean.tolist(), "var": bn.running_var.tolist()},
          open(out, "w"))
dist.destroy_process_group()
"""


def test_two_processes_batchnorm_like_one_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 4, 3, 3, generator=g) * 3 + 1, torch.randn(8, 4, 3, 3, generator=g)
    reference = nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 2.0, 4))
        reference.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    full = x.clone().requires_grad_(True)
    y = reference(full)
    (y * w).sum().backward()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(tmp_path / "init"), str(outs[r])], env=env)
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ranks = [json.loads(out.read_text()) for out in outs]

    def both(key: str) -> torch.Tensor:
        return torch.cat([torch.tensor(r[key]) for r in ranks])

    torch.testing.assert_close(both("y"), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both("x_grad"), full.grad, atol=1e-5, rtol=1e-5)
    # each rank holds its share of the parameter gradient; DDP sums (averages) them
    for key, param in (("w_grad", reference.weight), ("b_grad", reference.bias)):
        torch.testing.assert_close(torch.tensor(ranks[0][key]) + torch.tensor(ranks[1][key]), param.grad, atol=1e-4,
                                   rtol=1e-5)  # fmt: skip
    for key, buffer in (("mean", reference.running_mean), ("var", reference.running_var)):
        for rank in ranks:
            torch.testing.assert_close(torch.tensor(rank[key]), buffer, atol=1e-5, rtol=1e-5)


def test_conversion_keeps_weights_and_state_dict_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(5)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], CpuSyncBatchNorm) and isinstance(converted[2][0], CpuSyncBatchNorm)
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    x = torch.randn(2, 3, 6, 6)
    converted.eval()  # one process, eval mode: plain BatchNorm
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    reference.load_state_dict({k: v for k, v in before.items() if not k.startswith("2.")})
    torch.testing.assert_close(converted[:2](x), reference.eval()(x))


def test_conversion_keeps_the_parameter_objects_and_timms_activation():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU))
    weight, mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the conversion
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert converted[1].weight is weight and converted[1].running_mean is mean
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in converted.parameters()}
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(converted.eval()(x), torch.relu(nn.functional.batch_norm(
        model[0](x), mean, model[1].running_var, weight, model[1].bias, False, 0.1, model[1].eps)))  # fmt: skip
