"""Run-folder plumbing for the trainer: the folder itself, crash-safe checkpoints, sample grids, curves.

A checkpoint is accelerate's `save_state` (models as safetensors; optimiser, scheduler and RNG states as
tensor-only torch files) plus `onestep_data.safetensors` (the real-image loader's position) and
`onestep_manifest.json` (step, config hash, sha256 of every file), written to `step_N.tmp` and renamed into place.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys

import torch

from .errors import OnestepError

CHECKPOINT_PREFIX = "step_"
MANIFEST = "onestep_manifest.json"
DATA_STATE = "onestep_data.safetensors"
MANIFEST_FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)(\.old|\.tmp|\.del)?$")  # .tmp: being written; .old: being replaced; .del: pruned
# accelerate's own file names; its .bin / .pkl / .pt files hold optimiser, scheduler, RNG and custom states, and
# under FSDP the full model state dicts (pytorch_model_fsdp*.bin: tensors only, which accelerate loads weights_only)
_STATE_FILE = re.compile(r"^(model(_\d+)?\.safetensors|(optimizer|scheduler|sampler|dl_state_dict|pytorch_model_fsdp)(_\d+)?\.bin|"
                         r"random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|scaler\.pt)$")
_PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# config keys that do not change the trajectory: left out of the config hash
HASH_IGNORED = ("name", "output_dir", "overwrite", "resume", "cpu_threads", "cpu_malloc", "steps", "log_every", "sample_every",
                "eval_every", "eval_samples", "teacher_eval_steps", "classifier", "checkpoint_every",
                "checkpoints_total_limit", "export", "preset", "max_nonfinite_steps", "nonfinite_check", "record_dir")
# keys that define what a checkpoint's state means: resuming with other values is refused (others: a warning)
RESUME_FIXED = ("method", "dataset", "classes", "prompts_sha256", "batch_size", "generator_timesteps", "fake_score",
                "lora_rank", "lora_targets", "generator_lora_rank", "generator_lora_targets", "gan_feature_source",
                "gan_hidden", "gan_layers", "students", "student_channels", "backtrack", "teacher_schedule")


class RunError(OnestepError):
    """A run folder that cannot be used as asked."""


class CheckpointError(RunError):
    """A checkpoint that is incomplete, corrupt, pickle-based or does not fit this run."""


RUN_OUTPUTS = ("checkpoints", "logs", "samples", "pipeline", "pipeline-ddim", "metrics.json", "fid_curve.png")


def prepare_run_dir(path: str, *, overwrite: bool, resume: bool, state=None, checkpoints: bool = True) -> None:
    """Create the run folder; refuse to reuse one that holds a run unless overwrite or resume is set. A run that
    overwrite replaces is cleared later (`clear_run_dir`), once the configuration and the teacher have passed their
    checks: bad input replaces nothing. With `state` (an Accelerator or PartialState) the main process prepares the
    folder and a refusal stops every process, so that none waits for one that stopped."""
    problem = None
    if state is None or state.is_main_process:
        try:
            if os.path.isfile(os.path.join(path, "config.yaml")) and not (overwrite or resume):
                raise RunError(f"run folder {path} already holds a run; pass --overwrite to replace it, --resume "
                               "latest to continue it, or --name NEW for a new folder")
            if not os.path.exists(path):
                _created.append(path)
            _make_run_dir(path, checkpoints)
        except RunError as e:
            if state is None:
                raise
            problem = str(e)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise RunError(problem)


_created: list[str] = []  # run folders this process created


def remove_unused_run_dirs() -> None:
    """After bad input stopped the run: remove the run folders this process created that hold no file."""
    for path in _created:
        if all(not files for _, _, files in os.walk(path)):
            shutil.rmtree(path, ignore_errors=True)
    _created.clear()


def refuse_existing(parser, out: str, marker: str, overwrite: bool) -> None:
    """The asset scripts: stop (one line, exit 2) before any work when `out` already holds what they write
    (`marker` exists) and --overwrite is not given; by default that is the shipped asset the presets' figures use."""
    if os.path.exists(marker) and not overwrite:
        assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
        shipped = " (a shipped asset)" if os.path.abspath(out).startswith(assets + os.sep) else ""
        parser.exit(2, f"error: --out {out} already holds {os.path.basename(marker)}{shipped}; pass --out NEW_FOLDER, "
                       "or --overwrite to replace it\n")


