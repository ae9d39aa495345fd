"""Peak accelerator memory of a training step, estimated on a machine without the accelerator.

`simulated_accelerator()` runs code on fake tensors (torch's FakeTensorMode: shapes, dtypes and autograd, no data
and no arithmetic) and counts every tensor storage from its creation until it is freed, as CUDA's caching
allocator counts `memory_allocated`. The fake tensors live on the CPU device (the autograd engine needs a real CUDA
device for CUDA tensors), so mixed precision runs under the CPU's autocast with CUDA's casting rules laid on top:
the ops CUDA's autocast computes in float32 (normalisations, upsampling, losses, exp/log/pow, ...) and the
reductions it computes with a float32 result (softmax, sum, cumsum, ...) get float32 inputs, as they would on the
GPU (lists from ATen's autocast_mode.h; the lower-precision list is the CPU's, which holds the same convolutions,
matmuls and attention).

Not counted: the CUDA context, cuBLAS / cuDNN workspaces (cuDNN's autotuning in a first step can take several
GiB), allocator rounding and fragmentation (reserved minus allocated), and tensors the caller declares
host-resident (an EMA kept in CPU memory). So the figure is a lower bound of `torch.cuda.max_memory_allocated`
over the same steps (`eval/step_benchmark.py --simulate-memory`; the README compares it with H200 measurements).
A read of a value on the host (.item(), bool()) has no data to read: it gets True / 1 / 1.0, so a step's control
flow follows its finite path.
"""
from __future__ import annotations

import contextlib
import importlib.util
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

# CUDA autocast's policies beyond the lower-precision list (ATen autocast_mode.h, torch 2.11), as (op, overload):
# AT_FORALL_FP32: floating inputs cast to float32
CUDA_FP32 = tuple(tuple(e.split(".")) if "." in e else (e, "default") for e in """
acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar pow.Tensor_Tensor
pow.Scalar softplus layer_norm native_layer_norm rms_norm group_norm frobenius_norm.dim nuclear_norm nuclear_norm.dim
cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss
smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss triplet_margin_loss
multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm logsumexp upsample_nearest1d
_upsample_nearest_exact1d upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d
upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d
_upsample_bicubic2d_aa""".split())
# AT_FORALL_FP32_SET_OPT_DTYPE: computed (and returned) in float32 unless the call names a dtype
CUDA_FP32_SET_DTYPE = tuple(tuple(e.split(".")) if "." in e else (e, "default") for e in """
prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm linalg_matrix_norm
linalg_matrix_norm.str_ord sum sum.dim_IntList""".split())
_LOW = (torch.float16, torch.bfloat16)


def _eligible(a) -> bool:
    return torch.is_tensor(a) and a.dtype in _LOW


def _to32(a):
    return a.float() if _eligible(a) else a


def _kernel(op, policy: str):
    names = [a.name for a in op._schema.arguments]
    dtype_at = names.index("dtype") if "dtype" in names else None
    excluded = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        if policy == "fp32":
            args, kwargs = tree_map(_to32, (args, kwargs))
        elif args and torch.is_tensor(args[0]) and args[0].is_floating_point() and args[0].dtype != torch.float64:
            if dtype_at is not None and dtype_at < len(args):
                if args[dtype_at] is None:
                    args = args[:dtype_at] + (torch.float32,) + args[dtype_at + 1:]
            elif kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args, **kwargs)

    return kernel


