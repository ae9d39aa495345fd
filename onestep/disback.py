"""DisBack (Zhang et al., ICLR 2025): degradation recording and distribution backtracking around any method.

1. Degradation recording: the fake score (a float32 copy of the teacher, or its LoRA) is trained with the teacher's
   own denoising loss on samples of the initial, frozen generator G0; every `interval` updates its trained weights are
   saved as a node, S'_1 .. S'_N (S'_0 is the teacher). Nodes are safetensors files beside an `index.json` that names
   the teacher, the generator and the settings; an index made for another teacher is refused.
2. Distribution backtracking: the fake score starts from S'_N (it already fits G0); the DM target (`triad.teacher`, the
   "real score" every method reads) is S'_{N-1}, then S'_{N-2}, ..., S'_1, then the teacher itself for the rest of
   training. It switches every `interval` iterations ("fixed") or earlier when the smoothed DM-gradient norm stops
   falling ("plateau"). `DisBack` wraps a method object and delegates everything else to it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .denoiser import Denoiser, cast_module
from .errors import OnestepError
from .methods.dmd import NATIVE_LOSS_SPACE, weighted_dsm

FORMAT = "onestep-disback-1"
SWITCHES = ("fixed", "plateau")
NORM_KEYS = ("dm_grad_norm", "vsd_grad_norm", "score_gap")  # the DM-gradient norm each method logs (DMD, VSD, SiD)


class RecordingError(OnestepError):
    """A degradation recording that cannot serve this run (another teacher, other settings, a node that does not fit)."""


# ---- helpers -------------------------------------------------------------------------------------------------------
def weights_sha256(module: nn.Module, *extra, skip: str = "lora_") -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes; keys containing `skip` left out, peft's
    `.base_layer` dropped from names, so a LoRA-carrying teacher hashes as itself) and of `extra`."""
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    state = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if not (skip and skip in k)}
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def trained_names(denoiser: Denoiser) -> list[str]:
    """The backbone parameters a node holds: those the fake score trains (all of a copy, the LoRA of an adapter)."""
    return [n for n, p in denoiser.backbone.named_parameters() if p.requires_grad]


