"""Property tests (hypothesis): the schedule's conversions for every schedule family and prediction type, and
configuration parsing, which either yields a valid Config or one ConfigError, whatever the input."""
import dataclasses
import math
import typing

import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onestep import runs
from onestep.config import Config, ConfigError, load_config, parse_cli
from onestep.schedule import PREDICTION_TYPES, Schedule

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@st.composite
def schedule_and_t(draw, n: int = 3):
    """A schedule of any family and n times inside its range."""
    kind = draw(st.sampled_from(["vp", "edm", "flow"]))
    if kind == "vp":
        steps = draw(st.integers(10, 2000))
        sched = Schedule.from_scheduler_config(dict(DDPMScheduler(
            num_train_timesteps=steps, beta_schedule=draw(st.sampled_from(BETA_SCHEDULES))).config))
        t = torch.tensor(draw(st.lists(st.integers(0, steps - 1), min_size=n, max_size=n)))
    elif kind == "edm":
        sched = Schedule("edm", prediction_type="edm", sigma_data=draw(st.floats(0.1, 2.0)))
        t = torch.tensor(draw(st.lists(st.floats(0.002, 80.0), min_size=n, max_size=n)))
    else:
        sched = Schedule("flow", prediction_type="flow")
        t = torch.tensor(draw(st.lists(st.floats(0.001, 0.999), min_size=n, max_size=n)))
    return sched, t


def _x0(seed: int, scale: float, n: int = 3) -> torch.Tensor:
    return scale * torch.randn(n, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(st_=schedule_and_t(), pred=st.sampled_from(PREDICTION_TYPES), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 10.0))
def test_every_prediction_type_round_trips_through_x0(st_, pred, seed, scale):
    sched, t = st_
    x0 = _x0(seed, scale)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    back = sched.to_x0(sched.from_x0(x0, x_t, t, pred), x_t, t, pred)
    a, s = sched.alpha_sigma(t, torch.float64)
    # conversions divide by alpha (eps) or sigma (edm, x0 -> eps): the error bound grows as they shrink
    tol = 1e-9 * scale * float(1 + (1 / a).max() + (1 / s).max()) + 1e-9 * float(x_t.abs().max())
    assert torch.allclose(back, x0, atol=tol * 1e3, rtol=0)


@SETTINGS
@given(st_=schedule_and_t(), seed=st.integers(0, 2**16))
def test_eps_of_the_true_x0_is_the_noise_and_v_matches_its_definition(st_, seed):
    sched, t = st_
    x0 = _x0(seed, 1.0)
    eps = torch.randn_like(x0)
    x_t = sched.add_noise(x0, eps, t)
    assert torch.allclose(sched.from_x0(x0, x_t, t, "epsilon"), eps, atol=1e-6)
    a, s = (v.reshape(-1, 1, 1, 1) for v in sched.alpha_sigma(t, torch.float64))
    assert torch.allclose(sched.from_x0(x0, x_t, t, "v_prediction"), a * eps - s * x0, atol=1e-6)
    assert torch.allclose(sched.from_x0(x0, x_t, t, "flow"), eps - x0, atol=1e-6)


@SETTINGS
@given(st_=schedule_and_t(n=2))
def test_signal_to_noise_falls_with_time(st_):
    sched, t = st_
    lo, hi = t.min().reshape(1), t.max().reshape(1)
    assert sched.snr(lo) >= sched.snr(hi)
    if sched.kind == "vp":  # variance preserving
        a, s = sched.alpha_sigma(t, torch.float64)
        assert torch.allclose(a**2 + s**2, torch.ones_like(a))


@SETTINGS
@given(st_=schedule_and_t(), space=st.sampled_from(["epsilon", "v_prediction", "flow", "edm", "sample"]),
       seed=st.integers(0, 2**16))
def test_loss_weight_turns_x0_mse_into_the_mse_of_that_space(st_, space, seed):
    sched, t = st_
    x0 = _x0(seed, 1.0)
    x_t = sched.add_noise(x0, torch.randn_like(x0), t)
    x0_hat = x0 + 0.1 * _x0(seed + 1, 1.0)
    direct = (sched.from_x0(x0_hat, x_t, t, space) - sched.from_x0(x0, x_t, t, space)).square().mean((1, 2, 3))
    weighted = sched.loss_weight(t, space).double() * (x0_hat - x0).square().mean((1, 2, 3))
    assert torch.allclose(direct, weighted, rtol=1e-4, atol=0)


