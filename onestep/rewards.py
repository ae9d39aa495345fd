"""Reward models for GNDM: a reward is a callable `(images, cond) -> scores` of shape (B,).

Built-ins, named by a spec string (`--rewards classifier,clip,pkg.module:function`):
- `classifier`: the shipped digits classifier's probability of the requested class, p(c | x);
- `clip`: CLIP score, 100 * cos(image embedding, text embedding of the condition), from a CLIP model on this
  machine (a folder or the hub cache; nothing is downloaded);
- `pkg.module:function`: any importable callable `(images, cond) -> scores`.
Images are the generator's samples (B, C, H, W) in [-1, 1]; cond is what the teacher sees (class labels or
prompt-embedding rows). `RewardSet` checks each reward's output, standardises each reward within groups of
samples, and keeps the running scale behind the adaptive weights of GNDMR.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import OnestepError

Reward = Callable[[torch.Tensor, object], torch.Tensor]
BUILTIN = ("classifier", "clip")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's preprocessing


class RewardError(OnestepError):
    """A reward that cannot be built or returned something other than one score per image."""


# ---- group statistics ------------------------------------------------------------------------------
def repeat_groups(c, group_size: int):
    """B/G conditions, each repeated for G consecutive samples (their noise differs)."""
    return c if c is None or group_size == 1 else c[: len(c) // group_size].repeat_interleave(group_size, dim=0)


def group_mean(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B,): each entry replaced by the mean of its group (groups are consecutive runs of group_size)."""
    return v.reshape(-1, group_size).mean(1, keepdim=True).expand(-1, group_size).reshape(-1)


def group_standardise(r: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r_i - group mean) / (group std + eps), population std; exactly 0 for groups of one."""
    g = r.float().reshape(-1, group_size)
    centred = g - g.mean(1, keepdim=True)
    std = g.std(1, unbiased=False, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return (centred / (std + eps)).reshape(-1)


# ---- built-in rewards ------------------------------------------------------------------------------
def cond_rows(cond: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B,) row of the condition table holding each condition (labels or prompt embeddings; nearest row)."""
    def flat(v: torch.Tensor) -> torch.Tensor:
        return (v.flatten(1) if v.ndim > 1 else v[:, None]).float()

    return torch.cdist(flat(cond), flat(table.to(cond.device))).argmin(1)


class ClassifierConfidence:
    """p(c | x) of a frozen classifier (the digits network) for the requested class labels c."""

    def __init__(self, classifier: torch.nn.Module):
        self.classifier = classifier.eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(images.float().clamp(-1, 1)).float()
        return logits.softmax(-1).gather(1, cond.long().view(-1, 1))[:, 0]


class CLIPScore:
    """100 * cos(CLIP image features of the images, CLIP text features of each condition's text)."""

    def __init__(self, model: str, texts: list[str], table: torch.Tensor, device="cpu",
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        from transformers import CLIPModel, CLIPTokenizer

        try:
            self.model = CLIPModel.from_pretrained(model, local_files_only=True).to(device).eval().requires_grad_(False)
            tokenizer = CLIPTokenizer.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward 'clip': no CLIP model {model!r} on this machine ({type(e).__name__}); nothing "
                              "is downloaded: save a transformers CLIPModel and its tokenizer to a folder and pass "
                              "--clip_model DIR") from None
        self.table, self.decode, self.size = table[:], decode, self.model.config.vision_config.image_size  # all rows
        tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        with torch.no_grad():
            self.text = F.normalize(self._features(self.model.get_text_features(**tokens)), dim=-1)  # (N, D)

    @staticmethod
    def _features(out) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 4 / 5

    def __call__(self, images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.decode(images) if self.decode is not None else images
        x = ((x.float().clamp(-1, 1) + 1) / 2).expand(-1, 3, -1, -1)  # grey images to 3 channels
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        feats = F.normalize(self._features(self.model.get_image_features(pixel_values=(x - mean) / std)), dim=-1)
        return 100 * (feats * self.text.to(feats.device)[cond_rows(cond, self.table)]).sum(-1)


def import_reward(spec: str) -> Reward:
    """The callable named by 'pkg.module:function'."""
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module!r} ({e})") from None
    except AttributeError:
        raise RewardError(f"reward {spec!r}: module {module!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: {attr!r} is not callable; a reward is a function (images, cond) -> scores")
    return fn


def check_spec(spec: str) -> None:
    """Refuse a reward that is neither built in nor an importable callable 'pkg.module:function'."""
    if spec not in BUILTIN and (spec.count(":") != 1 or not all(spec.split(":"))):
        raise RewardError(f"reward {spec!r}: not one of {', '.join(BUILTIN)} or an import path 'pkg.module:function'")
    if spec not in BUILTIN:
        import_reward(spec)


def check_specs(specs) -> list[str]:
    """The reward specs as strings, each checked by check_spec."""
    specs = [str(s) for s in specs]
    for spec in specs:
        check_spec(spec)
    return specs