@contextlib.contextmanager
def cuda_autocast_rules():
    """The CPU's autocast with CUDA's float32 policies (AutocastCPU kernels replaced while inside)."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for policy, ops in (("fp32", CUDA_FP32), ("fp32_set_opt_dtype", CUDA_FP32_SET_DTYPE)):
                for name, overload in ops:
                    op = getattr(getattr(torch.ops.aten, name), overload)
                    lib.impl(op, _kernel(op, policy), "AutocastCPU")
        yield
    finally:
        lib._destroy()


class MemoryTracker(TorchDispatchMode):
    """Bytes of every live tensor storage on `device` (shared storages counted once), and their peak."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = device
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self._host: dict[int, weakref.ref] = {}
        self._paused = False
        self.fake = None  # the FakeTensorMode it counts under (set by simulated_accelerator)

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live or key in self._host:
            return
        if self._paused:
            self._mark_host(st)
            return
        n = st.nbytes()

        def freed(_ref, key=key, n=n):
            if self._live.pop(key, None) is not None:
                self.current -= n

        self._live[key] = (weakref.ref(st, freed), n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # a host read (.item(), bool()): no data here
            return {torch.bool: True}.get(args[0].dtype, 1.0 if args[0].is_floating_point() else 1)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                self._add(t)
        return out

    def host_resident(self, tensors) -> None:
        """These tensors live in host memory on the real machine: no longer counted (nor when seen again)."""
        for t in tensors:
            key = id(t.untyped_storage())
            entry = self._live.pop(key, None)
            if entry is not None:
                self.current -= entry[1]
            self._mark_host(t.untyped_storage())

    def _mark_host(self, st) -> None:
        key = id(st)
        self._host[key] = weakref.ref(st, lambda _ref, key=key: self._host.pop(key, None))

    @contextlib.contextmanager
    def host_allocations(self):
        """Tensors created inside live in host memory on the real machine: never counted."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def reset_peak(self) -> None:
        self.peak = self.current

    @contextlib.contextmanager
    def real(self):
        """Real tensors inside (loading weights from files), counted as host memory."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily(), self.host_allocations():
            yield

    def fake_copy(self, obj):
        """A deep copy of `obj` (a module, an object holding tensors) with its tensors made fake (host memory)."""
        import copy

        from torch._subclasses.fake_tensor import FakeCopyMode, unset_fake_temporarily

        with unset_fake_temporarily(), FakeCopyMode(self.fake), self.host_allocations():
            return copy.deepcopy(obj)


class _SameModeDeepcopy(TorchFunctionMode):
    """copy.deepcopy of a fake tensor that is not a Parameter: a clone in the same fake mode (torch's default makes
    a new mode, which then cannot meet the original's tensors)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__deepcopy__:
            t, memo = args
            if id(t) not in memo:
                with torch.no_grad():
                    memo[id(t)] = t.clone()
            return memo[id(t)]
        return func(*args, **(kwargs or {}))


def _swap_fake(original):
    """torch.utils.swap_tensors for fake parameters (Module.to swaps them): without the weak-reference guard, which
    the fake mode's own bookkeeping trips."""
    from torch._subclasses.fake_tensor import FakeTensor

    def swap(t1, t2):
        if not isinstance(t1, FakeTensor):
            return original(t1, t2)
        for attr in ("__class__", "__dict__"):
            tmp = getattr(t1, attr)
            setattr(t1, attr, getattr(t2, attr))
            setattr(t2, attr, tmp)
        torch._C._swap_tensor_impl(t1, t2)

    return swap


@contextlib.contextmanager
def simulated_accelerator():
    """Fake tensors on the CPU with CUDA's autocast rules; yields the MemoryTracker counting them. Build the models,
    optimisers and batches inside, then run steps; pinning host memory is a no-op here."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = torch.utils.swap_tensors, torch.Tensor.pin_memory
    torch.utils.swap_tensors = _swap_fake(saved[0])
    torch.Tensor.pin_memory = lambda self, *a, **k: self
    tracker = MemoryTracker("cpu")
    fake = tracker.fake = FakeTensorMode()
    patched = []
    if importlib.util.find_spec("bitsandbytes") is not None:  # 8-bit AdamW's quantisation maps are built from
        import bitsandbytes.functional as bnbf  # data: computed for real, then made fake

        patched.append((bnbf, "create_dynamic_map", bnbf.create_dynamic_map))
        bnbf.create_dynamic_map = _computed_for_real(bnbf.create_dynamic_map, fake)
    try:
        with cuda_autocast_rules(), fake, _SameModeDeepcopy(), tracker:
            yield tracker
    finally:
        torch.utils.swap_tensors, torch.Tensor.pin_memory = saved
        for module, name, fn in patched:
            setattr(module, name, fn)


def _computed_for_real(fn, fake):
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            out = fn(*args, **kwargs)
        return fake.from_tensor(out)

    return wrapped
