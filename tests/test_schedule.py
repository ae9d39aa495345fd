import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from onestep.schedule import PREDICTION_TYPES, Schedule


def schedules():
    vp = Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    edm = Schedule("edm", prediction_type="edm")
    flow = Schedule.from_scheduler(FlowMatchEulerDiscreteScheduler())
    assert (vp.kind, flow.kind) == ("vp", "flow")
    return {"vp": (vp, torch.randint(0, 1000, (16,))), "edm": (edm, torch.rand(16) * 80 + 0.002),
            "flow": (flow, torch.rand(16) * 0.98 + 0.01)}


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
@pytest.mark.parametrize("pred", PREDICTION_TYPES)
def test_conversions_round_trip(kind, pred):
    sched, t = schedules()[kind]
    x0 = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    x_t = sched.add_noise(x0, eps, t).double()
    p = sched.from_x0(x0, x_t, t, pred)
    assert torch.allclose(sched.to_x0(p, x_t, t, pred), x0, atol=1e-6)
    if pred == "epsilon":  # the eps prediction of the true x0 is the true noise
        assert torch.allclose(p, eps, atol=1e-5)


def test_vp_matches_diffusers_add_noise():
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    sched = Schedule.from_scheduler_config(dict(ddpm.config))
    x0, eps, t = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4), torch.randint(0, 1000, (8,))
    assert torch.allclose(sched.add_noise(x0, eps, t), ddpm.add_noise(x0, eps, t), atol=1e-5)
    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        assert Schedule.from_scheduler(cls.from_config(ddpm.config)).kind == "vp"


@pytest.mark.parametrize("space", ["epsilon", "v_prediction", "flow", "edm"])
def test_loss_weight_equals_mse_in_space(space):
    kind = {"epsilon": "vp", "v_prediction": "vp", "flow": "flow", "edm": "edm"}[space]
    sched, t = schedules()[kind]
    x0 = torch.randn(16, 2, 3, 3, dtype=torch.float64)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t).double()
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    direct = (sched.from_x0(x0_hat, x_t, t, space) - sched.from_x0(x0, x_t, t, space)).square().mean((1, 2, 3))
    weighted = sched.loss_weight(t, space).double() * (x0_hat - x0).square().mean((1, 2, 3))
    assert torch.allclose(direct, weighted, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 999), pred=st.sampled_from(["epsilon", "v_prediction", "sample"]), scale=st.floats(0.1, 10))
def test_vp_round_trip_property(t, pred, scale):
    sched = Schedule.from_scheduler_config(dict(DDPMScheduler().config))
    tt = torch.tensor([t])
    x0 = scale * torch.randn(1, 1, 2, 2, dtype=torch.float64)
    x_t = sched.add_noise(x0, torch.randn_like(x0), tt).double()
    assert torch.allclose(sched.to_x0(sched.from_x0(x0, x_t, tt, pred), x_t, tt, pred), x0, atol=1e-6 * scale)


def test_sample_t_ranges():
    vp = schedules()["vp"][0]
    t = vp.sample_t(4000, 0.02, 0.98)
    assert t.min() >= 20 and t.max() <= 980 and t.dtype == torch.long
    edm = Schedule("edm", prediction_type="edm")
    s = edm.sample_t(1000, 0.0, 1.0)
    assert s.min() >= 0.002 and s.max() <= 80.0
    with pytest.raises(ValueError):
        vp.sample_t(2, 0.9, 0.1)
    T = vp.num_train_timesteps  # the top fraction alone is the last timestep (it once asked randint for [T, T])
    assert vp.sample_t(8, 1.0, 1.0).tolist() == [T - 1] * 8 and vp.sample_t(8, 0.0, 0.0).tolist() == [0] * 8