def build_reward(spec: str, *, classifier=None, cond_table=None, keys=None, sample_shape=(), device="cpu",
                 clip_model: str = "", clip_prompt: str = "{}") -> Reward:
    """A reward from its spec, bound to this run's conditions (`keys`: the label or prompt of each table row)."""
    text = cond_table is not None and cond_table.ndim > 1
    if spec == "classifier":
        if classifier is None or cond_table is None or text:
            raise RewardError("reward 'classifier': needs the digits classifier (--classifier) and a class-conditional "
                              "8x8 digits teacher")
        return ClassifierConfidence(classifier)
    if spec == "clip":
        if cond_table is None:
            raise RewardError("reward 'clip': this teacher is unconditional; CLIP scores images against conditions")
        if len(sample_shape) != 3 or sample_shape[0] not in (1, 3):
            raise RewardError(f"reward 'clip': samples of shape {tuple(sample_shape)} are not grey or RGB images (a "
                              "latent teacher); from Python pass CLIPScore(..., decode=teacher.to_images)")
        if hasattr(cond_table, "require_cached"):  # a prompt table (onestep.prompts.PromptTable)
            cond_table.require_cached("reward 'clip'")
        texts = [str(k) if text else clip_prompt.format(k) for k in keys]
        return CLIPScore(clip_model, texts, cond_table, device)
    check_spec(spec)
    return import_reward(spec)


def check_scores(name: str, scores, n: int) -> torch.Tensor:
    """The scores as a float tensor of shape (n,), or a one-line RewardError."""
    s = scores if torch.is_tensor(scores) else torch.as_tensor(scores)
    if s.shape != (n,):
        raise RewardError(f"reward {name!r}: returned scores of shape {tuple(s.shape)} for {n} images; a reward "
                          f"returns one score per image, shape ({n},)")
    return s.float()


class RewardSet:
    """Named rewards, each standardised within groups; adaptive weights lambda_k = weight_k / running std of R_k."""

    def __init__(self, rewards: dict[str, Reward], weights: list[float] | None = None, decay: float = 0.9,
                 eps: float = 1e-3):
        if weights and len(weights) != len(rewards):
            raise RewardError(f"reward_weights: {len(weights)} weights for {len(rewards)} rewards; give one per reward")
        self.rewards, self.decay, self.eps = dict(rewards), decay, eps
        self.weights = dict(zip(self.rewards, [float(w) for w in weights] if weights else [1.0] * len(rewards)))
        self.var: dict[str, float] = {}

    @classmethod
    def from_specs(cls, specs: list[str], weights: list[float] | None = None, decay: float = 0.9, eps: float = 1e-3, *,
                   cond_table=None, sample_shape=(), device="cpu", **build) -> "RewardSet":
        """The rewards named by `specs` (see build_reward; `build`: its other keywords), each checked on two blank
        images to return one score per image before any training."""
        fns = {s.replace(":", "."): build_reward(s, cond_table=cond_table, sample_shape=sample_shape, device=device,
                                                 **build) for s in specs}
        blank, cond = torch.zeros(2, *sample_shape, device=device), None if cond_table is None else cond_table[[0, 0]]
        with torch.no_grad():
            for name, fn in fns.items():
                try:
                    scores = fn(blank, None if cond is None else cond.to(device))
                except Exception as e:  # a user's function: its own error, as one line
                    raise RewardError(f"reward {name!r} failed on a test batch of 2 blank images ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:150] if str(e) else ''}); a reward is a function "
                                      "(images, cond) -> one score per image") from None
                check_scores(name, scores, 2)
        return cls(fns, weights, decay, eps)

    def __call__(self, images: torch.Tensor, cond, grad: bool = False) -> tuple[dict, dict]:
        """Scores (B,) of each reward (differentiable where grad and the reward are), and their logs; updates
        the running scale of each reward."""
        scores, logs = {}, {}
        for name, fn in self.rewards.items():
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                s = check_scores(name, fn(images if grad else images.detach(), cond), len(images))
            v = s.detach().var(unbiased=False).item() if len(s) > 1 else 0.0
            self.var[name] = v if name not in self.var else self.decay * self.var[name] + (1 - self.decay) * v
            scores[name] = s
            logs[f"reward_{name}_mean"], logs[f"reward_{name}_weight"] = s.detach().mean().item(), self.weight(name)
        return scores, logs

    def weight(self, name: str) -> float:
        """lambda_k = weight_k / (running std + eps): a reward's scale cancels out of its gradient term."""
        return self.weights[name] / (self.var.get(name, 0.0) ** 0.5 + self.eps)

    def advantage(self, scores: dict, group_size: int, eps: float = 1e-4) -> torch.Tensor:
        """sum_k weight_k * (R_k standardised within its group): each reward normalised separately."""
        return sum(self.weights[k] * group_standardise(s.detach(), group_size, eps) for k, s in scores.items())

    def gradient_term(self, scores: dict) -> torch.Tensor | None:
        """-sum_k lambda_k mean(R_k) over the differentiable rewards (None if none is)."""
        terms = [-self.weight(k) * s.mean() for k, s in scores.items() if s.requires_grad]
        return sum(terms) if terms else None
