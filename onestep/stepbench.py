"""Step benchmark: the cost of one distillation iteration, and of its network passes timed alone.

One DMD iteration (no GAN, update ratio 1) = generator fwd+bwd, teacher fwd, fake-score fwd (the DM direction),
fake-score fwd+bwd (its denoising loss) and two optimizer steps: eight forward-equivalents of one network size
(seven with `shared_critic_pass`: the critic's loss reuses the DM direction's fake-score forward).
It runs through the same method code as the trainer (onestep.methods.DMD on a Triad; or DMD2, whose GAN head
adds a generator term and a classification loss on the fake score's batched forward) with the trainer's per-turn
work (autocast, zero_grad, backward, gradient clipping, finiteness check, optimizer step, EMA), with the trainer's
update rule (onestep.update; `sync`: "host" reads the finiteness before each update, "device" reads nothing,
"auto" picks as the trainer does, "logs" also reads the loss terms each turn, as the trainer did before).

Presets: "digits" (the shipped teacher), "cifar" (google/ddpm-cifar10-32's UNet2DModel config, random weights),
"sd15" (Stable Diffusion 1.5's UNet2DConditionModel config, random weights, 64x64 latents, 77x768 prompt
embeddings), "sdxl" (SDXL's UNet, 2.6B parameters, 128x128 latents, 77x2048 prompt embeddings + pooled embedding
and size ids; default batch 4 on a GPU). Variants: "fp32", "tf32", "bf16" (autocast, frozen teacher stored in
bf16), "bf16-compile" (+ torch.compile of the three networks; its compile time is reported), "bf16-reduce-overhead"
(compile with CUDA graphs) and "bf16-max-autotune" (compile with kernel autotuning and CUDA graphs).
`simulate_memory` runs the step on fake tensors (onestep.memsim) to estimate its peak GPU memory without a GPU.
img/s is the median over single steps, each ended by a synchronisation; "back to back" runs up to 10 steps with one
synchronisation at the end, as the trainer runs (the host queues the next step's work while the device computes).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import OnestepError
from .schedule import Schedule
from .update import Updates, floats

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, SXM parts), matched on the CUDA device name.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0}
VARIANTS = ("fp32", "tf32", "bf16", "bf16-compile", "bf16-reduce-overhead", "bf16-max-autotune")
SIMULATED_VARIANTS = ("fp32", "tf32", "bf16")  # memsim runs eager code only
COMPILE_MODES = {"bf16-compile": None, "bf16-reduce-overhead": "reduce-overhead", "bf16-max-autotune": "max-autotune"}
METHODS = ("dmd", "dmd2")
SYNC_MODES = ("auto", "host", "device", "logs")  # host reads per update (see StepRunner)
EMA_MODES = (True, False, "offload")  # kept on the device, none, or kept and updated in CPU memory
PRESETS = ("digits", "cifar", "sd15", "sdxl")

CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


class StepBenchError(OnestepError):
    """Bad step-benchmark input (preset, variant)."""


@dataclass
class Workload:
    """A teacher denoiser, its sample shape, a condition batch maker and the batch size."""

    name: str
    teacher: Denoiser
    shape: tuple
    cond: object  # callable(n, device) -> condition batch or None
    batch_size: int


def build_workload(preset: str, device: torch.device, batch_size: int | None = None, seed: int = 0) -> Workload:
    """The teacher of a preset, kept on the CPU (float32 weights; random ones for the cifar and sd15 configs): each
    variant moves its own copy to `device`, so peak memory counts only what a training run holds."""
    import diffusers

    torch.manual_seed(seed)
    gpu = device.type == "cuda"
    if preset == "digits":
        from .loading import load_teacher

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the shipped teacher of this checkout
        t = load_teacher(os.path.join(root, "assets", "digits-teacher"), device=torch.device("cpu"))
        k = t.num_classes
        return Workload(preset, t.denoiser, t.sample_shape, lambda n, d: torch.arange(n, device=d) % k, batch_size or 64)
    if preset == "cifar":
        sched = Schedule.from_scheduler_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000})
        unet = diffusers.UNet2DModel(**CIFAR_UNET)
        return Workload(preset, Denoiser(unet, sched), (3, 32, 32), lambda n, d: None, batch_size or (256 if gpu else 8))
    if preset == "sd15":
        sched = Schedule.from_scheduler_config({"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
                                                "beta_start": 0.00085, "beta_end": 0.012})
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        null = torch.zeros(1, 77, 768)
        return Workload(preset, Denoiser(unet, sched, null_cond=null), (4, 64, 64),
                        lambda n, d: torch.randn(n, 77, 768, device=d), batch_size or (8 if gpu else 1))
    if preset == "sdxl":  # prompt embeddings, pooled embedding and size / crop ids packed as the trainer packs them
        from .denoiser import pack_text_time

        sched = Schedule.from_scheduler_config({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                                                "beta_start": 0.00085, "beta_end": 0.012})
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])

        def cond(n, d):
            return pack_text_time(torch.randn(n, 77, 2048, device=d), torch.randn(n, 1280, device=d), ids.to(d))

        null = torch.zeros_like(cond(1, torch.device("cpu")))
        return Workload(preset, Denoiser(unet, sched, null_cond=null), (4, 128, 128), cond, batch_size or (4 if gpu else 1))
    raise StepBenchError(f"preset: unknown step-benchmark preset {preset!r}; choose from {', '.join(PRESETS)}")


class Timer:
    """Wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@contextlib.contextmanager
