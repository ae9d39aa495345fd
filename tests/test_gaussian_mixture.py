"""A 2-D analytic check: a Gaussian-mixture teacher with an exact denoiser; DMD pulls a generator onto it."""
import torch
from diffusers import DDPMScheduler
from torch import nn

from onestep.denoiser import Denoiser
from onestep.generator import Generator
from onestep.methods import build_method
from onestep.schedule import Schedule, append_dims
from onestep.triad import Triad

MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
STD = 0.15


class ExactGMMDenoiser(nn.Module):
    """E[x0 | x_t] for x0 ~ (1/K) sum_k N(mu_k, STD^2 I) under x_t = a x0 + s eps: the exact teacher."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.dummy = nn.Parameter(torch.zeros(()))  # a frozen parameter so the module has a dtype

    def forward(self, x, t, return_dict=False):
        a, s = (append_dims(v, 2) for v in self.schedule.alpha_sigma(t))
        x = x.flatten(1)  # (B, 2)
        var = a**2 * STD**2 + s**2  # (B, 1)
        logp = -((x[:, None, :] - a[:, None] * MEANS[None]) ** 2).sum(-1) / (2 * var)  # (B, K)
        r = logp.softmax(-1)
        post = MEANS[None] + (a * STD**2 / var)[:, None] * (x[:, None, :] - a[:, None] * MEANS[None])
        return ((r[..., None] * post).sum(1)[..., None, None],)


class MLP(nn.Module):
    """A small x0-predicting network of (x_t, t)."""

    def __init__(self, identity_init=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 2))
        if identity_init:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
        self.skip = identity_init

    def forward(self, x, t, return_dict=False):
        h = torch.cat([x.flatten(1), (t.float() / 1000)[:, None]], 1)
        out = self.net(h) + (x.flatten(1) if self.skip else 0)
        return (out[..., None, None],)


def nearest_mode_distance(x):
    return torch.cdist(x.flatten(1), MEANS).min(1).values.mean().item()


def test_dmd_moves_generator_onto_gaussian_mixture():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add synchronisation
    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    teacher = Denoiser(ExactGMMDenoiser(sched), sched, prediction_type="sample")
    generator = Generator(Denoiser(MLP(identity_init=True), sched, prediction_type="sample"))
    fake = Denoiser(MLP(), sched, prediction_type="sample")
    triad = Triad(generator, fake, teacher)
    method = build_method("dmd", update_ratio=5, fake_loss_space="sample")
    opt_g = torch.optim.Adam(triad.generator_parameters(), lr=2e-3, betas=(0.0, 0.99))
    opt_f = torch.optim.Adam(triad.critic_parameters(), lr=2e-3, betas=(0.0, 0.99))
    z_eval = torch.randn(2000, 2, 1, 1)
    before = nearest_mode_distance(generator.sample(z_eval).detach())

    def batch():
        return {"z": torch.randn(256, 2, 1, 1), "cond": None}

    for _ in range(300):  # let the fake score fit the initial generator first
        opt_f.zero_grad()
        method.fake_score_loss(triad, batch())[0].backward()
        opt_f.step()
    for step in range(1500):
        if method.is_generator_step(step):
            opt_g.zero_grad()
            method.generator_loss(triad, batch())[0].backward()
            opt_g.step()
        opt_f.zero_grad()
        method.fake_score_loss(triad, batch())[0].backward()
        opt_f.step()
    with torch.no_grad():
        x = generator.sample(z_eval)
    after = nearest_mode_distance(x)
    assert after < before / 3, (before, after)
    share = torch.bincount(torch.cdist(x.flatten(1), MEANS).argmin(1), minlength=4) / len(x)
    assert share.min() > 0.1, share  # all four modes are kept
    assert teacher.backbone.dummy.grad is None
    torch.set_num_threads(threads)
