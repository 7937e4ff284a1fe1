"""Shared machinery of the fused optimizers: one native call per
(param group, device, dtype) per step, with address tables built once.

A *plan* caches, per param group, the validated tensors and an int64 address
table per (device, dtype) bucket (layout: csrc/common/optim_table.h). A warm
step re-reads only what can change between steps (grads, param data
pointers) and re-checks them cheaply; anything unexpected falls back to the
full checks in pyopt._checks, which raise a precise error or rebuild the plan.
"""
from __future__ import annotations

import itertools
import math
import operator

import numpy as np
import torch

from .. import _backends, _checks
from .._checks import local
from ._state import OptimizerState, ParamState


def launch(op, backend, params, grads, table, args, grad_inv_scale=1.0, device_inputs=None) -> bool:
    """Run ``<op>_step`` of the native (CPU or CUDA) or numba backend over an
    address table; False for the torch reference, which the caller runs on
    tensor lists. The CPU kernels take the grad dtype and the GradScaler
    factor; the CUDA kernels take the grad dtype with master weights (16-bit
    grads of fp32 masters) and ``device_inputs``: their capturable and
    GradScaler keywords (see FusedOptimizer._device_inputs)."""
    n = len(params)
    if backend == "native":
        if params[0].is_cuda:
            stream = torch.cuda.current_stream(params[0].device).cuda_stream
            cuda_launch(_backends.cuda_module(), op, params, grads, table, args, stream,
                        device_inputs)
        else:
            getattr(_backends.cpu_module(), f"{op}_step")(
                table.ctypes.data, n, *args, _checks.DTYPE_CODES[grads[0].dtype], grad_inv_scale,
                torch.get_num_threads())
        return True
    if backend == "numba":
        from .._numba import optim as nb
        getattr(nb, f"{op}_step")(table, n, *args, torch.get_num_threads())
        return True
    return False


def cuda_launch(module, op, params, grads, table, args, stream, device_inputs=None):
    """``<op>_step`` of a CUDA module (pyopt._C_cuda; tests/cuda_emu runs the
    same call on the host) over an address table, on ``stream``."""
    kw = dict(device_inputs or {})
    if grads[0].dtype != params[0].dtype:   # fp32 masters, 16-bit grads
        kw["grad_dtype"] = _checks.DTYPE_CODES[grads[0].dtype]
    getattr(module, f"{op}_step")(table.ctypes.data, len(params), *args, stream, **kw)