def clear_run_dir(path: str, checkpoints: bool = True) -> None:
    """--overwrite: remove the replaced run's outputs (checkpoints, logs, samples, exported pipelines, metrics)."""
    for sub in RUN_OUTPUTS:
        if os.path.isfile(os.path.join(path, sub)):
            os.remove(os.path.join(path, sub))
        shutil.rmtree(os.path.join(path, sub), ignore_errors=True)
    _make_run_dir(path, checkpoints)


def _make_run_dir(path: str, checkpoints: bool = True) -> None:
    try:
        os.makedirs(os.path.join(path, "checkpoints" if checkpoints else ""), exist_ok=True)
        os.makedirs(os.path.join(path, "samples"), exist_ok=True)
    except OSError as e:
        raise RunError(f"output_dir: cannot create the run folder {path} ({e.strerror}); pass a writable "
                       "--output_dir") from None


# ---- manifest ---------------------------------------------------------------------------------------
def run_config(cfg, schedule=None) -> dict:
    """The configuration a manifest records: every key, the method's options with their declared types, and the
    teacher's schedule (kind and prediction: the student's times mean nothing under another)."""
    from .config import method_kwargs

    out = {**dataclasses.asdict(cfg), "method_args": method_kwargs(cfg)}
    if schedule is not None:
        out["teacher_schedule"] = f"{schedule.kind}:{schedule.prediction_type}"
    if cfg.prompts and os.path.isfile(cfg.prompts):  # the conditions are the file's lines: an edited file is another run
        out["prompts_sha256"] = file_sha256(cfg.prompts)
    return out


# keys added after checkpoints of runs without them were written: left out at their default, so those still match
HASH_DEFAULTS = {"gradient_accumulation_steps": 1, "generator_lora_rank": 0, "generator_lora_targets": []}


def _hashed(config: dict) -> dict:
    """The keys that shape the trajectory, method options as top-level keys (as on the command line)."""
    out = {k: v for k, v in config.items()
           if k not in HASH_IGNORED and k != "method_args" and (k not in HASH_DEFAULTS or v != HASH_DEFAULTS[k])}
    return {**out, **config.get("method_args", {})}


def config_hash(config: dict) -> str:
    """sha256 of the configuration values that shape the trajectory (HASH_IGNORED left out)."""
    return hashlib.sha256(json.dumps(_hashed(config), sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _step_of(folder: str) -> int | None:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(folder)))
    return int(m.group(1)) if m else None


def checkpoints(run_dir: str) -> list[str]:
    """Checkpoint folders (step_N) with a manifest, not yet verified, oldest first."""
    found = [d for d in glob.glob(os.path.join(run_dir, "checkpoints", CHECKPOINT_PREFIX + "*"))
             if re.fullmatch(r"step_\d+", os.path.basename(d)) and os.path.isfile(os.path.join(d, MANIFEST))]
    return sorted(found, key=_step_of)


def verify_checkpoint(folder: str) -> dict:
    """The manifest of a complete, intact, pickle-free checkpoint; else CheckpointError saying what is wrong."""
    from accelerate.utils import load

    if not os.path.isdir(folder):
        raise CheckpointError(f"resume: {folder!r} is not a checkpoint folder; pass latest or a run's "
                              "checkpoints/step_N folder")
    names = sorted(os.listdir(folder))
    pickled = [n for n in names if n.endswith(_PICKLE_EXTENSIONS) and not _STATE_FILE.match(n)]
    if pickled:
        raise CheckpointError(f"checkpoint {folder} holds pickle-based weights ({pickled[0]}); onestep loads weights "
                              "only from safetensors: re-save them with safe_serialization=True")
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        files, step = manifest["files"], int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MANIFEST})") from None
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {folder} is corrupt (unreadable {MANIFEST})") from None
    extra = [n for n in names if n != MANIFEST and n not in files]
    if extra:
        raise CheckpointError(f"checkpoint {folder} holds {extra[0]}, which its manifest does not list")
    for name, want in files.items():
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {folder} is corrupt ({name} is missing)")
        if os.path.getsize(path) != want["bytes"] or file_sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt ({name} does not match its sha256)")
    for name in names:  # accelerate unpickles custom states without weights_only: check them as plain tensors first
        if name.startswith("custom_checkpoint_"):
            try:
                load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"checkpoint {folder}: {name} is not plain tensors and numbers "
                                      f"({type(e).__name__}); refusing to unpickle it") from None
    return {**manifest, "step": step}


