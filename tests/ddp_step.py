"""Launched by tests/test_ddp.py with 2 CPU processes: one DMD2 iteration under DDP vs the same global batch on one
process (the two halves' gradients averaged, as data parallelism defines it); and again with two micro-batches per
process (--gradient_accumulation_steps: onestep.update.accumulated, gradients synchronised at the last one) vs the
four quarters' gradients averaged on one process. Writes OUT/ddp_step.json on rank 0."""
import copy
import json
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_triad_methods import make_triad  # noqa: E402

from onestep.methods import build_method  # noqa: E402
from onestep.update import accumulated  # noqa: E402

torch.set_num_threads(1)
acc = Accelerator()
rank, world, n = acc.process_index, acc.num_processes, 4
torch.manual_seed(0)
triad = make_triad(gan=True)  # identical initial weights on every process (fixed seeds)
reference = copy.deepcopy(triad)  # the single-process run, kept unwrapped
acc_triad, acc_reference = copy.deepcopy(triad), copy.deepcopy(triad)  # the same two with micro-batches
initial = {"generator": [p.detach().clone() for p in triad.generator_parameters()],
           "critic": [p.detach().clone() for p in triad.critic_parameters()]}
method = build_method("dmd2", real_guidance_scale=2.0)
g = torch.Generator().manual_seed(123)  # the global batch
full = {"z": torch.randn(world * n, 1, 8, 8, generator=g), "cond": torch.randint(0, 10, (world * n,), generator=g),
        "real": torch.rand(world * n, 1, 8, 8, generator=g) * 2 - 1, "real_cond": torch.randint(0, 10, (world * n,), generator=g)}


def shard(r):
    return {k: v[r * n:(r + 1) * n] for k, v in full.items()}


def sgd(params):
    return torch.optim.SGD(params, lr=0.05)


opt_g, opt_f = sgd(triad.generator_parameters()), sgd(triad.critic_parameters())
triad.generator, triad.fake_score, triad.gan_head, opt_g, opt_f = acc.prepare(
    triad.generator, triad.fake_score, triad.gan_head, opt_g, opt_f)
ref_g, ref_f = sgd(reference.generator_parameters()), sgd(reference.critic_parameters())

# DDP: each process its shard, its own random stream (t, noise) seeded by its rank.
batch = shard(rank)
for turn, fn, opt in (("g", method.generator_loss, opt_g), ("f", method.fake_score_loss, opt_f)):
    torch.manual_seed(1000 * (turn == "f") + rank)
    loss, _ = fn(triad, batch)
    opt.zero_grad()
    acc.backward(loss)
    opt.step()

# One process, the same global batch: every shard with the same random stream, mean of the shard losses.
shards = [shard(r) for r in range(world)]
for turn, fn, opt in (("g", method.generator_loss, ref_g), ("f", method.fake_score_loss, ref_f)):
    opt.zero_grad()
    for r, b in enumerate(shards):
        torch.manual_seed(1000 * (turn == "f") + r)
        (fn(reference, b)[0] / world).backward()
    opt.step()


# Gradient accumulation: two micro-batches of n // 2 per process, micro-batch j = 2 * rank + i seeded j; on one
# process, the mean over the four micro-batches with the same seeds.
m = n // 2


def micro(j):
    return {k: v[j * m:(j + 1) * m] for k, v in full.items()}


opt_ga, opt_fa = sgd(acc_triad.generator_parameters()), sgd(acc_triad.critic_parameters())
acc_triad.generator, acc_triad.fake_score, acc_triad.gan_head, opt_ga, opt_fa = acc.prepare(
    acc_triad.generator, acc_triad.fake_score, acc_triad.gan_head, opt_ga, opt_fa)
mine = [dict(micro(2 * rank + i), seed=2 * rank + i) for i in range(2)]
ddp_modules = [acc_triad.generator, acc_triad.fake_score, acc_triad.gan_head]
for turn, fn, opt in (("g", method.generator_loss, opt_ga), ("f", method.fake_score_loss, opt_fa)):
    def seeded(t, b, fn=fn, turn=turn):
        torch.manual_seed(1000 * (turn == "f") + b["seed"])
        return fn(t, b)
    opt.zero_grad()
    accumulated(acc, seeded, acc_triad, mine, ddp_modules)
    opt.step()
ref_ga, ref_fa = sgd(acc_reference.generator_parameters()), sgd(acc_reference.critic_parameters())
quarters = [micro(j) for j in range(2 * world)]
for turn, fn, opt in (("g", method.generator_loss, ref_ga), ("f", method.fake_score_loss, ref_fa)):
    opt.zero_grad()
    for j, b in enumerate(quarters):
        torch.manual_seed(1000 * (turn == "f") + j)
        (fn(acc_reference, b)[0] / len(quarters)).backward()
    opt.step()


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


report = {}
for pre, run, ref in (("", triad, reference), ("accumulated_", acc_triad, acc_reference)):
    for role, params, ref_params in (("generator", run.generator_parameters(), ref.generator_parameters()),
                                     ("critic", run.critic_parameters(), ref.critic_parameters())):
        weights = flat(params)
        everyone = acc.gather(weights[None])
        report[f"{pre}{role}_replica_spread"] = (everyone - everyone[0]).abs().max().item()
        report[f"{pre}{role}_vs_single_process"] = (weights - flat(ref_params)).abs().max().item()
        report[f"{pre}{role}_update_size"] = (flat(ref_params) - flat(initial[role])).abs().max().item()
if acc.is_main_process:
    with open(os.path.join(sys.argv[1], "ddp_step.json"), "w") as f:
        json.dump(report, f)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # before exit: a process group torn down at interpreter exit can abort
