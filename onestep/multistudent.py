"""Multi-student distillation (MSD, Song et al. 2024): K one-step students, each owning a disjoint part of the
condition space; a router sends every condition to exactly one student, so a sample still costs one forward.

Routers: class labels split into balanced groups, either in label order ("balanced") or grouping the classes the
teacher's samples are confused between, as the digits classifier sees them ("confusion"); prompts by k-means over
their embeddings (mean over tokens, unit length), routed to the nearest centroid at inference ("kmeans").
Smaller students (another `block_out_channels` of the teacher's architecture) first learn the teacher's denoiser by
Teacher Score Matching, then distribution matching. `train_students` runs the K students one after another through
the single-student loop, each on its own conditions with its own fake score, in <run>/student_k/, or (a shared fake
score) all K at once as one routed generator (`RoutedDenoiser`) in <run>/students/, then evaluates and exports them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import OnestepError
from .prompts import by_rows

ROUTER_FILE, CENTROID_FILE = "router.json", "router.safetensors"
CONFUSION_PER_CLASS, CONFUSION_STEPS = 100, 10  # teacher samples per class (DDIM steps) that measure class confusion


class RoutingError(OnestepError):
    """A condition no student serves, or a router that cannot be built for this teacher."""


@dataclass
class Router:
    """Condition -> student: class labels by lookup (groups[k]: student k's labels); prompt embeddings by the nearest
    of K centroids (groups[k]: the rows of the training prompts student k owns)."""

    kind: str                                 # "balanced" | "confusion" (class labels) or "kmeans" (prompts)
    groups: list[list[int]]
    centroids: torch.Tensor | None = None     # kmeans: (K, D) in the space of embedding_features

    @property
    def num_students(self) -> int:
        return len(self.groups)

    def route(self, cond) -> torch.Tensor:
        """(B,) student index of each condition: class labels (B,) or prompt embeddings (B, L, D)."""
        if self.centroids is not None:
            f = embedding_features(cond)
            return torch.cdist(f, self.centroids.to(f)).argmin(1)
        labels = torch.as_tensor(cond).long().reshape(-1).cpu()
        table = {c: k for k, g in enumerate(self.groups) for c in g}
        missing = [int(c) for c in labels if int(c) not in table]
        if missing:
            raise RoutingError(f"class label {missing[0]} is served by no student (the students hold "
                               f"{sorted(table)})")
        return torch.tensor([table[int(c)] for c in labels], dtype=torch.long)

    def save(self, folder: str) -> None:
        """router.json (+ router.safetensors with the centroids)."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ROUTER_FILE), "w") as f:
            json.dump({"kind": self.kind, "groups": self.groups}, f, indent=1)
        if self.centroids is not None:
            save_file({"centroids": self.centroids.float().cpu().contiguous()}, os.path.join(folder, CENTROID_FILE))

    @classmethod
    def load(cls, folder: str) -> "Router":
        from safetensors.torch import load_file

        with open(os.path.join(folder, ROUTER_FILE)) as f:
            d = json.load(f)
        path = os.path.join(folder, CENTROID_FILE)
        return cls(d["kind"], [list(map(int, g)) for g in d["groups"]],
                   load_file(path)["centroids"] if os.path.isfile(path) else None)


def routed_sample(samplers: Sequence[Callable], router: Router, z: torch.Tensor, cond) -> torch.Tensor:
    """Each sample through its own student (`samplers[k](z, cond)`); the outputs in input order."""
    return _dispatch(router.route(cond).to(z.device), len(samplers),
                     lambda k, m: samplers[k](z[m], cond[m.to(cond.device)]))[0]


def _dispatch(idx: torch.Tensor, k: int, call: Callable) -> tuple[torch.Tensor, list[int]]:
    """`call(j, m)` for each student j on the batch rows m routed to it; the outputs in input order, and the students
    that got no row."""
    parts, order, idle = [], [], []
    for j in range(k):
        m = (idx == j).nonzero().squeeze(1)
        if len(m):
            parts.append(call(j, m))
            order.append(m)
        else:
            idle.append(j)
    return torch.cat(parts)[torch.argsort(torch.cat(order))], idle


class RoutedDenoiser(torch.nn.Module):
    """K student denoisers behind a router, as one denoiser D(x_t, t, cond): each sample through the student its
    condition routes to, the outputs in input order. A student that serves no sample of the batch gets a zero
    gradient (its true gradient; not None), so every parameter takes part in each backward, as DDP expects.
    MSD with a shared fake score trains the K students so, jointly, as one generator (`--shared_fake_score`)."""

    def __init__(self, students: Sequence[torch.nn.Module], router: Router):
        super().__init__()
        if len(students) != router.num_students:
            raise ValueError(f"{len(students)} students for a router of {router.num_students}")
        self.students, self.router = torch.nn.ModuleList(students), router

    @property
    def schedule(self):
        return self.students[0].schedule

    @property
    def backbones(self) -> list:
        return [b for d in self.students for b in d.backbones]

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        per_sample = torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == len(x_t) > 1
        out, idle = _dispatch(self.router.route(cond).to(x_t.device), len(self.students), lambda k, m: self.students[k](
            x_t[m], t[m] if per_sample else t, cond[m.to(cond.device)]))
        touch = [p.reshape(-1)[0] for k in idle for p in self.students[k].parameters() if p.requires_grad]
        return out + 0.0 * sum(touch) if touch and torch.is_grad_enabled() else out


# ---- partitions ------------------------------------------------------------------------------------
def balanced_groups(items: Sequence[int], k: int) -> list[list[int]]:
    """Items in order, split into k groups whose sizes differ by at most one."""
    return [list(map(int, g)) for g in np.array_split(np.asarray(list(items)), k)]


def affinity_groups(affinity: torch.Tensor, sizes: Sequence[int]) -> list[list[int]]:
    """Indices 0..n-1 in groups of the given sizes, maximising the summed affinity within groups: greedy (seed with
    the most affine remaining pair, add the index most affine to the group), then pairwise swaps while they gain."""
    a = affinity.double().clone().fill_diagonal_(0)
    left, groups = list(range(len(a))), []
    for size in sizes:
        pairs = [(a[i, j].item(), -i, -j) for i, j in itertools.combinations(left, 2)]
        g = [left[0]] if size == 1 or not pairs else [-max(pairs)[1], -max(pairs)[2]]
        while len(g) < size:
            g.append(max((x for x in left if x not in g), key=lambda x: (a[g, x].sum().item(), -x)))
        left = [x for x in left if x not in g]
        groups.append(g)
    def first_gain():  # a swap of i (in ga) and j (in gb) that raises the within-group total
        for ga, gb in itertools.combinations(groups, 2):
            for i, j in itertools.product(ga, gb):
                ra, rb = [x for x in ga if x != i], [x for x in gb if x != j]
                if (a[j, ra].sum() + a[i, rb].sum() - a[i, ra].sum() - a[j, rb].sum()).item() > 1e-12:
                    return ga, gb, i, j
        return None

    while (swap := first_gain()) is not None:
        ga, gb, i, j = swap
        ga[ga.index(i)], gb[gb.index(j)] = j, i
    return [sorted(g) for g in groups]


@torch.no_grad()
def class_affinity(teacher, classifier, classes: Sequence[int], shape, *, per_class: int = CONFUSION_PER_CLASS,
                   steps: int = CONFUSION_STEPS, seed: int = 0, device="cpu") -> torch.Tensor:
    """The teacher's soft class confusion as the classifier sees it: P[i, j] = mean probability of class j on the
    teacher's samples of class i (DDIM, `steps`), restricted to `classes` and made symmetric; (C, C)."""
    from .sampling import sample_teacher

    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(list(classes)).repeat_interleave(per_class)
    z = torch.randn(len(labels), *shape, generator=g)
    probs = []
    for zb, yb in zip(z.split(250), labels.split(250)):
        x = sample_teacher(teacher, zb.to(device), yb.to(device), steps).clamp(-1, 1)
        probs.append(classifier(x).softmax(-1)[:, list(classes)].double().cpu())
    p = torch.cat(probs).reshape(len(classes), per_class, len(classes)).mean(1)
    return (p + p.T) / 2


def embedding_features(cond: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings (B, L, D) -> (B, D): the mean over tokens, scaled to unit length (k-means' space)."""
    f = cond.float().reshape(len(cond), -1, cond.shape[-1]).mean(1)
    return torch.nn.functional.normalize(f, dim=1)


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (seeded); an emptied cluster restarts at the point farthest from its
    centroid. Returns the (k, D) centroids."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    c = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(1, k):
        d = torch.cdist(x, c).min(1).values ** 2
        pick = torch.multinomial(d / d.sum(), 1, generator=g) if d.sum() > 0 else torch.tensor([0])
        c = torch.cat([c, x[pick]])
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = c.clone()
        for j in range(k):
            members = x[assign == j]
            new[j] = members.mean(0) if len(members) else x[torch.cdist(x, c[j:j + 1])[:, 0].argmax()]
        if torch.equal(new, c):
            break
        c = new
    return c.float()


def build_router(kind: str, num_students: int, *, classes: Sequence[int] = (), prompt_embeds=None,
                 affinity: Callable[[], torch.Tensor] | None = None, seed: int = 0) -> Router:
    """The router of `kind` ("auto": balanced for class labels, kmeans for prompts) over the classes or prompts."""
    text = prompt_embeds is not None
    kind = ("kmeans" if text else "balanced") if kind == "auto" else kind
    if text != (kind == "kmeans"):
        allowed = "kmeans (or auto)" if text else "balanced, confusion (or auto)"
        raise RoutingError(f"router: {kind!r} does not route {'prompts' if text else 'class labels'}; use {allowed}")
    n = len(prompt_embeds) if text else len(classes)
    if n < num_students:
        raise RoutingError(f"students: {num_students} students need at least {num_students} "
                           f"{'prompts' if text else 'classes'} to split, got {n}")
    if kind == "kmeans":
        feats = by_rows(prompt_embeds, embedding_features)
        centroids = kmeans(feats, num_students, seed=seed)
        assign = torch.cdist(feats, centroids).argmin(1)
        groups = [torch.nonzero(assign == j).flatten().tolist() for j in range(num_students)]
        if not all(groups):
            raise RoutingError(f"students: the prompts have fewer than {num_students} distinct embeddings; "
                               "use fewer students or more prompts")
        return Router(kind, groups, centroids)
    if kind == "balanced":
        return Router(kind, balanced_groups(classes, num_students))
    sizes = [len(g) for g in balanced_groups(classes, num_students)]
    return Router(kind, [[int(classes[i]) for i in g] for g in affinity_groups(affinity(), sizes)])


# ---- smaller students: Teacher Score Matching --------------------------------------------------------------
def check_channels(teacher_backbone, channels: Sequence[int]) -> None:
    """Smaller students' block_out_channels: as many levels as the teacher's, multiples of its norm_num_groups."""
    cfg = dict(teacher_backbone.config)
    if len(channels) != len(cfg["block_out_channels"]):
        raise RoutingError(f"student_channels: {list(channels)} has {len(channels)} levels; the teacher's "
                           f"block_out_channels {list(cfg['block_out_channels'])} has {len(cfg['block_out_channels'])}")
    groups = cfg.get("norm_num_groups") or 32
    if any(c % groups for c in channels):
        raise RoutingError(f"student_channels: {list(channels)} must be multiples of the teacher's norm_num_groups "
                           f"({groups})")


def small_backbone(teacher_backbone, channels: Sequence[int], seed: int = 0):
    """The teacher's architecture with other `block_out_channels`, freshly initialised (seeded), float32."""
    check_channels(teacher_backbone, channels)
    cfg = dict(teacher_backbone.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = type(teacher_backbone).from_config({**cfg, "block_out_channels": list(channels)})
    return net.float().to(teacher_backbone.device)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def teacher_score_matching(student, teacher, cond_rows: torch.Tensor | None, shape, *, steps: int, lr: float,
                           batch_size: int, pool: int, sampler_steps: int = 25, seed: int = 0, device="cpu") -> dict:
    """TSM: regress the student denoiser's x0 onto the teacher's x0 at the same noisy input, t ~ U over the whole
    range, weighted as the teacher's native loss (eps-MSE for VP). Clean inputs: a pool of the teacher's own samples
    (DDIM, `sampler_steps`) on `cond_rows` (drawn uniformly). Trains `student` (a Denoiser) in place."""
    from .methods.dmd import NATIVE_LOSS_SPACE, weighted_dsm
    from .sampling import sample_teacher

    g = torch.Generator().manual_seed(seed)
    rows = None if cond_rows is None else cond_rows[torch.randint(len(cond_rows), (pool,), generator=g)]
    z = torch.randn(pool, *shape, generator=g)
    x0 = torch.cat([sample_teacher(teacher, z[i:i + 256].to(device), None if rows is None else rows[i:i + 256].to(device),
                                   sampler_steps) for i in range(0, pool, 256)])
    sched, space = teacher.schedule, NATIVE_LOSS_SPACE[teacher.schedule.kind]
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    student.train()
    losses = []
    for _ in range(steps):
        j = torch.randint(pool, (batch_size,), generator=g)
        c = None if rows is None else rows[j].to(device)
        t = sched.sample_t(batch_size, 0.0, 1.0, device=device, generator=g)
        x_t = sched.add_noise(x0[j.to(device)], torch.randn(batch_size, *shape, generator=g).to(device), t)
        with torch.no_grad():
            target = teacher(x_t, t, c)
        loss = weighted_dsm(sched, t, student(x_t, t, c), target, space).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        losses.append(loss.item())
    tenth = max(1, steps // 10)
    return {"steps": steps, "lr": lr, "pool": pool, "loss_first": float(np.mean(losses[:tenth])) if losses else None,
            "loss_last": float(np.mean(losses[-tenth:])) if losses else None}


def shared_config(cfg, run_dir: str):
    """The joint run of all K students behind the router (one fake score), in <run>/students/."""
    return dataclasses.replace(cfg, name="students", output_dir=run_dir, students=1, student_channels=[],
                               shared_fake_score=False, classifier="", export=False, eval_every=0, teacher_eval_steps=[])


def student_config(cfg, router: Router, k: int, run_dir: str):
    """The single-student run of student k: its own conditions, in <run>/student_k/, no FID or export of its own."""
    restrict = {"prompts": os.path.join(run_dir, f"student_{k}", "prompts.txt")} if router.kind == "kmeans" else \
        {"classes": router.groups[k]}
    return dataclasses.replace(cfg, name=f"student_{k}", output_dir=run_dir, students=1, student_channels=[],
                               classifier="", export=False, eval_every=0, teacher_eval_steps=[], **restrict)


def sub_run_seconds(run_dir: str, name: str, this_call: float) -> float:
    """A sub-run's training seconds over all its calls (its metrics.json counts those before a resume too); this
    call's seconds where it wrote none (not the main process)."""
    try:
        with open(os.path.join(run_dir, name, "metrics.json"), encoding="utf-8") as f:
            return round(float(json.load(f)["train_seconds"]), 1)
    except (OSError, ValueError, KeyError, TypeError):
        return round(this_call, 1)


def own_real_images(data, router: Router, k: int):
    """The real images (with per-image conditions) whose condition routes to student k: each student's critic sees
    real pairs of its own conditions only, as its samples are."""
    from .data import RealImages

    keep = by_rows(data.conds, lambda c: router.route(c).cpu()) == k
    return RealImages(data.samples[keep], conds=data.conds.subset(keep) if hasattr(data.conds, "subset")
                      else data.conds[keep])


# ---- the multi-student run ---------------------------------------------------------------------------
def train_students(cfg, train: Callable) -> dict | None:
    """MSD in one command: route the conditions, train student k with `train(cfg_k, backbone)` (the single-student
    loop, after TSM for smaller students) in <run>/student_k/, then evaluate, export and report them together.
    Returns the metrics on the main process (None elsewhere)."""
    import glob
    import shutil
    import time

    import yaml
    from accelerate import PartialState
    from accelerate.utils import DistributedType, parse_flag_from_env

    from . import hostmem
    from .config import ConfigError, print_notes, saved_config
    from .data import read_image_folder
    from .denoiser import Denoiser
    from .distributed import check_joined
    from .fid import DigitsClassifier, check_digit_classes
    from .generator import Generator
    from .loading import is_text_teacher, load_teacher
    from .pipeline_multi import export_multi_pipeline, model_card_multi
    from .prompts import read_prompts
    from .runs import check_same_kind, clear_run_dir, prepare_run_dir, resolve_resume

    if cfg.resume not in ("", "latest"):
        raise ConfigError(f"resume: a multi-student run resumes with 'latest' (each student from its newest "
                          f"checkpoint), got {cfg.resume!r}")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads the launcher
    check_joined(state)
    device, main = state.device, state.is_main_process
    if cfg.shared_fake_score and (state.distributed_type == DistributedType.FSDP
                                  or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"):
        raise ConfigError("shared_fake_score: the routed students are not sharded; launch with DDP "
                          "(train/accelerate/ddp.yaml) or drop --shared_fake_score for one fake score per student")
    hostmem.configure_cpu(cfg, device.type, state.num_processes)
    run_dir = os.path.join(cfg.output_dir, cfg.name or f"{cfg.preset}-{cfg.method}-k{cfg.students}")
    check_same_kind(run_dir, cfg)
    prepare_run_dir(run_dir, overwrite=cfg.overwrite, resume=bool(cfg.resume), state=state, checkpoints=False)
    state.wait_for_everyone()
    t_start = time.time()

    # 1. Teacher, conditions, router
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None
    folder = read_image_folder(cfg.dataset, is_text_teacher(cfg.teacher)) if cfg.dataset not in ("digits", "none") else None
    teacher = load_teacher(cfg.teacher, device=device, prompts=prompts, captions=folder and folder.captions)
    shape, text = teacher.sample_shape, teacher.text_conditional
    if not text and not teacher.num_classes:
        raise ConfigError("students: an unconditional teacher has no conditions to route; use --students 1")
    classes = [] if text else (cfg.classes or list(range(teacher.num_classes)))
    bad = [c for c in classes if not 0 <= c < teacher.num_classes]
    if bad:
        raise ConfigError(f"classes: label {bad[0]} is out of range 0..{teacher.num_classes - 1} for this teacher")
    classifier = None
    if cfg.classifier and shape == (1, 8, 8):
        classifier = DigitsClassifier.load(cfg.classifier).to(device)
        check_digit_classes(classes)  # before any student trains

    def affinity() -> torch.Tensor:
        if classifier is None or classifier.config.num_classes != teacher.num_classes:
            raise RoutingError("router: 'confusion' measures the teacher's class confusion with the digits classifier "
                               "(--classifier) on a teacher of the same classes; use --router balanced")
        return class_affinity(teacher.denoiser, classifier, classes, shape, seed=cfg.seed, device=device)

    router = build_router(cfg.router, cfg.students, classes=classes, prompt_embeds=teacher.prompt_embeds if text else None,
                          affinity=affinity, seed=cfg.seed)
    if cfg.student_channels:
        check_channels(teacher.backbone, cfg.student_channels)
    if main and cfg.overwrite:  # the checks above passed (--resume with it is refused): now the replaced run goes
        clear_run_dir(run_dir, checkpoints=False)
        for old in glob.glob(os.path.join(run_dir, "student_*")) + glob.glob(os.path.join(run_dir, "students")):
            shutil.rmtree(old)
    if main:
        router.save(run_dir)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(saved_config(cfg), f, sort_keys=False)
        print_notes(cfg)
        for k, g in enumerate(router.groups if text and not cfg.shared_fake_score else []):  # each text student's own prompts
            os.makedirs(os.path.join(run_dir, f"student_{k}"), exist_ok=True)
            with open(os.path.join(run_dir, f"student_{k}", "prompts.txt"), "w", encoding="utf-8") as f:
                f.write("".join(teacher.prompts[i] + "\n" for i in g))
    state.wait_for_everyone()
    router = router if main else Router.load(run_dir)  # every process: the main process's router

    # 2. The students: TSM for smaller ones, then the single-student loop on their conditions, one student after
    #    another, or (--shared_fake_score) all K at once behind the router with one fake score, in <run>/students/
    shared = {"train_seconds": 0.0} if cfg.shared_fake_score else None
    sub_name = lambda k: "students" if shared else f"student_{k}"  # noqa: E731

    def park() -> None:  # a student trains with its own teacher: this one's text encoders (if kept) wait on the CPU
        if text:
            teacher.prompt_embeds.encoders_to("cpu")

    def tsm(rows, seed: int, name: str):  # a fresh smaller backbone, TSM-trained on rows (unless resuming)
        backbone = small_backbone(teacher.backbone, cfg.student_channels, seed=seed)
        if not cfg.tsm_steps or resolve_resume(os.path.join(run_dir, name), cfg.resume) is not None:
            return backbone, None
        t0, den = time.time(), Denoiser(backbone, teacher.denoiser.schedule, null_cond=teacher.denoiser.null_cond,
                                        prediction_type=teacher.denoiser.prediction_type)
        if text:  # its pool's prompts (a table not cached) are encoded on the device
            teacher.prompt_embeds.encoders_to(device)
        r = teacher_score_matching(den, teacher.denoiser, rows, shape, steps=cfg.tsm_steps, lr=cfg.tsm_lr,
                                   batch_size=cfg.batch_size, pool=cfg.tsm_pool, seed=seed, device=device)
        return backbone, {**r, "seconds": round(time.time() - t0, 1)}

    students, report, backbones = [], [], []
    for k, g in enumerate(router.groups):
        entry = {"student": k, "conditions": [teacher.prompts[i] for i in g] if text else g}
        backbone = None
        if cfg.student_channels:
            backbone, r = tsm(teacher.prompt_embeds.subset(g) if text else torch.tensor(g), cfg.seed + k, sub_name(k))
            entry.update({"tsm": r} if r else {})
        report.append(entry)
        if shared:
            backbones.append(backbone)
            continue
        t0 = time.time()
        park()
        students.append(train(student_config(cfg, router, k, run_dir), backbone, own=(router, k)))
        entry.update(train_seconds=sub_run_seconds(run_dir, sub_name(k), time.time() - t0),
                     parameters=students[-1] and count_parameters(students[-1]))  # FSDP: the student is on the main process only
    if shared:
        fake = None  # a full-copy fake score: the teacher's weights, or for smaller students one more TSM-trained one
        if cfg.student_channels and cfg.fake_score != "lora" and cfg.student_fake_score == "student":
            fake, r = tsm(teacher.prompt_embeds if text else torch.tensor(classes), cfg.seed + router.num_students,
                          "students")
            shared.update({"tsm": r} if r else {})
        t0 = time.time()
        park()
        joint = train(shared_config(cfg, run_dir), backbones if cfg.student_channels else None, router, fake)
        shared["train_seconds"] = sub_run_seconds(run_dir, "students", time.time() - t0)
        students = [Generator(d, joint.timesteps, joint.clip_sample) for d in joint.denoiser.students] if main else []
        for entry, s in zip(report, students):
            entry["parameters"] = count_parameters(s)
    if not main:
        state.wait_for_everyone()
        return None

    # 3. Together: digits-FID of the routed students, sample grid, export, metrics
    gens = [s.eval() for s in students]

    def sample(z, c):
        return routed_sample([gen.sample for gen in gens], router, z, c)

    metrics = {"method": cfg.method, "steps": cfg.steps, "students": router.num_students, "teacher_path": cfg.teacher,
               "num_classes": teacher.num_classes, "router": {"kind": router.kind, "groups": [r["conditions"] for r in report]},
               "teacher": {"fid": None, "nfe": None}, "student": {"fid": None, "nfe": gens[0].num_steps},
               "parameters": {"teacher": count_parameters(teacher.backbone), "student": report[0]["parameters"]},
               "feature_extractor": None, "num_samples": cfg.eval_samples, "per_student": report,
               "shared_fake_score": shared,
               "train_seconds": round(sum(r.get("train_seconds", 0) + (r.get("tsm") or {}).get("seconds", 0)
                                          for r in [*report, shared or {}]), 1),
               "processes": state.num_processes, "text_to_image": text}
    if classifier is not None:
        student_scores, metrics["teacher"] = digits_scores(sample, teacher, classifier, classes, cfg, device)
        metrics["student"].update(student_scores)
        metrics["feature_extractor"] = f"digits-classifier ({cfg.classifier}), penultimate {classifier.config.feature_dim}-d"
    save_students_grid(sample, teacher, classes, os.path.join(run_dir, "samples", "students.png"), device)
    if cfg.export:
        out = export_multi_pipeline(gens, router, teacher.scheduler_config, os.path.join(run_dir, "pipeline"),
                                    num_classes=teacher.num_classes, null_class=teacher.null_class,
                                    text_teacher_dir=teacher.path if text else None)
        metrics["export"] = [out]
    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    if cfg.export:
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(model_card_multi(metrics, run_dir))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    fid = metrics["student"]["fid"]
    nfe = metrics["student"]["nfe"]
    print(f"done: {router.num_students} students, routed FID {'not computed' if fid is None else round(fid, 3)} "
          f"({nfe} step{'s' * (nfe > 1)} each); run folder {run_dir}")
    state.wait_for_everyone()
    return metrics


@torch.no_grad()
def digits_scores(sample: Callable, teacher, classifier, classes: list[int], cfg, device) -> tuple[dict, dict]:
    """Digits-FID and class metrics of `sample(z, labels)` and of the teacher at each of cfg.teacher_eval_steps (the
    best kept), as the single-student run scores them (sample i: noise seed i, class classes[i mod C])."""
    from .fid import best_of_steps, digits_moments, evaluate_samples
    from .sampling import sample_teacher

    reference = digits_moments(classifier, classes, device)  # the digits of the run's classes

    def evaluate(fn) -> dict:
        return evaluate_samples(fn, classifier, reference, cfg.eval_samples, teacher.sample_shape, len(classes),
                                device=device, class_ids=classes)

    runs = {n: {**evaluate(lambda z, y, n=n: sample_teacher(teacher.denoiser, z, y, n)), "nfe": n}
            for n in cfg.teacher_eval_steps}
    return evaluate(sample), best_of_steps(runs)


@torch.no_grad()
def save_students_grid(sample: Callable, teacher, classes: list[int], path: str, device) -> None:
    """A sample grid through the router: one column per class (text: per prompt, at most 10)."""
    from .runs import save_grid

    table = teacher.prompt_embeds if teacher.text_conditional else torch.tensor(classes)
    cols = min(len(table), 10)
    n = cols * (2 if teacher.text_conditional else 10)
    z = torch.randn(n, *teacher.sample_shape, generator=torch.Generator().manual_seed(1234)).to(device)
    x = teacher.to_images(sample(z, table[torch.arange(n) % cols].to(device)))
    save_grid(x, path, nrow=cols, scale=4 if x.shape[-1] <= 64 else 1)