def checkpoint_history(folder: str | None, run_dir: str) -> dict:
    """The FID curve and training seconds up to a checkpoint ({} for none): from its manifest, with the points of the
    run's metrics.json up to its step (the last evaluation of a finished run comes after its final checkpoint)."""
    if not folder:
        return {}
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    history = manifest.get("history") if isinstance(manifest.get("history"), dict) else {}
    curve = list(history.get("curve", []))
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            old = json.load(f).get("curve") or []
    except (OSError, ValueError, AttributeError):
        old = []
    have = {p["step"] for p in curve}
    curve += [p for p in old if isinstance(p, dict) and isinstance(p.get("step"), int) and p["step"] not in have
              and p["step"] <= manifest["step"] and isinstance(p.get("seconds"), (int, float))]
    return {**history, "curve": sorted(curve, key=lambda p: p["step"])}


def check_same_kind(run_dir: str, cfg) -> None:
    """--resume into a folder whose run is of another kind (other students, a shared fake score or not, other student
    sizes) would start over there and mix two runs' files: refused."""
    path = os.path.join(run_dir, "config.yaml")
    if not cfg.resume or not os.path.isfile(path):
        return
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return  # not ours to judge: the checkpoint checks still run
    for key in ("students", "shared_fake_score", "student_channels") if isinstance(saved, dict) else ():
        if key in saved and saved[key] != getattr(cfg, key):
            raise RunError(f"resume: {run_dir} holds a run with {key} {saved[key]!r}, this command has "
                           f"{getattr(cfg, key)!r}; resume with the same value, or pass --name NEW for a new run")


def resolve_resume(run_dir: str, resume: str) -> str | None:
    """'latest' -> the newest checkpoint that verifies (None if none; each newer one skipped, incomplete or corrupt,
    gets a warning line on stderr); else the given folder, which must verify."""
    if not resume:
        return None
    if resume != "latest":
        if os.path.isdir(resume) and not any(n == MANIFEST or _STATE_FILE.match(n) for n in os.listdir(resume)):
            raise CheckpointError(f"resume: {resume} is not a onestep checkpoint (no {MANIFEST}); pass --resume latest "
                                  "or a run's checkpoints/step_N folder")
        try:
            verify_checkpoint(resume)
        except CheckpointError as e:
            raise CheckpointError(f"{e}; --resume latest takes the run's newest intact checkpoint") from None
        mine = os.path.join(os.path.realpath(run_dir), "checkpoints")
        if os.path.dirname(os.path.realpath(resume)) == mine:  # this run's own earlier checkpoint: a branch
            later = [os.path.basename(d) for d in checkpoints(run_dir) if _step_of(d) > (_step_of(resume) or 0)]
            if later:
                _warn(f"resume: {mine} also holds {', '.join(later)}, after {os.path.basename(resume)}; this run "
                      "replaces them as it reaches their steps, and until then --resume latest would take them: "
                      "remove them to continue from this checkpoint alone")
        return resume
    found = [d for d in glob.glob(os.path.join(run_dir, "checkpoints", CHECKPOINT_PREFIX + "*"))
             if _step_of(d) is not None and os.path.isdir(d)]
    rank = {".tmp": 0, ".old": 1}  # at one step: the renamed folder, then one being replaced, then an unfinished write
    for folder in sorted(found, key=lambda d: (_step_of(d), rank.get(d[-4:], 2)), reverse=True):
        if folder.endswith(".tmp"):
            _warn(f"resume: skipping {os.path.basename(folder)}: an interrupted checkpoint write")
            continue
        if folder.endswith(".del"):  # pruned by the run's checkpoints_total_limit; its deletion was interrupted
            continue
        try:
            verify_checkpoint(folder)
            return folder
        except CheckpointError as e:
            _warn(f"resume: skipping {os.path.basename(folder)}: {e}")
    return None


def _warn(message: str) -> None:
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"warning: {message}", file=sys.stderr)