class _Bucket:
    """Tensors of one (device, dtype) within a param group, and their table."""

    __slots__ = ("pos", "params", "states", "steps", "nbytes", "strides", "table",
                 "device", "dev_index", "dtype", "backend", "pptrs", "state_ids", "getters",
                 "keep", "masks", "masked", "master", "masters", "dtensor")

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self.dev_index = device.index if device.type == "cuda" else -1
        self.pos, self.params, self.states, self.steps, self.nbytes = [], [], [], [], []
        self.strides = None   # per-param strides when some param is dense but not contiguous

    def finish(self, state_keys, grads, backend_request, extra_column, masks, master):
        # DTensor params (FSDP2) are stepped on their local shards: every
        # address and size below is the local tensor's.
        self.dtensor = any(local(p) is not p for p in self.params)
        n, k = len(self.params), len(state_keys)
        # columns: param (or its fp32 master), grad, state tensors..., step,
        # numel, mask, 16-bit param written from the master
        self.table = np.zeros((n, k + 6), dtype=np.int64)
        self.master = master
        self.masters = [st["master_param"] for st in self.states] if master else None
        self.masks = [masks.get(p) for p in self.params]
        self.masked = any(m is not None for m in self.masks)
        for i, (p, g, st, step) in enumerate(zip(self.params, grads, self.states, self.steps)):
            p, g = local(p), local(g)
            self.table[i, 0] = local(self.masters[i]).data_ptr() if master else p.data_ptr()
            self.table[i, 1] = g.data_ptr()
            for j, key in enumerate(state_keys):
                t = st.get(key)
                self.table[i, 2 + j] = 0 if t is None else local(t).data_ptr()
            self.table[i, k + 2] = extra_column(st)
            self.table[i, k + 3] = p.numel()
            self.table[i, k + 4] = 0 if self.masks[i] is None else self.masks[i].data_ptr()
            self.table[i, k + 5] = p.data_ptr() if master else 0
        lps = [local(p) for p in self.params]
        self.pptrs = [p.data_ptr() for p in lps]
        if not all(p.is_contiguous() for p in lps):
            self.strides = [p.stride() for p in lps]
        # The table holds raw state addresses. Keep their storages alive even
        # if a tensor's .data is swapped; a swapped-in tensor is noticed by the
        # state version (pyopt.optim._state) or, for plain dicts, by identity.
        self.keep = [local(t).untyped_storage() for st in self.states
                     for t in st.values() if isinstance(t, torch.Tensor)]
        self.getters = []
        if not all(type(st) is ParamState for st in self.states):
            keys = [key for key in (*state_keys, "step", "master_param")
                    if all(key in st for st in self.states)]
            self.getters = [operator.itemgetter(key) for key in keys]
        self.state_ids = self._state_ids()
        self.backend = _backends.resolve(backend_request, self.device.type)

    def _state_ids(self):
        return [list(map(id, map(get, self.states))) for get in self.getters]

    def refresh(self, ps, gs) -> bool:
        """Per-step re-check of what can change between steps: the grads, the
        params' data and the state tensors. On success the table holds this
        step's grad addresses; False sends the group through the full checks."""
        dt, dev = self.dtype, self.dev_index
        if self.dtensor:
            ps, gs = [local(p) for p in ps], [local(g) for g in gs]
        try:
            if self.strides is None:
                gptrs = [g.data_ptr() if (g.dtype is dt and g.is_contiguous() and g.nbytes == nb
                                          and g.get_device() == dev and p.data_ptr() == pp)
                         else -1 for p, g, nb, pp in zip(ps, gs, self.nbytes, self.pptrs)]
            else:
                gptrs = [g.data_ptr() if (g.dtype is dt and g.stride() == st and g.nbytes == nb
                                          and g.get_device() == dev and p.data_ptr() == pp)
                         else -1
                         for p, g, nb, pp, st in zip(ps, gs, self.nbytes, self.pptrs, self.strides)]
        except (RuntimeError, NotImplementedError):  # layouts without strides (sparse, ...)
            return False
        if -1 in gptrs:
            return False
        if self.getters and self._state_ids() != self.state_ids:
            return False
        self.table[:, 1] = gptrs
        return True