def load_node(backbone: nn.Module, state: dict[str, torch.Tensor], names: list[str], what: str = "node") -> None:
    """Copy `state` into the backbone's parameters; its keys and shapes must be exactly `names` (no silent partial load)."""
    params = dict(backbone.named_parameters())
    missing, unexpected = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or unexpected or any(n not in params for n in names):
        raise RecordingError(f"{what} does not fit this network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n in names:
            if params[n].shape != state[n].shape:
                raise RecordingError(f"{what}: {n} has shape {tuple(state[n].shape)}, the network {tuple(params[n].shape)}")
            params[n].copy_(state[n])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive lock on `folder` (POSIX flock: released if the process dies); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


RECORDING_FILE = re.compile(r"(node_\d{3,}\.safetensors|optimizer\.safetensors|index\.json)(\.tmp)?|\.lock")


def _check_record_folder(folder: str) -> None:
    """A recording folder that exists or can be created."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RecordingError(f"record_dir: cannot create {folder!r} ({type(e).__name__}); pass a writable folder") from None
    check_not_foreign(folder)


def check_not_foreign(folder: str) -> None:
    """A recording writes node_NNN / optimizer / index files: never into a folder that holds anything else."""
    foreign = sorted(n for n in os.listdir(folder) if not RECORDING_FILE.fullmatch(n)) if os.path.isdir(folder) else []
    if foreign:
        raise RecordingError(f"record_dir: {folder!r} holds files that are not a DisBack recording ({foreign[0]!r}"
                             f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); pass a new or empty folder")


def _save_atomic(tensors: dict, path: str) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


# ---- stage 1: degradation recording ------------------------------------------------------------------------------
@dataclass
class RecordingSettings:
    """How the degradation path is recorded (part of a recording's identity, except the node count)."""

    interval: int = 100              # fake-score updates between nodes (the release: a node every 100 of 1000)
    lr: float = 4e-4                 # AdamW learning rate
    batch_size: int = 64             # G0 samples per update
    cond_dropout: float = 0.1        # condition dropped to null with this probability (the teacher's own loss)
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0          # max grad norm (0: off)
    seed: int = 0                    # node i is trained under seed (seed, i): resuming reproduces it exactly


@dataclass
class Recording:
    """A recording folder: index.json + node_001.safetensors, ...; node(0) is None (the teacher)."""

    folder: str
    index: dict

    @property
    def names(self) -> list[str]:
        return self.index["names"]

    def node(self, k: int) -> dict[str, torch.Tensor] | None:
        return None if k == 0 else load_file(os.path.join(self.folder, self.index["nodes"][k - 1]["file"]))

    @property
    def distances(self) -> list[float]:
        return [n["distance"] for n in self.index["nodes"]]


def recording_identity(triad, settings: RecordingSettings, draw_cond) -> dict:
    """What a recording depends on: the teacher's weights, G0 (weights, timesteps, the conditions it is sampled on:
    256 draws under a fixed seed), the fake score's form and the settings."""
    fake, gen = triad.raw("fake_score"), triad.raw("generator")
    names = set(trained_names(fake))
    conds = draw_cond(256, generator=torch.Generator().manual_seed(0))
    conds = hashlib.sha256(b"" if conds is None else conds.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"format": FORMAT, "teacher": weights_sha256(triad.teacher.backbone),
            "generator": weights_sha256(getattr(gen.denoiser, "backbone", gen.denoiser), gen.timesteps, gen.schedule),
            "conditions": conds.hexdigest(),
            "network": "lora" if fake.adapters else "copy", "trained_tensors": len(names),
            "trained_parameters": sum(p.numel() for n, p in fake.backbone.named_parameters() if n in names),
            "loss_space": NATIVE_LOSS_SPACE[fake.schedule.kind],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}}


def open_recording(folder: str, identity: dict) -> Recording | None:
    """The recording in `folder` if it matches `identity` (None if there is none); a mismatch is refused."""
    path = os.path.join(folder, "index.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        old = index.get("identity", {})
    except (ValueError, AttributeError) as e:
        raise RecordingError(f"record_dir: {path} is not a DisBack recording index ({type(e).__name__}); remove the "
                             "folder or pass another --record_dir") from None
    if old.get("teacher") != identity["teacher"]:
        raise RecordingError(f"record_dir: {folder} holds a recording made for another teacher (weights sha256 "
                             f"{str(old.get('teacher'))[:12]}, this teacher {identity['teacher'][:12]}; a teacher stored "
                             "at another precision counts as another); pass another --record_dir or remove it")
    for key, value in identity.items():
        if old.get(key) != value:
            raise RecordingError(f"record_dir: {folder} holds a recording with {key}={str(old.get(key))[:40]!r}, this run "
                                 f"needs {str(value)[:40]!r}; pass another --record_dir or remove it")
    return Recording(folder, index)


def record_degradation(triad, draw_cond, sample_shape, device, folder: str, nodes: int,
                       settings: RecordingSettings, identity: dict | None = None) -> Recording:
    """Train the fake score on G0's samples with the teacher's denoising loss until `folder` holds `nodes` nodes.

    Resumes (and extends) a matching recording from its last node; leaves the fake score at S'_nodes.
    """
    identity = identity or recording_identity(triad, settings, draw_cond)
    rec = open_recording(folder, identity) or Recording(folder, {"identity": identity, "names": trained_names(
        triad.raw("fake_score")), "nodes": [], "seconds": 0.0})
    fake, gen = triad.raw("fake_score"), triad.raw("generator")
    names, sched = rec.names, fake.schedule
    params = dict(fake.backbone.named_parameters())
    start = {n: params[n].detach().float().cpu().clone() for n in names}  # node 0: the teacher (a LoRA: its start)
    done = min(len(rec.index["nodes"]), nodes)
    if done:
        load_node(fake.backbone, rec.node(done), names, f"node {done} of {folder}")
    if done == nodes:
        return rec
    os.makedirs(folder, exist_ok=True)
    opt = torch.optim.AdamW([params[n] for n in names], lr=settings.lr, betas=tuple(settings.betas),
                            weight_decay=settings.weight_decay, fused=torch.device(device).type in ("cuda", "cpu"))
    if done:  # the optimiser moments after node `done`: the recording continues as if never interrupted
        moments = load_file(os.path.join(folder, "optimizer.safetensors"))
        opt.load_state_dict({"param_groups": opt.state_dict()["param_groups"], "state": {
            i: {k: moments[f"{i}.{k}"].reshape(()) if k == "step" else moments[f"{i}.{k}"]
                for k in ("step", "exp_avg", "exp_avg_sq")} for i in range(len(names))}})
    space = NATIVE_LOSS_SPACE[sched.kind]
    for k in range(done + 1, nodes + 1):
        t0 = time.time()
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(settings.seed * 100003 + k)
            for _ in range(settings.interval):
                with torch.no_grad():
                    c = draw_cond(settings.batch_size)
                    x = gen.sample(torch.randn(settings.batch_size, *sample_shape, device=device), c)  # G0, frozen
                n = x.shape[0]
                t = (sched.sample_t_lognormal(n, device=x.device) if sched.kind == "edm"
                     else sched.sample_t(n, 0.0, 1.0, device=x.device))
                x_t = sched.add_noise(x, torch.randn_like(x), t)
                loss = weighted_dsm(sched, t, fake(x_t, t, fake.drop_cond(c, settings.cond_dropout)), x, space).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], settings.grad_clip)
                opt.step()
        node = {n: params[n].detach().float().cpu() for n in names}
        dist = torch.sqrt(sum((node[n] - start[n]).square().sum() for n in names)).item()
        _save_atomic(node, os.path.join(folder, f"node_{k:03d}.safetensors"))
        state = opt.state_dict()["state"]
        _save_atomic({f"{i}.{key}": v.reshape(-1) if key == "step" else v for i, s in state.items()
                      for key, v in s.items()}, os.path.join(folder, "optimizer.safetensors"))
        rec.index["nodes"].append({"file": f"node_{k:03d}.safetensors", "updates": k * settings.interval,
                                   "distance": dist, "loss": loss.item()})
        rec.index["seconds"] = round(rec.index["seconds"] + time.time() - t0, 2)
        with open(os.path.join(folder, "index.json.tmp"), "w") as f:
            json.dump(rec.index, f, indent=1)
        os.replace(os.path.join(folder, "index.json.tmp"), os.path.join(folder, "index.json"))
    return rec