# ---- save and load ----------------------------------------------------------------------------------
def save_checkpoint(accelerator, run_dir: str, step: int, keep: int, config: dict, data=None, history=None) -> str:
    """accelerate save_state (+ the data position) into step_N.tmp with a manifest written last, then renamed into
    place; then keep the newest `keep` checkpoints up to this step (0: all). `history` (the FID curve and training
    seconds so far) goes into the manifest, so that a resumed run's metrics cover the whole run."""
    final = os.path.join(run_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{step:07d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        _tidy(run_dir)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()  # every process's files (its RNG state) are written before the manifest lists them
    if accelerator.is_main_process:
        if data is not None and data.state_dict():
            from safetensors.torch import save_file

            save_file(data.state_dict(), os.path.join(tmp, DATA_STATE))
        files = {n: {"bytes": os.path.getsize(os.path.join(tmp, n)), "sha256": file_sha256(os.path.join(tmp, n))}
                 for n in sorted(os.listdir(tmp))}
        for n in files:  # on disk, not only in the page cache, before the manifest vouches for them (a power loss)
            _fsync(os.path.join(tmp, n))
        manifest = {"format": MANIFEST_FORMAT, "step": step, "processes": accelerator.num_processes,
                    "config_hash": config_hash(config), "config": config, "files": files, "history": history or {}}
        with open(os.path.join(tmp, MANIFEST + ".part"), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(tmp, MANIFEST + ".part"), os.path.join(tmp, MANIFEST))
        if os.path.isdir(final):  # same step again (a resumed run): the old one stays until the new one is in place
            shutil.rmtree(final + ".old", ignore_errors=True)
            os.replace(final, final + ".old")
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(os.path.dirname(final))  # the rename itself is durable before anything older goes
        shutil.rmtree(final + ".old", ignore_errors=True)
        verify_checkpoint(final)  # what is on disk matches the manifest before anything older goes
        older = [d for d in checkpoints(run_dir) if _step_of(d) < step]  # later ones belong to an abandoned run
        for old in older[:max(0, len(older) - keep + 1)] if keep else []:
            os.replace(old, old + ".del")  # atomic: a deletion killed half-way leaves no manifest-less step_N
            shutil.rmtree(old + ".del", ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') writes to disk, where the system lets a folder be opened so."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tidy(run_dir: str) -> None:
    """Finish what a crash interrupted: drop unfinished writes (step_N.tmp) and deletions (step_N.del); a replaced
    checkpoint (step_N.old) goes if its replacement is in place, else it is put back."""
    for d in glob.glob(os.path.join(run_dir, "checkpoints", CHECKPOINT_PREFIX + "*")):
        if d.endswith((".tmp", ".del")):
            shutil.rmtree(d, ignore_errors=True)
        elif d.endswith(".old") and os.path.isdir(d[:-4]):
            shutil.rmtree(d, ignore_errors=True)
        elif d.endswith(".old"):
            os.replace(d, d[:-4])


def adapter_only_checkpoints(accelerator, modules, key: str = "lora_") -> bool:
    """LoRA adapters on the frozen teacher (a LoRA fake score, a LoRA generator): their networks' checkpoint files
    keep the adapters only (not the teacher's weights under them, which every run loads from the teacher: for SD1.5
    about 1.7 GB less per checkpoint and network). On load, each network's file must hold exactly the keys that
    network saves (an adapter network: at least its adapters, so that older full checkpoints still load);
    `load_checkpoint(..., strict=False)` then loads around the absent teacher weights. Returns whether it applies
    (not under FSDP, which saves its own sharded state)."""
    if accelerator.distributed_type.value == "FSDP":
        return False
    adapted = {id(m) for m in modules}

    def adapters(model) -> bool:
        return id(accelerator.unwrap_model(model)) in adapted

    def saved_keys(model) -> set:
        keys = set(model.state_dict())
        return {k for k in keys if key in k} if adapters(model) else keys

    def on_save(models, weights, output_dir):
        for i, model in enumerate(models):
            if adapters(model):
                weights[i] = {k: v for k, v in weights[i].items() if key in k}

    def on_load(models, input_dir):
        from safetensors import safe_open

        for i, model in enumerate(models):
            path = os.path.join(input_dir, "model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not os.path.isfile(path):
                continue  # accelerate reports it
            with safe_open(path, "pt") as f:
                have, want = set(f.keys()), saved_keys(model)
            if not want <= have or (not adapters(model) and have != want):
                missing = sorted(want - have) or sorted(have - want)
                raise ValueError(f"{os.path.basename(path)} lacks or adds {len(missing)} tensors, e.g. {missing[0]}")

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)
    return True


def load_checkpoint(accelerator, folder: str, config: dict, data=None, strict: bool = True, turns=(), ema=None) -> int:
    """Restore a verified checkpoint into this run (models, EMA, optimisers, schedulers, RNG states, registered
    objects, the data position); return its step. Refuses a checkpoint of another run shape, warns on other changes.
    turns: (optimiser, its LR schedule, configured learning rate); these and `ema` take this run's learning rates,
    Adam betas, weight decay and EMA decay, which accelerate's load would have put back to the checkpoint's."""
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    if int(manifest["step"]) > int(config.get("steps", manifest["step"])):
        raise CheckpointError(f"steps: {config['steps']} is below the {manifest['step']} iterations checkpoint "
                              f"{os.path.basename(folder)} holds; pass --steps {manifest['step']} or more")
    saved, now = _hashed(manifest.get("config", {})), _hashed(config)
    differs = manifest.get("config_hash") != config_hash(config)
    changed = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)] if differs else []
    fixed = [k for k in changed if k in RESUME_FIXED and k in saved]  # (a key a checkpoint predates: a warning)
    show = ", ".join(f"{k} ({saved.get(k)!r} there, {now.get(k)!r} now)" for k in (fixed or changed)) or "values"
    if fixed:
        raise CheckpointError(f"resume: checkpoint {folder} was written with other {show}; these define what it "
                              "holds: resume with its values or start a new run (--name NEW)")
    try:
        accelerator.load_state(folder, load_kwargs={"weights_only": True}, **({} if strict else {"strict": False}))
    except Exception as e:  # another architecture, another set of networks or optimisers
        first = (str(e).strip().splitlines() or [""])[0][:200]
        teacher = saved.get("teacher")
        raise CheckpointError(f"resume: checkpoint {folder} does not fit this run's networks ({type(e).__name__}: "
                              f"{first}); resume with the teacher and network options it was written with"
                              f"{f' (teacher {teacher!r})' if teacher else ''}, or start a new run (--name NEW)") from None
    if data is not None and os.path.isfile(os.path.join(folder, DATA_STATE)):
        from safetensors.torch import load_file

        data.load_state_dict(load_file(os.path.join(folder, DATA_STATE)))
    if differs:
        _warn(f"resume: the configuration differs from checkpoint {os.path.basename(folder)}'s in {show}; "
              "continuing with the new values")
    before = manifest.get("config", {}).get("steps")
    if before is not None and before != config.get("steps") and \
            config.get("lr_scheduler", "constant") not in ("constant", "constant_with_warmup"):
        _warn(f"resume: --steps {config.get('steps')} (the checkpoint's run had {before}): the "
              f"{config['lr_scheduler']} learning-rate schedule is laid over the new length, so from iteration "
              f"{manifest['step']} the rate follows that curve, not the old one")
    step, saved_by = int(manifest["step"]), manifest.get("processes", accelerator.num_processes)
    reapply_hyperparameters(turns, config, saved_by, accelerator.num_processes, ema)
    if saved_by != accelerator.num_processes:  # per-process RNG states do not map onto this run's processes
        from accelerate.utils import set_seed

        set_seed(int(config.get("seed", 0)) + step, device_specific=True)
        _warn(f"resume: checkpoint {os.path.basename(folder)} was written by {saved_by} process{'es' * (saved_by != 1)}, this run has "
              f"{accelerator.num_processes}: the noise streams restart from seed + {step}, so the trajectory differs")
    return step


def reapply_hyperparameters(turns, config: dict, saved_by: int, processes: int, ema=None) -> None:
    """After a load: the configured optimiser settings and EMA decay, and each LR schedule (stepped once per process
    and iteration) moved to the same iteration when the checkpoint was written by another number of processes."""
    for opt, sched, lr in turns:
        if opt is None:
            continue
        s = getattr(sched, "scheduler", sched)
        if saved_by != processes:
            s.last_epoch = s.last_epoch * processes // saved_by
            s._step_count = s.last_epoch + 1
        s.base_lrs = [lr] * len(opt.param_groups)
        factors = [f(s.last_epoch) for f in s.lr_lambdas] if hasattr(s, "lr_lambdas") else [1.0] * len(s.base_lrs)
        for g, f in zip(opt.param_groups, factors):
            g.update(initial_lr=lr, lr=lr * f, betas=(config["adam_beta1"], config["adam_beta2"]),
                     weight_decay=config["weight_decay"])
        s._last_lr = [g["lr"] for g in opt.param_groups]
    if ema is not None and config.get("ema_decay"):
        ema.decay = config["ema_decay"]


class RealBatches:
    """Endless batches of a (prepared) DataLoader with a checkpointable position: the epoch's number, the RNG
    states it drew its order from, and the number of its batches taken. Taking batches draws nothing extra, so a
    fresh run sees the loader's own order; a resumed one replays the epoch's order and continues where it was.
    A dataset with `set_epoch` (onestep.data.RealImages) is told each epoch's number."""

    def __init__(self, loader):
        batches = loader.batch_sampler  # DDP: accelerate's BatchSamplerShard around the loader's BatchSampler
        while batches is not None and not hasattr(batches, "sampler"):
            batches = getattr(batches, "batch_sampler", None)
        self.loader = loader
        self.sampler_generator = getattr(getattr(batches, "sampler", None), "generator", None)  # DDP: synchronised
        self.epoch_rng = self.epoch_generator = None
        self.epoch, self.offset, self._restored = -1, 0, False
        self._batches = self._iterate()

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        resolve = getattr(self.loader.dataset, "resolve", None)  # RealImages: conditions encoded now (not in a replay)
        return resolve(batch) if resolve is not None else batch

    def _iterate(self):
        it = self._replay() if self._restored else None
        while True:
            if it is None:
                self.epoch += 1
                self._set_epoch()
                self.epoch_rng = torch.get_rng_state()
                self.epoch_generator = None if self.sampler_generator is None else self.sampler_generator.get_state()
                self.offset, it = 0, iter(self.loader)
            for batch in it:
                self.offset += 1
                yield batch
            it = None

    def _replay(self):
        """The saved epoch's iterator, advanced past the batches already taken (the live RNG state is kept)."""
        self._set_epoch()
        live = torch.get_rng_state()
        torch.set_rng_state(self.epoch_rng)
        if self.epoch_generator is not None and self.sampler_generator is not None:
            self.sampler_generator.set_state(self.epoch_generator)
        it = iter(self.loader)
        for _ in range(self.offset):
            next(it, None)
        torch.set_rng_state(live)
        return it

    def _set_epoch(self) -> None:
        if hasattr(self.loader, "set_epoch"):  # accelerate's prepared loader tells the dataset its own count when
            self.loader.set_epoch(self.epoch)  # iterated, which a resumed process would restart at 0
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        if self.epoch_rng is None:
            return {}
        out = {"epoch_rng": self.epoch_rng, "offset": torch.tensor(self.offset), "epoch": torch.tensor(self.epoch)}
        if self.epoch_generator is not None:
            out["epoch_generator"] = self.epoch_generator
        return out

    def load_state_dict(self, state: dict) -> None:
        """Set the position before the first batch is taken."""
        if "epoch_rng" in state and int(state["offset"]) > 0:
            self.epoch_rng, self.epoch_generator = state["epoch_rng"], state.get("epoch_generator")
            self.offset, self._restored = int(state["offset"]), True
            self.epoch = int(state.get("epoch", 0))  # checkpoints from before the epoch was saved: epoch 0


def flatten_state(tree: dict, prefix: str = "") -> dict:
    """A nested dict of tensors and plain values as one flat dict {'a/b': value} (None dropped): a method's
    checkpoint state in the form accelerate saves and weights_only loading reads back."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_state(value, f"{prefix}{key}/"))
        elif value is not None:
            out[f"{prefix}{key}"] = value
    return out


def unflatten_state(flat: dict) -> dict:
    """The nested dict of `flatten_state` (without its None values)."""
    tree: dict = {}
    for key, value in flat.items():
        *path, last = key.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 4) -> None:
    """Save images in [-1, 1] as a PNG grid, upscaled by `scale` (nearest) so small samples are visible."""
    from torchvision.utils import save_image

    x = (images.float().clamp(-1, 1) + 1) / 2
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(x, path, nrow=nrow, padding=2, pad_value=1.0)


def plot_curve(points: list[dict], path: str) -> None:
    """fid_curve.png: FID against iteration and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "step", "iteration"), (axes[1], "seconds", "wall-clock seconds")):
        ax.plot([p[key] for p in points], [p["fid"] for p in points], marker="o")
        ax.set_xlabel(label)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
