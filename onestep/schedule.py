"""The noise schedule: the one place that knows alpha(t) and sigma(t).

Forward process x_t = alpha(t) * x0 + sigma(t) * eps for three families:
  - "vp":   DDPM-style, t an integer timestep, alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t);
  - "edm":  Karras et al. 2022, t = sigma, alpha = 1;
  - "flow": rectified flow, t in [0, 1], alpha = 1 - t, sigma = t.
Every prediction type (eps, v, x0, flow velocity, EDM's F) converts through x0 here.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow", "edm")  # also the loss spaces
# EDM's F of diffusers' EDM schedulers: "edm" their epsilon preconditioning, "edm_v" their v_prediction one (c_out < 0)
MODEL_PREDICTIONS = (*PREDICTION_TYPES, "edm_v")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against (B, C, H, W)."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """x on `device` without making the host wait. A copy from pageable CPU memory to a CUDA device first waits for
    all the work already queued on the device (a host sync inside the step); staged in pinned memory it is queued
    like a kernel (torch's caching host allocator keeps the staging buffer until the copy has run)."""
    if device is None:
        return x
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def rho_grid(u: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """EDM's sigma at the fraction u in [0, 1] of its rho grid from sigma_min to sigma_max."""
    r = 1 / rho
    return (sigma_min**r + u * (sigma_max**r - sigma_min**r)) ** rho


class Schedule:
    """Noise schedule with alpha/sigma, noising, prediction conversions and timestep sampling."""

    def __init__(self, kind: str, *, prediction_type: str = "epsilon", alphas_cumprod: torch.Tensor | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0,
                 num_train_timesteps: int = 1000):
        if kind not in ("vp", "edm", "flow"):
            raise ValueError(f"schedule kind must be 'vp', 'edm' or 'flow', got {kind!r}")
        if prediction_type not in MODEL_PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {MODEL_PREDICTIONS}, got {prediction_type!r}")
        if kind == "vp" and alphas_cumprod is None:
            raise ValueError("a 'vp' schedule needs alphas_cumprod")
        self.kind, self.prediction_type = kind, prediction_type
        self.alphas_cumprod = None if alphas_cumprod is None else alphas_cumprod.double().cpu()
        self._tables: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod copied to each accelerator it is used on
        self.sigma_min, self.sigma_max, self.sigma_data, self.rho = sigma_min, sigma_max, sigma_data, rho
        self.num_train_timesteps = num_train_timesteps if kind != "vp" else len(self.alphas_cumprod)
        self.sampler_config: dict | None = None  # a flow / EDM teacher's scheduler config, for its multi-step sampler

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_scheduler_config(cls, config: dict) -> "Schedule":
        """Build from a diffusers scheduler config (DDPM, DDIM, Euler, LCM, ..., FlowMatchEuler, EDMEuler)."""
        import diffusers

        name = config.get("_class_name", "DDPMScheduler")
        sched_cls = getattr(diffusers, name, None)
        if sched_cls is None or not name.endswith("Scheduler"):
            raise ValueError(f"unknown diffusers scheduler class {name!r} in the teacher's scheduler config")
        sched = sched_cls.from_config(config)
        pred = config.get("prediction_type", "epsilon")
        if name.startswith("FlowMatch"):
            out = cls("flow", prediction_type="flow", num_train_timesteps=config.get("num_train_timesteps", 1000))
            out.sampler_config = dict(sched.config)  # its shift & co. for the multi-step sampler (sampling.py)
            return out
        if name.startswith("EDM"):
            out = cls("edm", prediction_type={"epsilon": "edm", "v_prediction": "edm_v"}.get(pred, pred),
                       sigma_min=config.get("sigma_min", 0.002), sigma_max=config.get("sigma_max", 80.0),
                       sigma_data=config.get("sigma_data", 0.5), rho=config.get("rho", 7.0))
            out.sampler_config = dict(sched.config)  # its sigma_schedule & co.
            return out
        if not hasattr(sched, "alphas_cumprod"):
            raise ValueError(f"scheduler {name} has no alphas_cumprod; onestep supports VP, EDM and flow schedules")
        return cls("vp", prediction_type=pred, alphas_cumprod=torch.as_tensor(sched.alphas_cumprod))

    @classmethod
    def from_scheduler(cls, scheduler) -> "Schedule":
        """Build from a diffusers scheduler object (its config does not name its class)."""
        return cls.from_scheduler_config({**scheduler.config, "_class_name": type(scheduler).__name__})

    # ---- alpha, sigma, noising ------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) as tensors shaped like t (float32 unless dtype says otherwise)."""
        t = torch.as_tensor(t)
        if self.kind == "vp":
            ac = self._table(t.device)[t.long().clamp(0, len(self.alphas_cumprod) - 1)]
            return ac.sqrt().to(dtype), (1 - ac).sqrt().to(dtype)
        t = t.to(dtype)
        if self.kind == "edm":
            return torch.ones_like(t), t
        return 1 - t, t

    def _table(self, device: torch.device) -> torch.Tensor:
        """alphas_cumprod on `device`, copied there once."""
        if device.type == "cpu":
            return self.alphas_cumprod
        if device not in self._tables:
            self._tables[device] = to_device(self.alphas_cumprod, device)
        return self._tables[device]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, in float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(x0.dtype, torch.float32)
        a, s = (append_dims(v, x0.ndim) for v in self.alpha_sigma(t, dtype))
        return a * x0.to(dtype) + s * eps.to(dtype)

    def prior(self, z: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The noisy input a sampler starts from at t: z for VP and flow, sigma * z for EDM."""
        if self.kind == "edm":
            return z * append_dims(torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0]), z.ndim)
        return z

    @property
    def t_max(self) -> float | int:
        """The noisiest time: T-1 (VP), sigma_max (EDM), 1 (flow)."""
        return {"vp": self.num_train_timesteps - 1, "edm": self.sigma_max, "flow": 1.0}[self.kind]

    def timesteps_tensor(self, t, n: int, device=None) -> torch.Tensor:
        """A (n,) tensor of time t (a number, a 0-d tensor or (n,) times) in this schedule's dtype (long for VP, float
        otherwise)."""
        dtype = torch.long if self.kind == "vp" else torch.float32
        if not torch.is_tensor(t):
            return torch.full((n,), t, dtype=dtype, device=device)
        return t.to(device, dtype).expand(n) if t.ndim == 0 else t.to(device, dtype)

    # ---- what the backbone sees -----------------------------------------------------------------
    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled input, timestep) for the backbone: EDM's c_in and c_noise, flow's t * T, VP unchanged."""
        if self.kind == "edm":
            s = t.float()
            c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
            return x_t * append_dims(c_in, x_t.ndim), 0.25 * s.log()
        if self.kind == "flow":
            return x_t, t.float() * self.num_train_timesteps
        return x_t, t

    # ---- prediction conversions (all through x0) ------------------------------------------------
    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        """Convert a backbone prediction of `prediction_type` at (x_t, t) into the x0 estimate."""
        p = prediction_type or self.prediction_type
        a, s = (append_dims(v, x_t.ndim) for v in self.alpha_sigma(t, pred.dtype))
        if p == "epsilon":
            return (x_t - s * pred) / a
        if p == "v_prediction":
            return (a * x_t - s * pred) / (a**2 + s**2)
        if p == "sample":
            return pred
        if p == "flow":  # u = eps - x0
            return (x_t - s * pred) / (a + s)
        if p in ("edm", "edm_v"):  # D = c_skip y + c_out F at EDM's y = x_t / alpha, sigma = sigma_t / alpha (EDM: alpha = 1)
            sd, y, s = self.sigma_data, x_t / a, s / a
            c_out = s * sd / (s**2 + sd**2).sqrt() * (-1 if p == "edm_v" else 1)
            return sd**2 / (s**2 + sd**2) * y + c_out * pred
        raise ValueError(f"unknown prediction_type {p!r}")

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str | None = None):
        """Inverse of to_x0: the prediction of `prediction_type` that yields x0 at (x_t, t)."""
        p = prediction_type or self.prediction_type
        a, s = (append_dims(v, x_t.ndim) for v in self.alpha_sigma(t, x0.dtype))
        eps = (x_t - a * x0) / s
        if p == "epsilon":
            return eps
        if p == "v_prediction":
            return a * eps - s * x0
        if p == "sample":
            return x0
        if p == "flow":
            return eps - x0
        if p in ("edm", "edm_v"):
            sd, y, s = self.sigma_data, x_t / a, s / a
            c_out = s * sd / (s**2 + sd**2).sqrt() * (-1 if p == "edm_v" else 1)
            return (x0 - sd**2 / (s**2 + sd**2) * y) / c_out
        raise ValueError(f"unknown prediction_type {p!r}")

    def loss_weight(self, t: torch.Tensor, space: str = "epsilon") -> torch.Tensor:
        """Per-sample weight on an x0-MSE so it equals the MSE in `space` ("sample" = x0, "edm" = EDM lambda)."""
        a, s = self.alpha_sigma(t)
        if space == "sample":
            return torch.ones_like(a)
        if space == "epsilon":
            return (a / s) ** 2
        if space == "v_prediction":
            return ((a**2 + s**2) / s) ** 2
        if space == "flow":
            return ((a + s) / s) ** 2
        if space == "edm":  # EDM's lambda(sigma) = 1/sigma^2 + 1/sigma_data^2 at sigma = sigma_t/alpha_t
            sd, sig = self.sigma_data, s / a
            return (sig**2 + sd**2) / (sig * sd) ** 2
        raise ValueError(f"unknown loss space {space!r}; use one of {PREDICTION_TYPES}")

    # ---- timestep sampling ----------------------------------------------------------------------
    def sample_t(self, n: int, lo: float = 0.0, hi: float = 1.0, device=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """n times uniform over the fraction [lo, hi] of the range (VP: integers; EDM: along the rho grid)."""
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"timestep fractions must satisfy 0 <= lo <= hi <= 1, got {lo}, {hi}")
        if self.kind == "vp":
            T = self.num_train_timesteps
            t_lo, t_hi = min(int(lo * T), T - 1), min(int(hi * T), T - 1)  # fraction 1: the last timestep
            return to_device(torch.randint(t_lo, t_hi + 1, (n,), generator=generator), device)
        u = lo + (hi - lo) * torch.rand(n, generator=generator)
        if self.kind == "edm":
            u = rho_grid(u, self.sigma_min, self.sigma_max, self.rho)
        return to_device(u, device)

    def t_for_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The time whose noise-to-signal ratio sigma(t)/alpha(t) is `sigma` (EDM's sigma): VP the nearest integer
        t (in log ratio), EDM sigma itself, flow sigma / (1 + sigma)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if self.kind == "edm":
            return sigma.float()
        if self.kind == "flow":
            return (sigma / (1 + sigma)).float()
        ac = self.alphas_cumprod
        log_ratio = 0.5 * ((1 - ac) / ac).log()  # increasing in t
        target = sigma.log()
        i = torch.searchsorted(log_ratio, target).clamp(1, len(ac) - 1)
        nearer_lo = (target - log_ratio[i - 1]) < (log_ratio[i] - target)
        return torch.where(nearer_lo, i - 1, i).long()

    def sample_t_karras(self, n: int, lo: float = 0.0, hi: float = 1.0, device=None,
                        generator: torch.Generator | None = None, sigma_min: float = 0.002,
                        sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
        """n times whose sigma/alpha is uniform over the fraction [lo, hi] of EDM's rho grid from sigma_min to
        sigma_max (an EDM schedule uses its own grid: the same as sample_t): EDM-defined timestep ranges on any
        teacher."""
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"timestep fractions must satisfy 0 <= lo <= hi <= 1, got {lo}, {hi}")
        if self.kind == "edm":
            sigma_min, sigma_max, rho = self.sigma_min, self.sigma_max, self.rho
        u = lo + (hi - lo) * torch.rand(n, generator=generator).double()
        return to_device(self.t_for_sigma(rho_grid(u, sigma_min, sigma_max, rho)), device)

    def sample_t_lognormal(self, n: int, p_mean: float = -1.2, p_std: float = 1.2, device=None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """EDM's training distribution ln(sigma) ~ N(p_mean, p_std^2), each sigma taken to the time with the same
        sigma/alpha (EDM: sigma itself; VP: the nearest integer t, so at most the last timestep's; flow: sigma/(1+sigma))."""
        return to_device(self.t_for_sigma((p_mean + p_std * torch.randn(n, generator=generator).double()).exp()), device)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha^2 / sigma^2."""
        a, s = self.alpha_sigma(t)
        return (a / s) ** 2

    def __repr__(self) -> str:
        extra = f"T={self.num_train_timesteps}" if self.kind == "vp" else f"sigma=[{self.sigma_min}, {self.sigma_max}]"
        return f"Schedule({self.kind}, {self.prediction_type}, {extra})"