# ---- stage 2: distribution backtracking --------------------------------------------------------------------------
@dataclass
class DisBack:
    """Wraps a method: degradation recording in prepare(), then the DM target walks back from S'_{N-1} to the teacher."""

    base: object                              # the method (DMD, DMD2, VSD, SiD, ...) whose losses run unchanged
    nodes: int = 10                           # N: recorded nodes; the fake score starts from S'_N
    interval: int = 100                       # iterations on each target node ("plateau": at most)
    switch: str = "fixed"                     # "fixed" or "plateau" (smoothed DM-gradient norm stops falling)
    patience: int = 30                        # plateau: iterations without a new low before a switch
    tolerance: float = 0.01                   # plateau: relative fall that counts as a new low
    smoothing: float = 0.9                    # plateau: EMA factor of the norm over generator steps
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    record_dir: str = ""                      # the recording's folder ("": cache_root/<hash of its identity>)
    cache_root: str = "runs/disback"

    def __post_init__(self):
        if self.switch not in SWITCHES:
            raise ValueError(f"backtrack_switch must be one of {', '.join(SWITCHES)}, got {self.switch!r}")
        if self.nodes < 1 or self.interval < 1 or self.patience < 1:
            raise ValueError(f"backtrack nodes, interval and patience must be >= 1, got {self.nodes}, {self.interval}, "
                             f"{self.patience}")
        self.node, self.history, self.info = self.nodes - 1, [], {}
        self._track = {"ema": None, "best": None, "last_improve": 0, "last_switch": 0}
        self._triad = self._teacher = self._target = self._rec = None

    @classmethod
    def from_config(cls, base, cfg) -> "DisBack":
        """The wrapper as the trainer's Config describes it (backtrack_* and record_* keys)."""
        settings = RecordingSettings(cfg.record_interval, cfg.record_lr or cfg.lr_fake, cfg.batch_size,
                                     cfg.record_cond_dropout, (cfg.adam_beta1, cfg.adam_beta2), cfg.weight_decay,
                                     cfg.grad_clip)
        return cls(base, cfg.backtrack_nodes, cfg.backtrack_interval, cfg.backtrack_switch, cfg.backtrack_patience,
                   cfg.backtrack_tolerance, recording=settings, record_dir=cfg.record_dir,
                   cache_root=os.path.join(cfg.output_dir, "disback"))

    def __getattr__(self, name):  # everything not defined here is the base method's (uses_gan, fake_first, setup, ...)
        if name == "base" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    # ---- the method contract, delegated ------------------------------------------------------------
    def is_generator_step(self, step: int) -> bool:
        return self.base.is_generator_step(step)

    def generator_loss(self, triad, batch: dict):
        return self.base.generator_loss(triad, batch)

    def fake_score_loss(self, triad, batch: dict):
        return self.base.fake_score_loss(triad, batch)

    # ---- before training ---------------------------------------------------------------------------
    def prepare(self, triad, cond_sampler, sample_shape, device, seed: int = 0) -> None:
        """The base method's prepare (with the real teacher), the recording (made or reused), then S'_N and S'_{N-1}."""
        if hasattr(self.base, "prepare"):
            self.base.prepare(triad, cond_sampler, sample_shape, device, seed=seed)
        identity = recording_identity(triad, self.recording, cond_sampler)
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.record_dir or os.path.join(self.cache_root, key)
        _check_record_folder(folder)
        open_recording(folder, identity)  # every process refuses a foreign recording before any waits
        rank = torch.distributed.get_rank() if _distributed() else 0
        if rank == 0:
            t0 = time.time()
            with _folder_lock(folder):  # runs sharing the cache record one after the other, the second reusing
                record_degradation(triad, cond_sampler, sample_shape, device, folder, self.nodes, self.recording,
                                   identity)
            self.info["prepare_seconds"] = round(time.time() - t0, 1)
        if _distributed():
            torch.distributed.barrier()
        self._rec = open_recording(folder, identity)
        load_node(triad.raw("fake_score").backbone, self._rec.node(self.nodes), self._rec.names, f"node {self.nodes}")
        self._triad, self._teacher = triad, triad.teacher
        self.info.update(folder=folder, recording_updates=self.nodes * self.recording.interval,
                         recording_seconds=self._rec.index["seconds"],
                         node_distances=self._rec.distances[:self.nodes])
        self.set_target(self.node)

    def set_target(self, k: int) -> None:
        """Make node k the DM target: S'_k loaded (strict) into a frozen copy of the fake score's network (a full copy,
        or the teacher with its LoRA on) in the teacher's dtype; k = 0: the teacher module itself."""
        triad, teacher = self._triad, self._teacher
        self.node = k
        if k == 0:
            triad.teacher, self._target = teacher, None  # the original module, bit for bit; the copy is freed
            return
        if self._target is None:
            fake = triad.raw("fake_score")
            backbone = cast_module(copy.deepcopy(fake.backbone), teacher.dtype).requires_grad_(False).eval()
            self._target = Denoiser(backbone, teacher.schedule, null_cond=teacher.null_cond, adapters=fake.adapters,
                                    prediction_type=teacher.prediction_type)
            self._target.guidance_uncond, self._target.feature_layers = teacher.guidance_uncond, teacher.feature_layers
        load_node(self._target.backbone, self._rec.node(k), self._rec.names, f"node {k} of {self._rec.folder}")
        triad.teacher = self._target

    # ---- each iteration ----------------------------------------------------------------------------
    def on_step(self, triad, step: int, logs: dict) -> None:
        """After iteration `step`: track the DM-gradient norm, switch to the next node when the schedule says so."""
        tr, done = self._track, step + 1
        value = next((logs[k] for k in NORM_KEYS if k in logs), None)
        if value is not None:
            value = float(value)  # a host read each iteration: the plateau schedule decides on the host
            if _distributed():  # every process decides on the same mean
                v = torch.tensor([value], device=next(triad.raw("generator").parameters()).device)
                torch.distributed.all_reduce(v)
                value = v.item() / torch.distributed.get_world_size()
            tr["ema"] = value if tr["ema"] is None else self.smoothing * tr["ema"] + (1 - self.smoothing) * value
            if tr["best"] is None or tr["ema"] < tr["best"] * (1 - self.tolerance):
                tr["best"], tr["last_improve"] = tr["ema"], done
        dwell = done - tr["last_switch"]
        plateau = self.switch == "plateau" and tr["best"] is not None and done - tr["last_improve"] >= self.patience
        if self.node > 0 and (dwell >= self.interval or plateau):
            self.history.append([done, self.node - 1])
            self._track = {"ema": None, "best": None, "last_improve": done, "last_switch": done}
            self.set_target(self.node - 1)
        logs["backtrack_node"] = self.node

    # ---- checkpointing and metrics -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The schedule's position (node, switches, plateau tracker) and the base method's own state, if it has one
        (e.g. GNDM's), under "base/": plain values and tensors for the run's checkpoints."""
        state = {"node": self.node, "history": [list(h) for h in self.history], **self._track}
        if hasattr(self.base, "state_dict"):
            state.update({f"base/{k}": v for k, v in self.base.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue the schedule of a checkpoint: its node becomes the target again."""
        self.history = [list(h) for h in state["history"]]
        self._track = {k: state[k] for k in ("ema", "best", "last_improve", "last_switch")}
        if hasattr(self.base, "load_state_dict"):
            self.base.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("base/")})
        if self._triad is not None:
            self.set_target(int(state["node"]))
        else:
            self.node = int(state["node"])

    def extra_metrics(self, *args, **kwargs) -> dict:
        """The base method's figures plus metrics.json["disback"]: switches, final node, recording folder and cost."""
        out = self.base.extra_metrics(*args, **kwargs) if hasattr(self.base, "extra_metrics") else {}
        return {**out, "disback": {"nodes": self.nodes, "interval": self.interval, "switch": self.switch,
                                   "switches": self.history, "final_node": self.node, **self.info}}