class _Plan:
    __slots__ = ("params", "flags", "buckets", "state", "state_version")

    def still_valid(self, ps, gs, flags, state) -> bool:
        if state is not self.state or getattr(state, "version", None) != self.state_version:
            return False
        if flags != self.flags or len(ps) != len(self.params) \
                or not all(map(operator.is_, ps, self.params)):
            return False
        if len(self.buckets) == 1:
            return self.buckets[0].refresh(ps, gs)
        return all(b.refresh([ps[i] for i in b.pos], [gs[i] for i in b.pos])
                   for b in self.buckets)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define STATE_KEYS, _init_state, _plan_flags,
    _check_group and _run(bucket, params, grads, group)."""

    STATE_KEYS: tuple = ()
    HAS_STEP = True      # a float32 "step" tensor per param, as torch keeps it
    _NAME = "Optimizer"
    _CPU_CAPTURABLE = False   # torch's fused Adam/AdamW accept capturable=True on the CPU

    @classmethod
    def _new_step(cls, p, group):
        """A zero step count where the kernels read it: on the param's CUDA
        device with capturable=True (as torch keeps it), else on the CPU."""
        dev = local(p).device if cls._capturable_on(local(p).device, group) else "cpu"
        return torch.zeros((), dtype=torch.float32, device=dev)

    def _uses_master(self, p, group) -> bool:
        """fp32 master weights apply to 16-bit params; fp32 params ignore the flag."""
        return self._master_weights and p.dtype in (torch.bfloat16, torch.float16)

    def _extra_column(self, st) -> int:
        """The table column after the state lists: the step tensor's address."""
        return local(st["step"]).data_ptr()

    def __init__(self, params, defaults, backend, master_weights=False):
        self._backend = _backends.requested(backend)
        # An optimizer setting, not a param-group key: param_groups stay
        # exactly torch's, and loading a torch checkpoint keeps it.
        self._master_weights = bool(master_weights)
        self._plans: dict[int, _Plan] = {}
        self._masks: dict = {}
        super().__init__(params, defaults)
        self.state = OptimizerState(self.state)

    # -- torch.optim.Optimizer hooks that invalidate cached plans ----------
    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_backend", _backends.requested(None))
        self._plans = {}
        self.__dict__.setdefault("_masks", {})
        self.__dict__.setdefault("_master_weights", False)
        self.state = OptimizerState(self.state)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plans = {}

    def __getstate__(self):
        # Plans hold raw addresses; never pickle them.
        d = dict(super().__getstate__())
        d.pop("_plans", None)
        d["_backend"] = self._backend
        d["_masks"] = self._masks
        d["_master_weights"] = self._master_weights
        return d

    def state_dict(self):
        """torch.optim's state_dict, with plain dicts (loadable with weights_only=True)."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) if isinstance(v, ParamState) else v
                       for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """torch.optim's load_state_dict. torch casts floating state to the
        param's dtype; with master weights the fp32 master and fp32 state of
        16-bit params are restored in fp32 instead."""
        super().load_state_dict(state_dict)
        if self._master_weights:
            params = [p for g in self.param_groups for p in g["params"]]
            ids = [i for g in state_dict["param_groups"] for i in g["params"]]
            for i, p in zip(ids, params):
                saved = state_dict["state"].get(i, {})
                if not self._uses_master(p, None):
                    continue
                for k, v in saved.items():
                    if (k != "step" and isinstance(v, torch.Tensor)
                            and v.dtype == torch.float32 and v.shape == p.shape):
                        self.state[p][k] = v.to(p.device, copy=True)
        self._plans = {}

    @property
    def master_weights(self) -> bool:
        """Whether bf16/fp16 params are stepped through fp32 master copies."""
        return self._master_weights

    @property
    def backend(self) -> str:
        """The requested backend ('auto', 'native', 'numba' or 'torch')."""
        return self._backend

    def backends_in_use(self) -> dict:
        """{(device, dtype): backend} for the buckets of the last step."""
        return {(str(b.device), str(b.dtype).replace("torch.", "")): b.backend
                for plan in self._plans.values() for b in plan.buckets}

    # -- step --------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step. ``closure`` re-evaluates the
        model and returns the loss, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        inv_scale, amp = 1.0, None
        if grad_scale is not None or found_inf is not None:
            amp = self._device_amp(grad_scale, found_inf)
            if amp is None:
                if self._capturing():
                    raise RuntimeError(f"{self._NAME}: a CUDA graph can capture a GradScaler step "
                                       "only with capturable=True on one CUDA device and the "
                                       "native CUDA backend (else found_inf is read on the host)")
                inv_scale = self._amp_inv_scale(grad_scale, found_inf)
                if inv_scale is None:   # found_inf: skip the step, change nothing
                    return loss
        if torch.compiler.is_compiling():
            if any(g.get("capturable") and g["params"] and g["params"][0].is_cuda
                   for g in self.param_groups):
                raise NotImplementedError("pyopt: capturable=True on CUDA is not supported inside "
                                          "torch.compile yet; step outside the compiled region "
                                          "(the step itself can be captured in a CUDA graph)")
            if inv_scale != 1.0 or self._masks or self._master_weights:
                raise NotImplementedError("pyopt: GradScaler, masks and master weights are not supported "
                                          "inside torch.compile yet; step outside the compiled region")
            # Traced: no cached addresses; each group becomes one pyopt:: op.
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                if ps:
                    for p in ps:
                        if len(self.state[p]) == 0:
                            self._init_state(p, self.state[p], group)
                    self._run_op(group, ps, [p.grad for p in ps])
            return loss
        # Validate every group before any state is created or any kernel runs,
        # so a bad argument leaves all params and state unchanged.
        work = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            params = group["params"]
            grads = [p.grad for p in params]
            if not any(map(operator.is_, grads, itertools.repeat(None))):
                ps, gs = params, grads
            else:
                ps = [p for p, g in zip(params, grads) if g is not None]
                gs = [g for g in grads if g is not None]
            if not ps:
                continue
            flags = self._plan_flags(group)
            plan = self._plans.get(gi)
            if plan is None or not plan.still_valid(ps, gs, flags, self.state):
                self._validate(gi, group, ps, gs)
                plan = None
            work.append([gi, group, flags, plan, ps, gs])
        if any(w[3] is None for w in work):
            if self._capturing():
                raise RuntimeError(f"{self._NAME}: the optimizer state must exist before a CUDA "
                                   "graph captures the step: run warm-up steps first (and keep "
                                   "the same .grad tensors), as torch's CUDA-graph recipe does")
            if type(self.state) is not OptimizerState:   # replaced wholesale by the caller
                self.state = OptimizerState(self.state)
            for w in work:
                if w[3] is None:
                    w[3] = self._plans[w[0]] = self._build_plan(w[1], w[4], w[5], w[2])
            for plan in self._plans.values():  # builds write state: re-arm every plan
                plan.state_version = self.state.version
        if self._capturing():
            for gi, group, flags, plan, ps, gs in work:
                for b in plan.buckets:
                    if not (b.backend == "native" and self._capturable_on(b.device, group)):
                        raise RuntimeError(
                            f"{self._NAME}: a CUDA graph can capture the step only with "
                            "capturable=True and the native CUDA backend; param_groups["
                            f"{gi}] has capturable={bool(group.get('capturable'))} and "
                            f"backend {b.backend!r} (see `pyopt info`)")
        for gi, group, flags, plan, ps, gs in work:
            for b in plan.buckets:
                if len(plan.buckets) == 1:
                    bps, bgs = ps, gs
                else:
                    bps, bgs = [ps[i] for i in b.pos], [gs[i] for i in b.pos]
                # The native kernels (CPU and CUDA) unscale grads, apply
                # masks and round masters into the params inside the update;
                # the numba and torch backends get the same result in extra
                # passes. (amp, read on the device, implies native CUDA.)
                fused = b.backend == "native"
                cpu_fused = fused and b.device.type == "cpu"
                bamp = amp
                if inv_scale != 1.0 and not cpu_fused:
                    if (fused and grad_scale.dtype == torch.float32
                            and grad_scale.device == b.device):
                        bamp = (grad_scale, None)   # the CUDA kernel unscales as it reads
                    else:
                        torch._foreach_mul_(bgs, inv_scale)
                host_inv = inv_scale if cpu_fused else 1.0
                if not b.master:
                    self._run(b, bps, bgs, group, host_inv, b.table, bamp)
                elif fused:   # the kernel widens the grads and rounds the masters into the params
                    self._run(b, b.masters, bgs, group, host_inv, b.table, bamp)
                else:
                    g32 = [g.float() for g in bgs]
                    table = b.table.copy()
                    table[:, 1] = [g.data_ptr() for g in g32]
                    self._run(b, b.masters, g32, group, 1.0, table, bamp)
                if b.masked and not fused:
                    self._mask_states(b)
                if b.master and not fused:
                    torch._foreach_copy_(bps, b.masters)
        return loss

    # -- AMP and masks --------------------------------------------------------
    _step_supports_amp_scaling = True   # GradScaler sets grad_scale / found_inf

    def _amp_check(self, grad_scale, found_inf):
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != 1
                                  or not t.is_floating_point()):
                raise TypeError(f"{self._NAME}: {name} must be a 1-element floating tensor")
        devices = {g["params"][0].device.type for g in self.param_groups if g["params"]}
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and t.device.type not in devices:
                raise ValueError(f"{self._NAME}: {name} is on {t.device} but the params are on "
                                 f"{', '.join(sorted(devices))}; create the GradScaler for the "
                                 "params' device, e.g. torch.amp.GradScaler('cpu')")

    def _device_amp(self, grad_scale, found_inf):
        """(grad_scale, found_inf) for the kernels to read on the device, when
        every group is capturable on one CUDA device with the native backend;
        else None and the host reads them (one synchronization per step)."""
        self._amp_check(grad_scale, found_inf)
        groups = [g for g in self.param_groups if g["params"]]
        devs = {g["params"][0].device for g in groups}
        if len(devs) != 1 or not all(self._capturable_on(next(iter(devs)), g) for g in groups):
            return None
        dev = next(iter(devs))
        if _backends.resolve(self._backend, "cuda") != "native":
            return None
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is not None and (t.dtype != torch.float32 or t.device != dev):
                raise ValueError(f"{self._NAME}: with capturable=True, {name} must be a float32 "
                                 f"tensor on {dev} (GradScaler's own), got {t.dtype} on {t.device}")
        return grad_scale, found_inf

    def _capturing(self) -> bool:
        """Whether a CUDA graph is capturing on the current stream (only asked
        when some param is on CUDA, so CPU steps never touch the CUDA API)."""
        return (any(g["params"] and g["params"][0].is_cuda for g in self.param_groups)
                and torch.cuda.is_current_stream_capturing())

    @staticmethod
    def _capturable_on(device, group) -> bool:
        """capturable=True on CUDA: the step counts live on the device and the
        native kernels read lr, grad_scale and found_inf from device memory."""
        return bool(group.get("capturable")) and device.type == "cuda"

    def _device_inputs(self, b, group, amp):
        """(host lr, keywords of the CUDA kernel or None) for one bucket.
        ``amp``: (grad_scale, found_inf) tensors, or None, for the kernel to read."""
        lr = group["lr"]
        if not (b.backend == "native" and b.device.type == "cuda"):
            return _checks.scalar(lr, "lr"), None
        if not self._capturable_on(b.device, group):
            if amp is None:
                return _checks.scalar(lr, "lr"), None
            return _checks.scalar(lr, "lr"), dict(
                grad_scale_addr=0 if amp[0] is None else amp[0].data_ptr(),
                found_inf_addr=0 if amp[1] is None else amp[1].data_ptr())
        kw = dict(capturable=True, lr_addr=0, grad_scale_addr=0, found_inf_addr=0)
        host_lr = 0.0
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
            if lr.dtype != torch.float32 or lr.device != b.device or lr.numel() != 1:
                raise ValueError(f"{self._NAME}: with capturable=True a tensor lr must be one "
                                 f"float32 element on {b.device}, got {lr.dtype} {tuple(lr.shape)} "
                                 f"on {lr.device}")
            kw["lr_addr"] = lr.data_ptr()
        else:
            host_lr = _checks.scalar(lr, "lr")
        if amp is not None:
            kw["grad_scale_addr"] = 0 if amp[0] is None else amp[0].data_ptr()
            kw["found_inf_addr"] = 0 if amp[1] is None else amp[1].data_ptr()
        return host_lr, kw

    def _amp_inv_scale(self, grad_scale, found_inf):
        """1 / grad_scale as a float, or None when found_inf says to skip
        (after _device_amp has checked both)."""
        if found_inf is not None and found_inf.item() != 0:
            return None
        if grad_scale is None:
            return 1.0
        scale = grad_scale.item()
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"{self._NAME}: grad_scale must be positive and finite, got {scale}")
        return 1.0 / scale

    def set_mask(self, param, mask):
        """Keep ``param`` pruned: after every step, positions where ``mask`` is
        False (or 0) are exact zeros in the param and in all of its optimizer
        state. ``mask`` is a bool or uint8 tensor with the param's shape,
        device and memory layout. ``mask=None`` removes it."""
        if mask is None:
            self._masks.pop(param, None)
        else:
            if not any(param is p for g in self.param_groups for p in g["params"]):
                raise ValueError(f"{self._NAME}.set_mask: the tensor is not a param of this optimizer")
            _checks.mask(param, mask, f"{self._NAME}.set_mask")
            self._masks[param] = mask
        self._plans = {}

    def _mask_states(self, b):
        for p, st, m in zip(b.params, b.states, b.masks):
            if m is None:
                continue
            drop = m.logical_not() if m.dtype == torch.bool else m.eq(0)
            p.masked_fill_(drop, 0)
            for k in (*self.STATE_KEYS, "master_param"):
                t = st.get(k)
                if isinstance(t, torch.Tensor):
                    t.masked_fill_(drop, 0)

    # -- plans ---------------------------------------------------------------
    def _validate(self, gi, group, ps, gs) -> None:
        """Full checks of one group's tensors and existing state; mutates nothing."""
        name = self._NAME
        device = None
        for i, (p, g) in enumerate(zip(ps, gs)):
            where = f"param_groups[{gi}] param {i} (shape {tuple(p.shape)})"
            _checks.param(p, where)
            _checks.grad(p, g, where, name)
            if local(p) is not p:
                _checks.param(local(p), where + " (local shard)")
                _checks.grad(local(p), local(g), where + " (local shard)", name)
            if device is None:
                device = p.device
                if group.get("capturable") and device.type == "cpu" and not self._CPU_CAPTURABLE:
                    raise ValueError(f"{name}: capturable=True needs CUDA params, as in "
                                     f"torch.optim.{name}; param_groups[{gi}] is on the CPU "
                                     "(use capturable=False there)")
            elif p.device != device:
                raise ValueError(f"{name}: all params of one group must be on one device; "
                                 f"param_groups[{gi}] has params on {device} and {p.device}")
            m = self._masks.get(p)
            if m is not None:
                _checks.mask(p, m, where)
            st = self.state.get(p)
            for k in self.STATE_KEYS if st else ():
                t = st.get(k)
                if isinstance(t, torch.Tensor) and t.shape != p.shape:
                    raise ValueError(f"{where}: state {k!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(p.shape)}")
        _backends.resolve(self._backend, device.type)  # raises if forced and unavailable

    def _build_plan(self, group, ps, gs, flags) -> _Plan:
        """Creates or normalises state, then the address tables. Call after _validate."""
        buckets: dict = {}
        for i, p in enumerate(ps):
            # Only params that end up with state get an entry, as in torch
            # (plain SGD keeps none).
            st = self.state.get(p)
            if st is None:
                st = ParamState(self.state)
            if len(st) == 0:
                self._init_state(p, st, group)
            self._normalize_state(p, st, group)
            if len(st) and p not in self.state:
                self.state[p] = st
            b = buckets.get(p.dtype)
            if b is None:
                b = buckets[p.dtype] = _Bucket(p.device, p.dtype)
            b.pos.append(i)
            b.params.append(p)
            b.states.append(st)
            b.steps.append(st.get("step"))
            b.nbytes.append(local(p).nbytes)
        plan = _Plan()
        plan.params, plan.flags = list(ps), flags
        plan.buckets = list(buckets.values())
        for b in plan.buckets:
            b.finish(self.STATE_KEYS, [gs[i] for i in b.pos], self._backend, self._extra_column,
                     self._masks, self._uses_master(b.params[0], group))
        plan.state = self.state
        return plan

    def _normalize_state(self, p, st, group):
        """State tensors must match the param's dtype, device and layout, and
        the step must be a CPU float32 scalar (where torch keeps it by default),
        since the kernels read all of them through one address table."""
        step = st.get("step")
        want = local(p).device if self._capturable_on(local(p).device, group) else torch.device("cpu")
        if not self.HAS_STEP:
            pass
        elif not isinstance(step, torch.Tensor):
            st["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32, device=want)
        elif step.device != want or step.dtype != torch.float32 or step.dim() != 0:
            st["step"] = step.detach().to(want, torch.float32).reshape(())
        dtype = p.dtype
        if self._uses_master(p, group):
            dtype = torch.float32
            if not isinstance(st.get("master_param"), torch.Tensor):
                st["master_param"] = torch.empty_like(p, dtype=dtype).copy_(p)
            keys = (*self.STATE_KEYS, "master_param")
        else:
            keys = self.STATE_KEYS
        for key in keys:
            t = st.get(key)
            if t is None:
                continue
            if (t.dtype != dtype or t.device != p.device
                    or (p.is_contiguous() and not t.is_contiguous())
                    or (not p.is_contiguous() and t.stride() != p.stride())):
                st[key] = torch.empty_like(p, dtype=dtype).copy_(t)
