"""Distillation methods: small classes with generator_loss / fake_score_loss; the registry maps names to them."""
from __future__ import annotations

import dataclasses

from .dmd import DMD, DMD2
from .gndm import GNDM
from .sfd import SFD
from .sid import SiD
from .vsd import VSD

METHODS: dict[str, type] = {"dmd": DMD, "dmd2": DMD2, "vsd": VSD, "sid": SiD, "sfd": SFD, "gndm": GNDM}


def method_options(name: str) -> dict[str, dataclasses.Field]:
    """The configurable fields of a method, by name."""
    return {f.name: f for f in dataclasses.fields(METHODS[name]) if not f.name.startswith("_")}


def build_method(name: str, **options):
    """Instantiate a registered method with keyword options (unknown names or options raise ValueError)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    allowed = method_options(name)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"method {name!r} has no option {bad[0]!r}; its options: {', '.join(sorted(allowed))}")
    return METHODS[name](**options)


def default_generator_timesteps(method, schedule) -> list:
    """The generator's t_init when none is configured: a method's own sigma_init on EDM teachers (SiD, SFD: 2.5),
    else [] (the schedule's top: VP t = T - 1, EDM sigma_max, flow t = 1)."""
    sigma = getattr(method, "sigma_init", None)
    return [min(sigma, schedule.t_max)] if sigma is not None and schedule.kind == "edm" else []