@SETTINGS
@given(st_=schedule_and_t(n=1), lo=st.floats(0.0, 1.0), width=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_sampled_times_stay_in_the_asked_fraction_of_the_range(st_, lo, width, seed):
    """(lo = hi = 1 on a VP schedule: the last timestep, T - 1; it once asked randint for an empty range.)"""
    sched, _ = st_
    hi = min(1.0, lo + width)
    t = sched.sample_t(64, lo, hi, generator=torch.Generator().manual_seed(seed))
    if sched.kind == "vp":
        T = sched.num_train_timesteps
        assert t.dtype == torch.long and t.min() >= min(int(lo * T), T - 1) and t.max() <= min(int(hi * T), T - 1)
    elif sched.kind == "edm":
        assert t.min() >= sched.sigma_min * (1 - 1e-6) and t.max() <= sched.sigma_max * (1 + 1e-6)
    else:
        assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6


# ---- configuration parsing ---------------------------------------------------------------------------------
FIELDS = typing.get_type_hints(Config)
NUMERIC = sorted(k for k, v in FIELDS.items() if v in (int, float))
PLAIN_TEXT = st.text(st.characters(codec="ascii", exclude_characters="\x00"), max_size=12)
YAML_SPECIAL = st.sampled_from(["{", "[", "]", '"', "'", "a: b: c", "@x", "!!python/object/apply:os.system [ls]",
                                "- 1", "{a: [b", "1,,2", "[1, [2]]", "null", "~", ".inf", "-.nan", "0x1f", "1e400"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(FIELDS) + ["update_ratio", "t_min", "gan_t_max", "nope", "method_args"]),
       value=YAML_SPECIAL | PLAIN_TEXT | st.integers(-10**6, 10**6).map(str) | st.floats(allow_nan=True).map(repr))
def test_any_single_override_gives_a_config_or_one_config_error(key, value):
    """Whatever the value, parsing ends in a validated Config or a ConfigError (never another exception)."""
    assume(key not in ("output_dir", "teacher", "resume", "name", "prompts", "negative_prompt", "record_dir")
           or "\n" not in value)
    try:
        cfg = load_config([f"--{key}", value] if not value.startswith("--") else [f"--{key}={value}"])
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    numbers = [v for v in dataclasses.asdict(cfg).values() for v in (v if isinstance(v, list) else [v])]
    assert all(math.isfinite(v) for v in numbers if isinstance(v, float))  # no inf / nan gets through


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(NUMERIC), st.integers(1, 50), min_size=1, max_size=4))
def test_cli_and_config_file_agree(values, tmp_path_factory):
    """`--key value`, `--key=value`, `--key-with-dashes value` and a YAML file give the same Config."""
    typed = {k: float(v) / 100 if FIELDS[k] is float else v for k, v in values.items()}
    try:
        ref = load_config([a for k, v in typed.items() for a in (f"--{k}", str(v))])
    except ConfigError:  # out of range for that key (e.g. ema_decay >= 1): every spelling must say so
        for argv in ([f"--{k}={v}" for k, v in typed.items()],):
            with pytest.raises(ConfigError):
                load_config(argv)
        return
    path = tmp_path_factory.mktemp("cfg") / "run.yaml"
    path.write_text(yaml.safe_dump(typed))
    assert load_config([f"--{k}={v}" for k, v in typed.items()]) == ref
    assert load_config([a for k, v in typed.items() for a in (f"--{k.replace('_', '-')}", str(v))]) == ref
    assert load_config(["--config", str(path)]) == ref
    for k, v in typed.items():
        assert getattr(ref, k) == v


def test_method_options_are_typed_however_given(tmp_path):
    """A method option from the command line is stored typed (config.yaml records 1.5, not '1.5'), as from YAML."""
    cli = load_config(["--real_guidance_scale", "1.5", "--update_ratio", "2"])
    path = tmp_path / "run.yaml"
    path.write_text("real_guidance_scale: 1.5\nupdate_ratio: 2\n")
    assert cli == load_config(["--config", str(path)])
    assert type(cli.method_args["real_guidance_scale"]) is float and type(cli.method_args["update_ratio"]) is int


@SETTINGS
@given(n=st.integers(-2**40, 2**40), x=st.floats(-1e12, 1e12))
def test_numbers_parse_exactly(n, x):
    assert parse_cli(["--seed", str(n)])[0] == {"seed": str(n)}
    if 0 <= n < 2**32:
        assert load_config(["--seed", str(n)]).seed == n
    if x > 0:
        assert load_config(["--lr_fake", repr(x)]).lr_fake == x
    else:
        with pytest.raises(ConfigError, match="lr_fake: must be > 0"):
            load_config(["--lr_fake", repr(x)])


@SETTINGS
@given(key=st.sampled_from(sorted(runs.HASH_IGNORED)), other=st.sampled_from(["lr_fake", "seed", "teacher", "batch_size"]))
def test_config_hash_ignores_run_plumbing_and_sees_the_trajectory(key, other):
    base = dataclasses.asdict(Config())
    plumbing = {**base, key: "changed" if isinstance(base[key], str) else not base[key] if isinstance(base[key], bool)
                else [] if isinstance(base[key], list) else base[key] + 1}
    assert runs.config_hash(plumbing) == runs.config_hash(base)
    changed = {**base, other: base[other] + 1 if isinstance(base[other], (int, float)) else base[other] + "x"}
    assert runs.config_hash(changed) != runs.config_hash(base)
    # a key added later hashes as its absence at its default (an older checkpoint still matches), not otherwise
    older = {k: v for k, v in base.items() if k not in runs.HASH_DEFAULTS}
    assert runs.config_hash(older) == runs.config_hash(base)
    assert runs.config_hash({**base, "gradient_accumulation_steps": 2}) != runs.config_hash(base)