def _tf32(on: bool, cudnn_benchmark: bool = False):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


class CudaMemory:
    """The CUDA allocator's peak of allocated bytes (the same interface as onestep.memsim.MemoryTracker)."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class StepRunner:
    """A triad + DMD + two AdamW optimisers for one variant, with `step()` and the component passes.

    `memory`: a peak-memory counter (CudaMemory on a CUDA device by default); an onestep.memsim.MemoryTracker
    makes this a simulated accelerator run (fake tensors on the CPU, built inside memsim.simulated_accelerator)."""

    def __init__(self, work: Workload, variant: str, device: torch.device, fake_score: str = "copy",
                 gradient_checkpointing: bool = False, attention: str = "sdpa", cudnn_benchmark: bool = False,
                 ema: bool | str = True, method: str = "dmd", optimizer: str = "adamw", sync: str = "auto",
                 memory=None, shared_critic_pass: bool = False, generator_lora: int = 0):
        import copy

        from .memsim import MemoryTracker

        from .methods.dmd import DMD, DMD2
        from .optim import make_optimizer
        from .triad import Triad, enable_gradient_checkpointing

        if variant not in VARIANTS:
            raise StepBenchError(f"variant: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.simulated = isinstance(memory, MemoryTracker)
        self.memory = memory if memory is not None else (CudaMemory(device) if device.type == "cuda" else None)
        if variant != "fp32" and device.type != "cuda" and not self.simulated:
            raise StepBenchError(f"variant: {variant!r} needs a CUDA device; on the CPU use fp32")
        if method not in METHODS:
            raise StepBenchError(f"method: unknown method {method!r}; choose from {', '.join(METHODS)}")
        if sync not in SYNC_MODES:
            raise StepBenchError(f"sync: unknown value {sync!r}; choose from {', '.join(SYNC_MODES)}")
        if ema not in EMA_MODES:
            raise StepBenchError(f"ema: unknown EMA mode {ema!r}; choose from True, False, 'offload'")
        self.variant, self.device, self.work = variant, device, work
        self.bf16 = variant.startswith("bf16")
        self.cudnn_benchmark = cudnn_benchmark
        teacher = copy.deepcopy(work.teacher).to(device)  # every variant starts from the same weights
        if torch.is_tensor(teacher.null_cond):
            teacher.null_cond = teacher.null_cond.to(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        n = work.batch_size
        self.z = torch.randn(n, *work.shape, generator=g).to(device)
        self.cond = work.cond(n, device)
        self.real = torch.rand(n, *work.shape, generator=g).mul(2).sub(1).to(device)  # DMD2's GAN: "real" images
        self.triad = Triad.from_teacher(teacher, fake_score=fake_score, sample_shape=work.shape,
                                        ema_decay=0.999 if ema else None, offload_ema=ema == "offload",
                                        gan_head=method == "dmd2",
                                        example_cond=self.cond, frozen_dtype=torch.bfloat16 if self.bf16 else None,
                                        generator_lora_rank=generator_lora)
        # one iteration = one generator turn + one critic turn (DMD2's TTUR repeats the critic turn)
        self.method = (DMD if method == "dmd" else DMD2)(update_ratio=1, shared_critic_pass=shared_critic_pass)
        self.shared_critic_pass = shared_critic_pass
        self.nets = [self.triad.raw("generator").denoiser.backbone, self.triad.raw("fake_score").backbone,
                     self.triad.raw("teacher").backbone]
        from .attention import set_attention

        self.attention = set_attention(self.nets, attention)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.nets[:2])
        try:  # as the trainer builds them
            self.opt_g = make_optimizer(self.triad.generator_parameters(), optimizer, lr=1e-6, device=device)
            self.opt_f = make_optimizer(self.triad.critic_parameters(), optimizer, lr=1e-6, device=device)
            # the trainer's update rule; "logs": as the trainer was before, the loss terms read on the host each turn
            if self.simulated and sync == "auto":  # as `auto` decides on an accelerator
                from .update import device_skip_blocker

                sync = "host" if device_skip_blocker([self.opt_g, self.opt_f]) else "device"
            self.updates = Updates("host" if sync == "logs" else sync, device, [self.opt_g, self.opt_f], 10**9)
        except OnestepError as e:
            raise StepBenchError(str(e)) from None
        self.sync = "logs" if sync == "logs" else ("device" if self.updates.on_device else "host")
        self.compile_seconds = None
        self.phase_peaks: dict[str, float] = {}
        if self.simulated and ema == "offload":  # the EMA and its staging buffers live in host memory
            self.memory.host_resident(self.triad.ema.shadow_params)
            with self.memory.host_allocations():
                self.triad.ema._stage(self.triad.ema.shadow_params, self.triad.ema_parameters)
        if variant in COMPILE_MODES:
            mode = COMPILE_MODES[variant]
            for net in {id(n): n for n in self.nets}.values():
                net.compile(mode=mode)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def tf32(self):
        return _tf32(self.variant != "fp32", self.cudnn_benchmark)

    def _update(self, loss_fn, opt, params, generator: bool, batch: dict):
        turn = "generator" if generator else "fake score"
        opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss, logs = loss_fn(self.triad, batch)
        if self.sync == "logs":
            floats(logs)
        self._phase(f"{turn} forward")
        loss.backward()
        self._phase(f"{turn} backward")
        norm = torch.nn.utils.clip_grad_norm_(params, 10.0)
        self.updates(0, turn, loss, norm, [opt], [], logs, self.triad.ema_step if generator else None)
        self._phase(f"{turn} optimizer" + (" + EMA" if generator and self.triad.ema is not None else ""))

    def _phase(self, name: str) -> None:
        """The peak memory since the previous phase, kept as the largest over steps (the step's peak = their max)."""
        if self.memory is not None:
            peak = self.memory.peak / 2**30
            self.phase_peaks[name] = max(peak, self.phase_peaks.get(name, 0.0))
            self.memory.reset_peak()

    def step(self) -> None:
        """One iteration: generator turn, then the fake-score turn on the generator turn's samples."""
        if self.memory is not None:
            self.memory.reset_peak()  # phase peaks count the step's own allocations
        batch = {"z": self.z, "cond": self.cond, "real": self.real, "real_cond": self.cond}  # as the trainer's: one
        with self.tf32():  # per iteration, carrying the generator turn's samples (and shared pass) to the critic turn
            self._update(self.method.generator_loss, self.opt_g, self.triad.generator_parameters(), True, batch)
            self._update(self.method.fake_score_loss, self.opt_f, self.triad.critic_parameters(), False, batch)

    def passes(self) -> dict:
        """The iteration's network passes as callables, each timed alone on the same batch."""
        tr, sched, n = self.triad, self.work.teacher.schedule, self.work.batch_size
        t = sched.sample_t(n, 0.02, 0.98, device=self.device)
        with torch.no_grad():
            x = tr.generate(self.z, self.cond).float()
        x_t = sched.add_noise(x, torch.randn_like(x), t)

        def gen_fwd_bwd():
            with self.autocast():
                out = tr.generate(self.z, self.cond)
            out.float().square().mean().backward()

        def teacher_fwd():
            with torch.no_grad(), self.autocast():
                tr.teacher(x_t, t, self.cond)

        def fake_fwd():
            with torch.no_grad(), self.autocast():
                tr.fake_score(x_t, t, self.cond)

        def fake_fwd_bwd():
            with self.autocast():
                out = tr.fake_score(x_t, t, self.cond)
            (out - x).square().mean().backward()

        def wrap(fn):
            def run():
                with self.tf32():
                    fn()
            return run

        parts = {"generator fwd+bwd": gen_fwd_bwd, "teacher fwd": teacher_fwd, "fake fwd": fake_fwd,
                 "fake fwd+bwd": fake_fwd_bwd}
        if self.shared_critic_pass:  # the critic turn's fwd+bwd is the generator turn's fake forward
            del parts["fake fwd"]
        return {k: wrap(v) for k, v in parts.items()}

    def zero_grads(self) -> None:
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_f.zero_grad(set_to_none=True)


def count_host_syncs(fn, device: torch.device) -> int | None:
    """CUDA: how many times `fn` made the host wait for the device (torch's sync debug mode: .item(), copies to the
    host, copies from pageable host memory, ...); None elsewhere."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def count_flops(runner: StepRunner) -> float:
    """Floating-point operations of one iteration (torch's flop counter; matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        runner.step()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override:
        return name, override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return name, value
    return name, None


def measure(work: Workload, variant: str, device: torch.device, *, warmup: int = 3, repeats: int = 10,
            fake_score: str = "copy", gradient_checkpointing: bool = False, attention: str = "sdpa",
            cudnn_benchmark: bool = False, ema: bool | str = True, method: str = "dmd", peak: float | None = None,
            flops: float | None = None, components: bool = False, optimizer: str = "adamw", sync: str = "auto",
            shared_critic_pass: bool = False, generator_lora: int = 0) -> dict:
    """Median step time of a variant (and, with `components`, of each pass alone, interleaved with the steps)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    runner = StepRunner(work, variant, device, fake_score, gradient_checkpointing, attention, cudnn_benchmark, ema, method,
                        optimizer, sync, shared_critic_pass=shared_critic_pass, generator_lora=generator_lora)
    if device.type == "cuda":  # from here: the weights, optimiser states, gradients and activations of training
        torch.cuda.reset_peak_memory_stats(device)
    timer = Timer(device)
    t0 = time.perf_counter()
    runner.step()  # first step: compilation, allocator warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    first_peaks, runner.phase_peaks = runner.phase_peaks, {}  # the first step also holds one-off allocations
    for _ in range(warmup - 1):
        runner.step()
    passes = runner.passes() if components else {}
    for fn in passes.values():
        fn()
    runner.zero_grads()
    times, parts = [], {k: [] for k in passes}
    for _ in range(repeats):  # interleaved, so drifts in machine load hit the step and its parts alike
        times.append(timer(runner.step))
        for k, fn in passes.items():
            parts[k].append(timer(fn))
            runner.zero_grads()
    step_s = statistics.median(times)
    runs = min(repeats, 10)  # as the trainer runs: steps back to back, the host queueing the next one's work early

    def burst():
        for _ in range(runs):
            runner.step()

    back_to_back_s = timer(burst) / runs
    host_syncs = count_host_syncs(runner.step, device)
    if flops is None:
        flops = count_flops(runner) if variant not in COMPILE_MODES else None
    card, peak_value = peak_tflops(device, peak)
    row = {"preset": work.name, "method": method, "variant": variant, "device": card, "batch": work.batch_size,
           "fake_score": fake_score, "gradient_checkpointing": gradient_checkpointing, "attention": runner.attention,
           "cudnn_benchmark": cudnn_benchmark, "ema": ema, "optimizer": optimizer, "sync": runner.sync,
           "sync_option": sync, "shared_critic_pass": shared_critic_pass, "generator_lora": generator_lora, "step_s": step_s, "img_per_s": work.batch_size / step_s, "first_step_s": first,
           "back_to_back_step_s": back_to_back_s, "back_to_back_img_per_s": work.batch_size / back_to_back_s,
           "gflop_per_step": None if flops is None else flops / 1e9,
           "tflops": None if flops is None else flops / step_s / 1e12}
    row["peak_fraction"] = None if (row["tflops"] is None or not peak_value) else row["tflops"] / peak_value
    from .optim import state_bytes

    row["optimizer_state_gib"] = (state_bytes(runner.opt_g) + state_bytes(runner.opt_f)) / 2**30
    ema = runner.triad.ema
    row["ema_device"] = None if ema is None else str(ema.shadow_params[0].device)
    row["host_syncs_per_step"] = host_syncs
    if device.type == "cuda":  # the phases reset the peak counter: the step's peak is the largest phase peak
        row["peak_mem_gib"] = max(runner.phase_peaks.values())  # steady state: the steps after the first
        row["phase_peak_gib"] = dict(runner.phase_peaks)
        row["first_step_peak_gib"] = max(first_peaks.values())  # + optimiser-state creation, cuDNN autotuning
    else:
        row["peak_mem_gib"] = None
    if variant in COMPILE_MODES:
        row["compile_s"] = first - step_s
    if components:
        med = {k: statistics.median(v) for k, v in parts.items()}
        row["passes_s"] = med
        row["step_over_passes"] = step_s / sum(med.values())
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def simulate_memory(preset: str, variant: str = "bf16", *, batch_size: int | None = None, steps: int = 3,
                    fake_score: str = "copy", gradient_checkpointing: bool = False, attention: str = "sdpa",
                    ema: bool | str = True, method: str = "dmd", optimizer: str = "adamw",
                    shared_critic_pass: bool = False, generator_lora: int = 0) -> dict:
    """Peak accelerator memory of `steps` iterations, estimated without an accelerator (onestep.memsim: fake
    tensors, CUDA's autocast rules): the same StepRunner, phases and options as `measure`, no timings. A lower bound
    of the GPU's `max_memory_allocated` (no workspaces, no allocator rounding)."""
    from .memsim import simulated_accelerator
    from .optim import state_bytes

    if steps < 2:
        raise StepBenchError(f"steps: need at least 2 (the first step, then the steady state), got {steps}")
    if variant not in SIMULATED_VARIANTS:
        raise StepBenchError(f"variant: {variant!r} cannot be simulated; choose from {', '.join(SIMULATED_VARIANTS)}")
    with simulated_accelerator() as memory:
        if preset == "digits":  # weights read from files: loaded for real, then copied to fake tensors
            with memory.real():
                work = build_workload(preset, torch.device("cuda"), batch_size)
            work.teacher = memory.fake_copy(work.teacher)
        else:
            with memory.host_allocations():  # the workload's float32 teacher stays in host memory, as in `measure`
                work = build_workload(preset, torch.device("cuda"), batch_size)  # the GPU's default batch size
        runner = StepRunner(work, variant, torch.device("cpu"), fake_score, gradient_checkpointing, attention, False,
                            ema, method, optimizer, "auto", memory=memory, shared_critic_pass=shared_critic_pass,
                            generator_lora=generator_lora)
        memory.reset_peak()
        runner.step()
        first_peaks, runner.phase_peaks = runner.phase_peaks, {}
        for _ in range(steps - 1):
            runner.step()
        row = {"preset": work.name, "method": method, "variant": variant, "device": "simulated", "batch": work.batch_size,
               "fake_score": fake_score, "gradient_checkpointing": gradient_checkpointing, "attention": runner.attention,
               "cudnn_benchmark": False, "ema": ema, "optimizer": optimizer, "sync": runner.sync, "sync_option": "auto",
               "shared_critic_pass": shared_critic_pass, "generator_lora": generator_lora,
               "step_s": None, "img_per_s": None, "first_step_s": None, "back_to_back_step_s": None,
               "back_to_back_img_per_s": None, "gflop_per_step": None, "tflops": None, "peak_fraction": None,
               "host_syncs_per_step": None, "peak_mem_gib": max(runner.phase_peaks.values()),
               "phase_peak_gib": dict(runner.phase_peaks), "first_step_peak_gib": max(first_peaks.values()),
               "optimizer_state_gib": (state_bytes(runner.opt_g) + state_bytes(runner.opt_f)) / 2**30,
               "ema_device": None if runner.triad.ema is None else ("cpu" if ema == "offload" else "accelerator")}
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def opts(r):
        o = [f"LoRA generator (rank {r['generator_lora']})"] * bool(r.get("generator_lora"))
        o += [r.get("fake_score", "copy") + " fake score"]
        o += ["grad. ckpt"] * bool(r.get("gradient_checkpointing")) + ["no EMA"] * (not r.get("ema", True))
        o += ["EMA on CPU"] * (r.get("ema") == "offload") + ["8-bit AdamW"] * (r.get("optimizer") == "adamw8bit")
        o += ["cudnn.benchmark"] * bool(r.get("cudnn_benchmark")) + [r.get("attention", "sdpa")]
        o += ["glibc malloc defaults"] * (r.get("cpu_malloc") == "system") + ["shared critic pass"] * bool(
            r.get("shared_critic_pass"))
        o += [{"host": "host-read skip", "device": "device-side skip", "logs": "logs read per turn"}[r["sync"]]] * (
            r.get("sync_option", "auto") != "auto")
        return ", ".join(o)

    head = ("| preset | method | variant | options | device | batch | img/s | step ms | TFLOP/s | of bf16 peak | peak GiB | "
            "step / passes | first step s | host syncs | img/s back to back |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        lines.append(f"| {r['preset']} | {r.get('method', 'dmd').upper()} | {r['variant']} | {opts(r)} | {r['device']} | {r['batch']} | {f(r['img_per_s'], '.1f')} | "
                     f"{f(r['step_s'] * 1e3, '.1f')} | {f(r['tflops'], '.3f')} | {f(r['peak_fraction'], '.1%')} | "
                     f"{f(r['peak_mem_gib'], '.2f')} | {f(r.get('step_over_passes'), '.3f')} | {f(r['first_step_s'], '.1f')} | "
                     f"{f(r.get('host_syncs_per_step'), 'd')} | {f(r.get('back_to_back_img_per_s'), '.1f')} |")
    return "\n".join(lines)


def memory_markdown(rows: list[dict]) -> str:
    """Peak-memory rows (measured or simulated) as a Markdown table, with the phase that holds the peak."""
    def opts(r):
        o = [f"LoRA generator (rank {r['generator_lora']})"] * bool(r.get("generator_lora"))
        o += [r.get("fake_score", "copy") + " fake score"] + ["grad. ckpt"] * bool(r.get("gradient_checkpointing"))
        o += ["shared critic pass"] * bool(r.get("shared_critic_pass"))
        o += {True: ["EMA on the device"], False: ["no EMA"], "offload": ["EMA in CPU memory"]}[r.get("ema", True)]
        return ", ".join(o + ["8-bit AdamW" if r.get("optimizer") == "adamw8bit" else "AdamW"])

    lines = ["| preset | method | variant | options | batch | device | peak GiB | first step peak GiB | "
             "optimizer state GiB | peak phase |", "|" + "---|" * 10]
    for r in rows:
        phases = r.get("phase_peak_gib") or {}
        top = max(phases, key=phases.get) if phases else "-"
        first = r.get("first_step_peak_gib")
        lines.append(f"| {r['preset']} | {r.get('method', 'dmd').upper()} | {r['variant']} | {opts(r)} | {r['batch']} | "
                     f"{r['device']} | {r['peak_mem_gib']:.2f} | {'-' if first is None else format(first, '.2f')} | "
                     f"{r['optimizer_state_gib']:.2f} | {top} |")
    return "\n".join(lines)