@pytest.mark.parametrize("kind", ["vp", "edm", "flow"])
def test_karras_times_have_the_edm_noise_to_signal_ratio(kind):
    sched = schedules()[kind][0]
    sigma = torch.tensor([0.05, 0.3, 1.0, 5.0, 24.0], dtype=torch.float64)
    a, s = sched.alpha_sigma(sched.t_for_sigma(sigma), torch.float64)
    tol = 0.06 if kind == "vp" else 1e-5  # VP: the nearest of 1000 integer times
    assert torch.allclose((s / a).log(), sigma.log(), atol=tol)
    g = torch.Generator().manual_seed(0)
    t = sched.sample_t_karras(4000, 0.0, 0.8, generator=g)
    a, s = sched.alpha_sigma(t, torch.float64)
    ratio = s / a
    assert ratio.max() <= 24.4 * (1 + tol)  # fraction 0.8 of the grid 0.002 .. 80 (rho 7) is sigma 24.4
    assert 0.6 < ratio.median() < 1.6  # the grid's midpoint at 0.4 is sigma ~0.97
    if kind == "edm":
        torch.manual_seed(1)
        x = sched.sample_t_karras(8, 0.1, 0.7)
        torch.manual_seed(1)
        assert torch.allclose(x, sched.sample_t(8, 0.1, 0.7))  # an EDM teacher's own grid: the same times


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_edm_weight_and_lognormal_times_on_other_schedules(kind):
    """EDM's loss space on a VP / flow teacher: x_t / alpha is EDM's noisy input at sigma = sigma_t / alpha_t, so the
    weighted x0-MSE equals the MSE of EDM's F-prediction there; the log-normal fake-score times are those with
    ln(sigma / alpha) ~ N(-1.2, 1.2^2)."""
    sched, t = schedules()[kind]
    edm = Schedule("edm", prediction_type="edm")
    a, s = sched.alpha_sigma(t, torch.float64)
    x0 = torch.randn(16, 2, 3, 3, dtype=torch.float64)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t).double()
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    y, sig = x_t / a.view(-1, 1, 1, 1), s / a
    direct = (edm.from_x0(x0_hat, y, sig, "edm") - edm.from_x0(x0, y, sig, "edm")).square().mean((1, 2, 3))
    weighted = sched.loss_weight(t, "edm").double() * (x0_hat - x0).square().mean((1, 2, 3))
    assert torch.allclose(direct, weighted, rtol=1e-4)
    ts = sched.sample_t_lognormal(20000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    a, s = sched.alpha_sigma(ts, torch.float64)
    log_ratio = (s / a).log()
    assert abs(log_ratio.mean() + 1.2) < 0.05 and abs(log_ratio.std() - 1.2) < 0.05


def test_unknown_scheduler_and_prediction_refused():
    with pytest.raises(ValueError, match="prediction_type"):
        Schedule("vp", prediction_type="foo", alphas_cumprod=torch.ones(3))
    with pytest.raises(ValueError, match="scheduler"):
        Schedule.from_scheduler_config({"_class_name": "NoSuchScheduler"})


@torch.no_grad()
def test_teacher_sampling_with_guidance_runs_cond_and_uncond_at_the_schedulers_time():
    """DDIM hands each step's time as a 0-d tensor; guidance batches cond and uncond at it (once crashed)."""
    from conftest import tiny_unet

    from onestep.denoiser import Denoiser
    from onestep.sampling import sample_teacher

    sched = Schedule.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
    assert sched.timesteps_tensor(torch.tensor(999), 3).tolist() == [999] * 3
    teacher = Denoiser(tiny_unet(), sched, null_cond=10)
    z, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    plain, guided = (sample_teacher(teacher, z, y, 2, s) for s in (1.0, 2.0))
    t = torch.tensor(999)  # the first step's x0 under guidance: x0_u + 2 (x0_c - x0_u)
    x = sched.prior(z, sched.t_max)
    x0_c, x0_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 10))
    assert torch.allclose(teacher.guided(x, t, y, 2.0), x0_u + 2 * (x0_c - x0_u), rtol=1e-5, atol=1e-3)
    assert guided.shape == plain.shape and torch.isfinite(guided).all() and not torch.allclose(guided, plain)


class _GaussianDenoiser:
    """The exact denoiser of data N(0, s^2) per pixel under EDM: x0 = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, schedule, s):
        self.schedule, self.s = schedule, s

    def guided(self, x, t, cond, scale):
        return self.s ** 2 / (self.s ** 2 + torch.as_tensor(t, dtype=x.dtype) ** 2) * x


@torch.no_grad()
def test_edm_teacher_sampling_follows_the_probability_flow_ode():
    """On Gaussian data the ODE's end point is known: x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2). Euler over the
    Karras sigmas approaches it at first order in the step count; one step is the denoiser at sigma_max."""
    from onestep.sampling import sample_teacher

    sched, s = Schedule("edm", prediction_type="edm", sigma_max=80.0), 0.7
    d, z = _GaussianDenoiser(sched, s), torch.randn(4, 1, 8, 8)
    exact = z * 80.0 * s / (s ** 2 + 80.0 ** 2) ** 0.5
    one = sample_teacher(d, z, num_steps=1)
    assert torch.allclose(one, d.guided(z * 80.0, 80.0, None, 1.0), atol=1e-4)  # float32 rounding of x at sigma 80
    errors = [(sample_teacher(d, z, num_steps=n) - exact).abs().max().item() for n in (16, 32, 64)]
    assert 1.8 < errors[0] / errors[1] < 2.2 and 1.8 < errors[1] / errors[2] < 2.2, errors  # first order, as Euler is
    assert errors[2] < 0.05 * exact.abs().max().item(), errors


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_preconditioning_is_diffusers_for_both_of_its_prediction_types(prediction_type):
    """An EDM scheduler's x0 = c_skip x + c_out F with diffusers' own c_out (negative for v_prediction), and back."""
    from diffusers import EDMEulerScheduler

    ref = EDMEulerScheduler(prediction_type=prediction_type, sigma_data=0.7)
    sched = Schedule.from_scheduler_config({**ref.config, "_class_name": "EDMEulerScheduler"})
    x, f, sigma = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([0.05, 3.0, 80.0])
    expect = torch.stack([ref.precondition_outputs(x[i], f[i], sigma[i]) for i in range(3)])
    assert torch.allclose(sched.to_x0(f, x, sigma), expect, atol=1e-5)
    assert torch.allclose(sched.from_x0(expect, x, sigma), f, atol=1e-3)


class _Recorder:
    """A denoiser that records the times it is called at (x0 = 0)."""

    def __init__(self, schedule):
        self.schedule, self.times = schedule, []

    def guided(self, x, t, cond, scale):
        self.times.append(float(t))
        return torch.zeros_like(x)


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"])
def test_teacher_sampling_keeps_the_teachers_scheduler_settings(scheduler):
    """A flow teacher's shift and an EDM teacher's sigma schedule are the sampler's: the times it visits are the
    teacher's own scheduler's."""
    import diffusers

    from onestep.sampling import sample_teacher

    ref = getattr(diffusers, scheduler)(**({"shift": 3.0} if scheduler.startswith("Flow") else
                                           {"sigma_schedule": "exponential"}))
    rec = _Recorder(Schedule.from_scheduler(ref))
    sample_teacher(rec, torch.randn(2, 1, 8, 8), num_steps=4)
    ref.set_timesteps(4)
    expect = ref.timesteps / 1000 if scheduler.startswith("Flow") else ref.sigmas[:-1]
    assert torch.allclose(torch.tensor(rec.times), expect.float(), rtol=1e-5), (rec.times, expect)
