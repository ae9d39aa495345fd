"""onestep: distil a multi-step diffusion teacher into a one-step generator, export it, report FID.

    accelerate launch train/distill.py                       # DMD2 on the shipped digits teacher
    accelerate launch train/distill.py --preset digits-dmd   # DMD with the regression loss
    accelerate launch train/distill.py --config run.yaml --steps 500 --teacher path/or/hub-id
    accelerate launch train/distill.py --students 5          # multi-student: 5 students, one per 2 digit classes

Options are `--key value` for any field of onestep.config.Config or any option of the chosen method
(`--help` lists them). Writes <output_dir>/<name>/ (default runs/<preset>-<method>, -k<K> added with --students K):
config.yaml, checkpoints/, logs/ (tensorboard), samples/, metrics.json, fid_curve.png (with the digits
classifier's FID), pipeline/ (the diffusers export; also pipeline-ddim/ for an unconditional one-step VP student;
with --students, one student_k/ each, or students/ with --shared_fake_score).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import yaml


def main(argv: list[str]) -> None:
    from accelerate import PartialState

    from onestep.config import load_config

    cfg = load_config(argv)
    if cfg.students > 1 or cfg.student_channels:  # multi-student distillation: K runs of train(), one export
        from onestep.multistudent import train_students

        train_students(cfg, train)
    else:
        train(cfg)
    PartialState().destroy_process_group()


def train(cfg, backbone=None, router=None, fake_backbone=None, own=None):
    """Distil, evaluate and export one student as `cfg` says; returns it (a Generator, EMA weights where kept).
    backbone: the generator / fake-score architecture (e.g. a smaller TSM-trained UNet; default: the teacher's).
    router: K students (backbone: their K backbones) trained jointly behind it with one fake score (fake_backbone).
    own: (router, k) for student k trained alone: real captioned images whose caption routes to another are left out."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm import tqdm

    from onestep import hostmem
    from onestep.attention import set_attention
    from onestep.config import ConfigError, check_teacher_fit, method_kwargs, print_notes, saved_config
    from onestep.data import ConditionSampler, RealImages, folder_dataset, load_digits, read_image_folder
    from onestep.distributed import check_launch, clip_grad_norm, distributed_mode, mixed_precision, prepare_sharded
    from onestep.fid import DigitsClassifier, best_of_steps, digits_moments, evaluate_samples
    from onestep.loading import is_text_teacher, load_teacher
    from onestep.methods import build_method, default_generator_timesteps
    from onestep.multistudent import own_real_images
    from onestep.optim import make_optimizer
    from onestep.pipeline import export_pipeline, model_card, stock_call
    from onestep.prompts import read_prompts
    from onestep.runs import (RealBatches, adapter_only_checkpoints, check_same_kind, checkpoint_history, clear_run_dir,
                              load_checkpoint, plot_curve, prepare_run_dir, resolve_resume, run_config, save_checkpoint,
                              save_grid)
    from onestep.sampling import sample_teacher
    from onestep.schedule import to_device
    from onestep.triad import DEFAULT_LORA_TARGETS, Triad, enable_gradient_checkpointing
    from onestep.update import Updates, accumulated, floats

    # 1. Configuration ------------------------------------------------------------------------------
    method = build_method(cfg.method, **method_kwargs(cfg))
    if cfg.backtrack:  # DisBack around the method: recording in prepare(), the DM target walks back in on_step()
        from onestep.disback import DisBack

        method = DisBack.from_config(method, cfg)
    name = cfg.name or f"{cfg.preset}-{cfg.method}"
    run_dir = os.path.join(cfg.output_dir, name)

    # 2. Accelerator and run folder -------------------------------------------------------------------
    check_launch()  # (and below: processes a launcher started that accelerate did not join)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), log_with="tensorboard", project_config=ProjectConfiguration(
        project_dir=run_dir, logging_dir=os.path.join(run_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(non_blocking=True))  # real batches: no host wait per copy
    device, main_proc = accelerator.device, accelerator.is_main_process
    fsdp = distributed_mode(accelerator, cfg, getattr(method, "uses_gan", False))  # FSDP2; DeepSpeed refused; joined
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    hostmem.configure_cpu(cfg, device.type, accelerator.num_processes)  # threads; freed memory kept (no page faults)
    check_same_kind(run_dir, cfg)
    prepare_run_dir(run_dir, overwrite=cfg.overwrite, resume=bool(cfg.resume), state=accelerator)
    accelerator.wait_for_everyone()
    resume_from = resolve_resume(run_dir, cfg.resume)
    if cfg.resume and resume_from is None and main_proc:
        print(f"warning: resume: no complete checkpoint in {run_dir}/checkpoints; starting from step 0", file=sys.stderr)
    set_seed(cfg.seed)

    # 3. Teacher, conditions and data -----------------------------------------------------------------
    mp = accelerator.mixed_precision
    frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    prompts = read_prompts(cfg.prompts) if cfg.prompts else None  # text teachers: embedded once, cached
    folder = read_image_folder(cfg.dataset, is_text_teacher(cfg.teacher)) if cfg.dataset not in ("digits", "none") else None
    teacher = load_teacher(cfg.teacher, device=device, prompts=prompts, frozen_dtype=frozen_dtype,
                           captions=folder and folder.captions, negative_prompt=cfg.negative_prompt)
    shape = teacher.sample_shape
    check_teacher_fit(cfg, teacher)  # its time range, sample space and sampler steps
    run_cfg = run_config(cfg, teacher.denoiser.schedule)  # what checkpoints record (and a resume must match)
    if teacher.num_classes:
        classes = cfg.classes or list(range(teacher.num_classes))
        bad = [c for c in classes if not 0 <= c < teacher.num_classes]
        if bad:
            raise ConfigError(f"classes: label {bad[0]} is out of range 0..{teacher.num_classes - 1} for this teacher")
    elif cfg.classes:
        raise ConfigError("classes: this teacher has no class labels; remove --classes")
    else:
        classes = []
    if (getattr(method, "uses_guidance", getattr(method, "real_guidance_scale", 1.0) != 1.0)
            and teacher.denoiser.null_cond is None):
        fix = "--random_guidance false" if getattr(method, "random_guidance", False) else "--real_guidance_scale 1"
        raise ConfigError(f"{fix.split()[0][2:]}: this teacher has no null condition for guidance; use {fix}")
    class_ids = torch.tensor(classes, device=device) if classes else None
    # a condition is a class label, or (text teachers) a row of the cached prompt-embedding table (N, L, D)
    cond_table = teacher.prompt_embeds if teacher.text_conditional else class_ids
    cond_sampler = ConditionSampler(None if cond_table is None else len(cond_table))

    def draw_cond(n: int, generator: torch.Generator | None = None):
        if cond_table is None:
            return None
        return to_device(cond_table[to_device(cond_sampler(n, generator), cond_table.device)], device)

    loader = None
    if method.needs_real_images:
        if folder is not None:  # encoded once into the teacher's sample space (VAE latents), with caption embeddings
            data = folder_dataset(folder, teacher, seed=cfg.seed)
            data = own_real_images(data, *own) if own and data.conds is not None else data
        elif cfg.dataset != "digits" or shape != (1, 8, 8):
            raise ConfigError(f"dataset: method {cfg.method!r} needs real images; this teacher makes {shape}: pass "
                              "--dataset FOLDER (images, optional captions) or turn the GAN off "
                              "(--gan_generator_weight 0 --gan_critic_weight 0)")
        else:
            x_real, y_real = load_digits("train")
            keep = torch.isin(y_real, torch.tensor(classes)) if classes else torch.ones_like(y_real, dtype=torch.bool)
            data = RealImages(x_real[keep], y_real[keep])
        if len(data) < cfg.batch_size * accelerator.num_processes:
            raise ConfigError(f"dataset: {len(data)} real images{f' of {cfg.name} (its conditions)' if own else ''}, "
                              f"fewer than one batch ({cfg.batch_size} per process "
                              f"x {accelerator.num_processes}); add images or lower --batch_size")
        loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)

    # 4. Triad, optimisers, accelerate -----------------------------------------------------------------
    example = None if cond_table is None else cond_table[:1].to(device)
    try:  # options this teacher cannot serve (LoRA targets it lacks, a GAN head without a mid-block) -> one line
        triad = Triad.from_teacher(
            teacher.denoiser, fake_score=cfg.fake_score, lora_rank=cfg.lora_rank,
            generator_timesteps=cfg.generator_timesteps or default_generator_timesteps(method, teacher.denoiser.schedule),
            lora_targets=cfg.lora_targets or DEFAULT_LORA_TARGETS,
            gan_head=getattr(method, "uses_gan", False), gan_feature_source=cfg.gan_feature_source, sample_shape=shape,
            example_cond=example, ema_decay=cfg.ema_decay or None, frozen_dtype=frozen_dtype,
            gan_hidden=cfg.gan_hidden or None, gan_layers=cfg.gan_layers or ("mid_block",), student_backbone=backbone,
            clip_sample=cfg.clip_sample or None, fake_from_teacher=cfg.student_fake_score == "teacher",
            offload_ema=cfg.offload_ema, router=router, fake_backbone=fake_backbone, generator_lora_rank=cfg.generator_lora_rank,
            generator_lora_targets=cfg.generator_lora_targets or DEFAULT_LORA_TARGETS)
    except ValueError as e:
        raise ConfigError(f"{e} (teacher {cfg.teacher!r})") from None
    triad.teacher.guidance_uncond = teacher.negative_cond  # --negative_prompt: the real score's CFG branch only
    backbones = [*triad.raw("generator").denoiser.backbones, triad.raw("fake_score").backbone, teacher.backbone]
    set_attention(backbones, cfg.attention)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbones[:-1])
    adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, device=device)
    opt_g = make_optimizer(triad.generator_parameters(), cfg.optimizer, lr=cfg.lr_generator, **adam)
    # FSDP2 wraps one module per optimiser: the GAN head gets its own (same settings, stepped with the fake score's;
    # AdamW is per parameter, so the update is the same as one optimiser over both)
    head = list(triad.gan_head.parameters()) if fsdp and triad.gan_head is not None else []
    head_ids = {id(q) for q in head}
    critic = [p for p in triad.critic_parameters() if id(p) not in head_ids]
    opt_f = make_optimizer(critic, cfg.optimizer, lr=cfg.lr_fake, **adam)
    opt_h = make_optimizer(head, cfg.optimizer, lr=cfg.lr_fake, **adam) if head else None
    from diffusers.optimization import get_scheduler

    def lr_schedule(opt, turn):  # counted in that optimiser's own steps; accelerate steps it once per process
        n_steps = sum(turn != "generator" or method.is_generator_step(s) for s in range(cfg.steps))
        warmup = sum(turn != "generator" or method.is_generator_step(s) for s in range(cfg.lr_warmup_steps))
        return get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=warmup * accelerator.num_processes,
                             num_training_steps=n_steps * accelerator.num_processes)

    sched_g, sched_f = lr_schedule(opt_g, "generator"), lr_schedule(opt_f, "fake")
    sched_h = lr_schedule(opt_h, "fake") if opt_h is not None else None
    if fsdp:  # one module and its optimiser per prepare, in place
        (opt_g, opt_f, opt_h), (sched_g, sched_f, sched_h) = prepare_sharded(
            accelerator, triad, cfg.fake_score == "lora", (opt_g, opt_f, opt_h), (sched_g, sched_f, sched_h))
    else:
        triad.generator, triad.fake_score, opt_g, opt_f, sched_g, sched_f = accelerator.prepare(
            triad.generator, triad.fake_score, opt_g, opt_f, sched_g, sched_f)
        if triad.gan_head is not None:
            triad.gan_head = accelerator.prepare(triad.gan_head)
    for b in {id(b): b for b in backbones}.values() if cfg.compile else ():  # in place: state-dict keys unchanged
        b.compile(mode=None if cfg.compile == "default" else cfg.compile)
    if loader is not None:
        loader = accelerator.prepare(loader)
    adapted = [m for m, lora in ((triad.raw("fake_score"), triad.raw("fake_score").adapters),
                                 (triad.raw("generator"), cfg.generator_lora_rank)) if lora]  # slim checkpoints
    slim = bool(adapted) and adapter_only_checkpoints(accelerator, adapted)
    if triad.ema is not None:
        accelerator.register_for_checkpointing(triad.ema)
    if hasattr(method, "state_dict") and hasattr(method, "load_state_dict"):  # a method or wrapper with its own state
        accelerator.register_for_checkpointing(method)
    classifier = reference = None  # the digits feature / classifier net (FID, and e.g. SFD's pseudo-labels)
    if cfg.classifier and shape == (1, 8, 8):
        classifier = DigitsClassifier.load(cfg.classifier).to(device)
        reference = digits_moments(classifier, classes, device)  # the digits of the run's classes
    if hasattr(method, "prepare"):  # e.g. DMD's regression pairs
        method.prepare(triad, draw_cond, shape, device, seed=cfg.seed)
    if hasattr(method, "setup"):  # e.g. SFD: which rows of the condition table it forgets (labels or prompts)
        method.setup(cond_table, teacher.prompts if teacher.text_conditional else classes, classifier)
    if main_proc and cfg.overwrite:  # every check above passed: now the replaced run goes
        clear_run_dir(run_dir)
    accelerator.wait_for_everyone()

    # 5. Resume -------------------------------------------------------------------------------------
    real_iter = RealBatches(loader) if loader is not None else None  # endless; its position is checkpointed
    start = 0
    if resume_from:  # models, EMA, optimisers, schedulers, per-process RNG states, data position, method state
        start = load_checkpoint(accelerator, resume_from, run_cfg, real_iter, strict=not slim, ema=triad.ema,
                                turns=[(opt_g, sched_g, cfg.lr_generator), (opt_f, sched_f, cfg.lr_fake), (opt_h, sched_h, cfg.lr_fake)])
    else:  # fresh, per-process noise; a resumed run continues the RNG streams it saved
        set_seed(cfg.seed, device_specific=True)
    if main_proc and start < cfg.steps:  # (a finished run resumed trains nothing: its config.yaml stays)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(saved_config(cfg), f, sort_keys=False)
        print_notes(cfg)
    accelerator.init_trackers("onestep", config={k: str(v) if isinstance(v, (list, dict)) else v
                                                  for k, v in dataclasses.asdict(cfg).items()})

    # Evaluation helpers (main process; digits-FID needs the shipped feature net and an 8x8 teacher).
    eval_labels = len(classes) or None

    def evaluate(sample_fn) -> dict:  # sample i: class classes[i % len(classes)]
        return evaluate_samples(sample_fn, classifier, reference, cfg.eval_samples, shape, eval_labels, device=device,
                                class_ids=classes or None)

    def save_samples(step: int, gen) -> None:
        cols = min(len(cond_table), 10 if classes else 8) if cond_table is not None else 8  # one column per class / prompt
        n = (10 if classes else 2) * cols if cond_table is not None else 64
        g = torch.Generator().manual_seed(1234)
        z = torch.randn(n, *shape, generator=g).to(device)
        y = None if cond_table is None else cond_table[torch.arange(n) % cols].to(device)
        with torch.no_grad():
            x = teacher.to_images(gen.sample(z, y))  # latent teachers: decoded by the VAE
        save_grid(x, os.path.join(run_dir, "samples", f"step_{step:07d}.png"), nrow=cols,
                  scale=4 if x.shape[-1] <= 64 else 1)

    # 6. Training loop -------------------------------------------------------------------------------
    before = checkpoint_history(resume_from, run_dir)  # the curve and seconds up to the checkpoint: metrics cover the whole run
    t_start, curve = time.time() - before.get("train_seconds", 0.0), list(before.get("curve", []))
    updates = Updates(cfg.nonfinite_check, device, [opt_g, opt_f, opt_h], cfg.max_nonfinite_steps, where=run_dir,
                      gather=accelerator.gather if accelerator.num_processes > 1 else None)
    trained = {"generator": triad.generator_parameters(), "fake": triad.critic_parameters()}
    parts = {"generator": (method.generator_loss, [opt_g], [sched_g]),  # + the GAN head's own under FSDP
             "fake": (method.fake_score_loss, [o for o in (opt_f, opt_h) if o], [s for s in (sched_f, sched_h) if s])}
    sync = [triad.generator, triad.fake_score, triad.raw("fake_score").backbone, triad.gan_head]  # (a LoRA's: FSDP2's)
    latest = {}  # each term's newest value: a logging step that is no generator step still logs the generator's
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, disable=not accelerator.is_local_main_process)
    for step in bar:
        batches = [dict(z=torch.randn(cfg.batch_size, *shape, device=device), cond=draw_cond(cfg.batch_size), step=step,
                        **(next(real_iter) if real_iter is not None else {}))  # "real" (+ "real_cond")
                   for _ in range(cfg.gradient_accumulation_steps)]
        turns = ["fake", "generator"] if getattr(method, "fake_first", False) else ["generator", "fake"]
        logs = {}
        for turn in turns:
            if turn == "generator" and not method.is_generator_step(step):
                continue
            loss_fn, opts, lr_scheds = parts[turn]
            for opt in opts:
                opt.zero_grad(set_to_none=True)  # nothing another turn's backward may have left
            loss, turn_logs = accumulated(accelerator, loss_fn, triad, batches, sync)
            turn_logs[f"grad_norm_{turn}"] = clip_grad_norm(accelerator, trained[turn], cfg.grad_clip or float("inf"))
            if updates(step, turn, loss, turn_logs[f"grad_norm_{turn}"], opts, lr_scheds, turn_logs,
                       triad.ema_step if turn == "generator" else None):
                logs.update(turn_logs)
        if hasattr(method, "on_step"):  # e.g. DisBack's target schedule (it logs the node in use)
            method.on_step(triad, step, logs)
        latest.update(logs)
        done = step + 1
        if cfg.compile and step == start and main_proc:
            tqdm.write(f"torch.compile: the first iteration (with compilation) took {bar.format_dict['elapsed']:.1f} s")
        if done % cfg.log_every == 0 or done == cfg.steps or any(n and done % n == 0 for n in (
                cfg.sample_every, cfg.eval_every, cfg.checkpoint_every)):
            updates.check()  # where the skips are counted on the device: a run of them past the limit stops here
        if done % cfg.log_every == 0 or done == cfg.steps:
            logs = floats({**latest, "skipped_updates": updates.skipped_count(), "lr_generator": sched_g.get_last_lr()[0],
                           "lr_fake": sched_f.get_last_lr()[0]})  # one read of the device's values
            accelerator.log(logs, step=done)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
        if cfg.sample_every and done % cfg.sample_every == 0:
            gen = triad.export_generator(use_ema=False) if fsdp else triad.raw("generator")  # FSDP: all gather
            if main_proc:
                save_samples(done, gen)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            gen = triad.export_generator(use_ema=True) if fsdp and classifier is not None else None
            if main_proc and classifier is not None:
                with torch.no_grad():  # the weights an export would hold (EMA where kept)
                    r = evaluate((gen or triad.export_generator(use_ema=True)).sample)
                curve.append({"step": done, "seconds": time.time() - t_start, "fid": r["fid"]})
                tqdm.write(f"step {done}: digits-FID {r['fid']:.3f}" + (f", class accuracy {r['class_accuracy']:.3f}" if eval_labels else ""))
                accelerator.log({"fid": r["fid"], **({"class_accuracy": r["class_accuracy"]} if eval_labels else {})}, step=done)
            accelerator.wait_for_everyone()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_checkpoint(accelerator, run_dir, done, cfg.checkpoints_total_limit, run_cfg, real_iter,
                            {"curve": curve, "train_seconds": time.time() - t_start})
    train_seconds = time.time() - t_start
    if start < cfg.steps:  # (a resume of a finished run only evaluates and exports again)
        save_checkpoint(accelerator, run_dir, cfg.steps, cfg.checkpoints_total_limit, run_cfg, real_iter,
                        {"curve": curve, "train_seconds": train_seconds})

    # 7. Final evaluation, export, metrics ------------------------------------------------------------
    spread = None  # FSDP: each process holds its own shard, not a replica
    if not fsdp:
        flat = torch.cat([p.detach().double().flatten() for p in triad.generator_parameters()])
        sums = accelerator.gather(torch.stack([flat.sum(), flat.abs().sum()])[None].to(device))  # (processes, 2)
        spread = (sums.max(0).values - sums.min(0).values).max().item()  # 0 when every replica holds the same weights
    student = triad.export_generator(use_ema=True)  # FSDP: gathered on the main process (None elsewhere)
    last = triad.export_generator(use_ema=False) if fsdp else triad.raw("generator")
    teacher_runs = {}  # teacher FID per sampler step count; a teacher inside a sharded LoRA backbone: every process
    if classifier is not None and (main_proc or (fsdp and cfg.fake_score == "lora")):  # runs it (FSDP gathers)
        with torch.no_grad():
            for n_steps in cfg.teacher_eval_steps:
                r = evaluate(lambda z, y, n=n_steps: sample_teacher(triad.teacher, z, y, n))
                teacher_runs[n_steps] = {**r, "nfe": n_steps}
    if main_proc:
        save_samples(cfg.steps, last)
        metrics = {"method": cfg.method, "steps": cfg.steps, "teacher_path": cfg.teacher, "num_classes": teacher.num_classes,
                   "teacher": {"fid": None, "nfe": None}, "student": {"fid": None, "nfe": student.num_steps},
                   "feature_extractor": None, "num_samples": cfg.eval_samples, "train_seconds": round(train_seconds, 1),
                   "processes": accelerator.num_processes, "distributed": accelerator.distributed_type.value,
                   "replica_weight_spread": spread,
                   "text_to_image": teacher.text_conditional, "prompts": len(teacher.prompts or []) or None,
                   "pipeline_call": stock_call(student) if teacher.text_conditional else None}
        if classifier is not None:
            with torch.no_grad():
                metrics["student"].update(evaluate(student.sample))
            metrics["teacher"] = best_of_steps(teacher_runs)  # {"fid": None, ...} for an empty teacher_eval_steps
            metrics["feature_extractor"] = f"digits-classifier ({cfg.classifier}), penultimate {classifier.config.feature_dim}-d"
            curve = [p for p in curve if p["step"] < cfg.steps] + [
                {"step": cfg.steps, "seconds": train_seconds, "fid": metrics["student"]["fid"]}]
            metrics["curve"] = curve
            plot_curve(curve, os.path.join(run_dir, "fid_curve.png"))
            accelerator.log({k: metrics["student"][k] for k in ("fid", "class_accuracy") if k in metrics["student"]},
                            step=cfg.steps)
        if hasattr(method, "extra_metrics"):  # method-specific figures, e.g. SFD's unlearning accuracy
            with torch.no_grad():
                metrics.update(method.extra_metrics(student.sample, classifier, cfg.eval_samples, shape, device))
        if cfg.export:
            written = export_pipeline(student, teacher.scheduler_config, os.path.join(run_dir, "pipeline"),
                                      num_classes=teacher.num_classes, null_class=teacher.null_class,
                                      text_teacher_dir=teacher.path if teacher.text_conditional else None,
                                      lora=triad.generator_adapter_state() if teacher.text_conditional else None)
            metrics["export"] = written
        metrics["wall_seconds"] = round(time.time() - t_start, 1)
        if cfg.export:
            for d in written:
                with open(os.path.join(d, "README.md"), "w") as f:
                    f.write(model_card(metrics, run_dir, len(written) > 1))
        with open(os.path.join(run_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        s, t = metrics["student"], metrics["teacher"]
        fid = ("trained (FID once every student is)" if own or router else "no digits-FID (--classifier off, or not a "
               "1x8x8 teacher)") if s["fid"] is None else f"student FID {s['fid']:.3f} ({s['nfe']} step{'s' * (s['nfe'] > 1)})"
        if t["fid"] is not None:
            best = f", the best of {len(teacher_runs)} step counts" if len(teacher_runs) > 1 else ""
            fid += f", teacher FID {t['fid']:.3f} ({t['nfe']} step{'s' * (t['nfe'] > 1)}{best})"
        print(f"done: {fid}; run folder {run_dir}")
    for tracker in accelerator.trackers:  # end_training() less the process group, which main() ends
        tracker.finish()
    return student


if __name__ == "__main__":
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        from onestep.usage import distill_help, print_help

        print_help(distill_help(__doc__))
    from onestep.cli import run_script

    run_script(main, args)  # bad input: one line (the first process's), exit 2, nothing overwritten
