#!/usr/bin/env python3
"""PyTorch side of the batchnorm-cuda benchmark.

Times PyTorch's batch norm on the rows of our `ours.json` (written by examples/gpu_bench.rs), so
both sides run the same shapes, dtypes and layouts, with the same method, and merges the two into
`comparison.json` and `comparison.md`. Without `--ours` (or when that file is missing) it times a
built-in copy of the same suite, so it can run alone.

    python3 bench/pytorch_bench.py --ours OUT/ours.json --out OUT
    python3 bench/pytorch_bench.py --out OUT [--quick] [--filter bn_fwd/f16]
    python3 bench/pytorch_bench.py --self-test     # table code on fake timings, no GPU or torch

Method (as in gpu_bench): CUDA events around each call; WARMUP untimed calls first; before every
timed run the L2 is flushed by copying a buffer of 4x the L2 into another (read and written, so
no dirty line is written back inside the timed region) and synchronizing; the median over
MIN_RUNS..MAX_RUNS runs (as many as fit in TARGET_MS of GPU time). Each batch-norm row is timed
twice: with cuDNN enabled (`torch.backends.cudnn.enabled = True`: PyTorch's own dispatch then
decides; in the versions read for ANCHORS.md it picks cuDNN only for f32, or f16 with f32
weights, on inputs of 3 or more dimensions) and with cuDNN disabled (PyTorch's native CUDA
kernels). Where the installed torch exposes `torch._C._select_batch_norm_backend`, the backend it
picks is recorded per row.

- training forward: `F.batch_norm(x, running_mean, running_var, weight, bias, training=True,
  momentum=0.1, eps=1e-5)`, no autograd graph;
- eval forward: the same with `training=False`;
- backward (training and eval): the op autograd itself calls, without autograd around it:
  `torch.ops.aten.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
  save_var, update, eps, [True] * 3, reserve)` on the outputs of one
  `torch.ops.aten._batch_norm_with_update` (training) or `_batch_norm_no_update` (eval) call made
  outside the timed region; it dispatches to cuDNN or the native kernels as autograd would;
- fused `relu(BN(x) + z)`: forward `F.batch_norm(...).add_(z).relu_()` (three kernels: eager
  PyTorch has no fused form); backward `threshold_backward(dy, y, 0)` (which is dz) then
  `batch_norm_backward` of it;
- `_graph` rows: GRAPH_CALLS calls of the op captured in one `torch.cuda.CUDAGraph` and
  replayed, warm L2, time per call: launch cost without the host;
- the statistics pass alone: training forward minus eval forward of the same row; set, like
  ours, against a read-only yardstick too (`x.sum()` over 1 GiB of f32: bytes read / time);
- group, layer, RMS and instance norm (`F.group_norm`, `F.layer_norm`, `F.rms_norm`,
  `F.instance_norm`, PyTorch's native kernels, weights cast to the input dtype where PyTorch wants
  them so): the training forward under `torch.no_grad()`, and one `torch.autograd.grad` call for
  the backward, as for batch norm;
- fold: `torch.nn.utils.fusion.fuse_conv_bn_weights` / `fuse_linear_bn_weights` under
  `torch.no_grad()` (a few elementwise ops; one row, reported as native).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

WARMUP = 3
MIN_RUNS = 20
MAX_RUNS = 200
TARGET_MS = 30.0
# Each buffer of the L2 flush: FLUSH_L2_MULTIPLE times the L2, at least MIN_FLUSH_BYTES.
FLUSH_L2_MULTIPLE = 4
MIN_FLUSH_BYTES = 64 << 20
GRAPH_CALLS = 20
COPY_BYTES = 1 << 30
COPY_RUNS = 30
EPS = 1e-5
MOMENTUM = 0.1
NORM_OPS = ("group_norm_fwd", "group_norm_bwd", "layer_norm_fwd", "layer_norm_bwd",
            "rms_norm_fwd", "rms_norm_bwd", "instance_norm_fwd", "instance_norm_bwd")
BN_OPS = ("bn_fwd", "bn_eval", "bn_bwd", "bn_eval_bwd", "bn_add_relu_fwd", "bn_add_relu_bwd")
GRAPH_OPS = ("bn_fwd_graph", "bn_eval_graph", "bn_bwd_graph")
TRAIN_EVAL = ("bn_fwd", "bn_eval", "bn_bwd")
OPS = BN_OPS + GRAPH_OPS + ("bn_fold",) + NORM_OPS
# Passes over the tensor (minimal model, practical model), as in gpu_bench's Op::passes.
PASSES = {"bn_fwd": (2, 3), "bn_fwd_single_pass": (2, 2), "bn_eval": (2, 2), "bn_bwd": (3, 5), "bn_eval_bwd": (3, 4),
          "bn_add_relu_fwd": (3, 4), "bn_add_relu_bwd": (4, 6), "bn_fold": (2, 2),
          **{op: ((3, 7) if op.endswith("_bwd") else (2, 3)) for op in NORM_OPS}}
# Passes over the fused rows' 1-bit mask (minimal, practical), as in gpu_bench's Op::bytes.
MASKS = {"bn_add_relu_fwd": (1, 1), "bn_add_relu_bwd": (1, 2)}
DTYPES = ("f32", "f16", "bf16")
SIZES = {"f32": 4, "f16": 2, "bf16": 2}

# The distinct (C, H, W) of ResNet-50's batch norms; keep in sync with examples/gpu_bench.rs.
RESNET50_CHW = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7),
]


# ------------------------------------------------------------------------------------------------
# The suite


def plain_op(op):
    """The op a graph row replays; every other op is its own."""
    return op[: -len("_graph")] if op.endswith("_graph") else op


def torch_op(op):
    """What PyTorch runs for one of our rows: the single-pass forward is its training forward."""
    return "bn_fwd" if op == "bn_fwd_single_pass" else plain_op(op)


# Largest tensor with a single-pass row; keep in sync with gpu_bench's SINGLE_PASS_MAX_BYTES.
SINGLE_PASS_MAX_BYTES = 13_000_000


def with_single_pass(dims, layout, dtype, ops):
    """ops with a bn_fwd_single_pass row after bn_fwd where gpu_bench has one (with_single_pass):
    channels-last or (N, C), at most SINGLE_PASS_MAX_BYTES."""
    single = (len(dims) == 2 or layout == "channels_last") and \
        math.prod(dims) * SIZES[dtype] <= SINGLE_PASS_MAX_BYTES
    out = []
    for op in ops:
        out.append(op)
        if single and op == "bn_fwd":
            out.append("bn_fwd_single_pass")
    return out


def dims_name(dims):
    return "x".join(str(d) for d in dims)


# The quick set, issue 16's shapes, each in one layout and dtype; keep in sync with gpu_bench's QUICK.
QUICK = [("resnet50", [256, 64, 112, 112], "channels_first", "f16"),
         ("small_c", [32, 2, 512, 512], "channels_first", "f32"),
         ("resnet50", [256, 64, 56, 56], "channels_last", "f16"),
         ("resnet50", [32, 256, 56, 56], "channels_last", "f16"),
         ("resnet50", [64, 2048, 7, 7], "channels_first", "f32"),
         ("bn1d", [100000, 32], "channels_first", "f32")]


def bn_cases(quick):
    """(suite, dims, layouts, dtypes, ops), in gpu_bench's order."""
    cases = [(suite, dims, [layout], [dtype], TRAIN_EVAL if quick else BN_OPS)
             for suite, dims, layout, dtype in QUICK]
    if quick:
        return cases

    def case(suite, dims, ops):
        layouts = ["channels_first"] if len(dims) == 2 else ["channels_first", "channels_last"]
        return (suite, dims, layouts, list(DTYPES), ops)

    for n, ops in ((32, BN_OPS), (128, TRAIN_EVAL)):
        cases += [case("resnet50", [n, c, h, w], ops) for (c, h, w) in RESNET50_CHW]
    cases += [case("small_c", d, BN_OPS) for d in ([256, 2, 112, 112], [256, 4, 112, 112],
                                                   [256, 16, 112, 112], [32, 4, 64, 64, 64],
                                                   [8, 32, 64, 64, 64])]
    cases += [case("odd_c", d, BN_OPS) for d in ([32, 100, 14, 14], [64, 255, 7, 7], [1024, 33])]
    cases += [case("wide", [256, 2048, 7, 7], TRAIN_EVAL), case("bn1d", [4096, 1024], BN_OPS)]
    cases += [case("graph", d, TRAIN_EVAL + GRAPH_OPS) for d in ([256, 512], [8, 64, 14, 14], [8, 256, 7, 7])]
    return cases


def fold_cases(quick):
    """The folds (none in the quick set)."""
    if quick:
        return []
    return [("conv", [64, 3, 7, 7], 1), ("conv", [256, 64, 1, 1], 1), ("conv", [512, 512, 3, 3], 1),
            ("conv", [2048, 1024, 1, 1], 1), ("conv", [512, 1, 3, 3], 512),
            ("conv_transpose", [512, 256, 4, 4], 1), ("linear", [1000, 2048], 1)]


def norm_cases(quick):
    """(suite, op prefix, shape, groups, layout or None); keep in sync with examples/gpu_bench/norms.rs.
    None in the quick set."""
    if quick:
        return []
    tokens = 8192
    cases = []
    for layout in ("channels_first", "channels_last"):
        cases.append(("unet", "group_norm", [2, 320, 64, 64], 32, layout))
        cases.append(("unet", "group_norm", [2, 640, 32, 32], 32, layout))
        cases.append(("unet", "group_norm", [8, 128, 128, 128], 32, layout))
    cases.append(("transformer", "layer_norm", [tokens, 4096], 1, None))
    cases.append(("transformer", "rms_norm", [tokens, 4096], 1, None))
    cases.append(("transformer", "layer_norm", [tokens, 1024], 1, None))
    cases.append(("style", "instance_norm", [16, 64, 128, 128], 64, "channels_first"))
    return cases


def default_rows(quick):
    """The rows gpu_bench would write, without its measurements."""
    rows = []
    for suite, dims, layouts, dtypes, ops in bn_cases(quick):
        for layout in layouts:
            for dtype in dtypes:
                for op in with_single_pass(dims, layout, dtype, ops):
                    rows.append({"name": f"{op}/{dtype}/{dims_name(dims)}/{layout}", "op": op,
                                 "suite": suite, "dtype": dtype, "layout": layout, "shape": dims})
    for kind, shape, groups in fold_cases(quick):
        for dtype in DTYPES:
            g = f"_g{groups}" if groups > 1 else ""
            rows.append({"name": f"bn_fold/{dtype}/{kind}{g}/{dims_name(shape)}", "op": "bn_fold",
                         "suite": "fold", "dtype": dtype, "layout": None, "shape": shape,
                         "fold_kind": kind, "groups": groups})
    for suite, prefix, shape, groups, layout in norm_cases(quick):
        for dtype in DTYPES:
            for op in (f"{prefix}_fwd", f"{prefix}_bwd"):
                tail = f"/{layout}" if layout else ""
                rows.append({"name": f"{op}/{dtype}/{dims_name(shape)}{tail}", "op": op,
                             "suite": suite, "dtype": dtype, "layout": layout, "shape": shape,
                             "groups": groups})
    return rows


def numel(shape):
    return math.prod(shape)


def fold_c_out(row):
    shape = row["shape"]
    return shape[1] * row.get("groups", 1) if row.get("fold_kind") == "conv_transpose" else shape[0]


def row_bytes(row):
    """(minimal, practical) bytes, computed the way gpu_bench does."""
    size = SIZES[row["dtype"]]
    n = numel(row["shape"])
    if row["op"] == "bn_fold":
        b = 2 * n * size + fold_c_out(row) * (16 + size)
        return b, b
    op = plain_op(row["op"])
    lo, hi = PASSES[op]
    mask_lo, mask_hi = MASKS.get(op, (0, 0))
    mask = (n + 31) // 32 * 4
    return lo * n * size + mask_lo * mask, hi * n * size + mask_hi * mask


# ------------------------------------------------------------------------------------------------
# Timing (torch imported lazily, so --self-test and --help run without it)


class Timer:
    def __init__(self, torch, method):
        self.torch = torch
        self.warmup = int(method.get("warmup", WARMUP))
        self.min_runs = int(method.get("min_runs", MIN_RUNS))
        self.max_runs = int(method.get("max_runs", MAX_RUNS))
        self.target_ms = float(method.get("target_ms_per_op", TARGET_MS))
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        self.flush_bytes = int(method.get("l2_flush_bytes") or max(FLUSH_L2_MULTIPLE * l2, MIN_FLUSH_BYTES))
        self.flush_src = torch.zeros(self.flush_bytes, dtype=torch.uint8, device="cuda")
        self.flush_dst = torch.empty_like(self.flush_src)
        self.events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       for _ in range(self.max_runs)]
        start, end = self.events[0]
        self.flush()
        start.record()
        self.flush_dst.copy_(self.flush_src)
        end.record()
        torch.cuda.synchronize()
        self.flush_ms = start.elapsed_time(end)

    def flush(self):
        """Evicts the L2: one buffer read, another written (4x the L2 each), then waits."""
        self.flush_dst.copy_(self.flush_src)
        self.torch.cuda.synchronize()

    def time(self, fn, cold=True):
        """Median, min and 90th percentile (us) of `fn` over cold-L2 runs (or back-to-back,
        warm-L2 runs with cold=False: the graph rows)."""
        torch = self.torch
        start, end = self.events[0]
        self.flush()
        start.record()
        for _ in range(self.warmup):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = start.elapsed_time(end) / self.warmup
        flush_ms = self.flush_ms if cold else 0.0
        runs = max(self.min_runs, min(self.max_runs, int(self.target_ms / (estimate + flush_ms))))
        for start, end in self.events[:runs]:
            if cold:
                self.flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in self.events[:runs]])


def summarize(ms):
    ms = sorted(ms)
    n = len(ms)
    median = ms[n // 2] if n % 2 else 0.5 * (ms[n // 2 - 1] + ms[n // 2])
    p90 = ms[min(n, max(1, math.ceil(0.9 * n))) - 1]
    return {"median_us": median * 1e3, "min_us": ms[0] * 1e3, "p90_us": p90 * 1e3, "runs": n}


def copy_bandwidth(torch):
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(WARMUP):
        dst.copy_(src)
    ms = []
    for _ in range(COPY_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    t = summarize(ms)
    del src, dst
    return 2 * COPY_BYTES / (t["median_us"] * 1e-6) / 1e9


def read_bandwidth(torch):
    """Read-only yardstick: `x.sum()` over 1 GiB of f32, bytes read / median time (GB/s)."""
    x = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device="cuda")
    for _ in range(WARMUP):
        x.sum()
    ms = []
    for _ in range(COPY_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end))
    t = summarize(ms)
    del x
    return COPY_BYTES / (t["median_us"] * 1e-6) / 1e9


def torch_dtype(torch, name):
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def make_input(torch, shape, layout, dtype, mean, std):
    """Per-channel shifted and scaled normal values (never zeros), in the row's layout."""
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    ch = torch.arange(c, device="cuda", dtype=torch.float32)
    x = torch.randn(shape, device="cuda") * std(ch).view(view) + mean(ch).view(view)
    x = x.to(dtype)
    if layout == "channels_last" and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last" and len(shape) == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def selected_backend(torch, *args):
    fn = getattr(torch._C, "_select_batch_norm_backend", None)
    if fn is None:
        return None
    try:
        return str(fn(*args)).split(".")[-1]
    except Exception:  # the private API changes between versions; the timing does not need it
        return None


def bench_bn(torch, timer, row, cudnn):
    """Times one batch-norm row with cuDNN enabled or disabled; returns (timing, backend)."""
    F = torch.nn.functional
    aten = torch.ops.aten
    shape, layout, op = row["shape"], row["layout"], row["op"]
    plain = torch_op(op)
    dtype = torch_dtype(torch, row["dtype"])
    c = shape[1]
    x = make_input(torch, shape, layout, dtype, lambda ch: (ch * 7 % 13) * 0.5 - 3.0,
                   lambda ch: 0.5 + (ch * 5 % 11) * 0.1)
    weight = torch.rand(c, device="cuda") * 0.5 + 0.75
    bias = torch.rand(c, device="cuda") - 0.5
    running_mean = torch.zeros(c, device="cuda")
    running_var = torch.ones(c, device="cuda")
    training = plain not in ("bn_eval", "bn_eval_bwd")
    mask = [True, True, True]
    with torch.backends.cudnn.flags(enabled=cudnn):
        backend = selected_backend(torch, x, weight, bias, running_mean, running_var, training, EPS)
        if plain in ("bn_fwd", "bn_eval"):
            def fn():
                F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)
        elif plain == "bn_add_relu_fwd":
            z = make_input(torch, shape, layout, dtype, lambda ch: 0.5 + 0 * ch, lambda ch: 1.0 + 0 * ch)

            def fn():
                F.batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS).add_(z).relu_()
        else:
            dy = make_input(torch, shape, layout, dtype, lambda ch: 0.1 * ((ch * 7 % 13) * 0.5 - 3.0),
                            lambda ch: torch.ones_like(ch))
            # The forward autograd would record, once, outside the timed region.
            if training:
                out, save_mean, save_var, reserve = aten._batch_norm_with_update(
                    x, weight, bias, running_mean, running_var, MOMENTUM, EPS)
            else:
                out, save_mean, save_var, reserve = aten._batch_norm_no_update(
                    x, weight, bias, running_mean, running_var, MOMENTUM, EPS)
            if plain == "bn_add_relu_bwd":
                z = make_input(torch, shape, layout, dtype, lambda ch: 0.5 + 0 * ch, lambda ch: 1.0 + 0 * ch)
                y = (out + z).relu_()

                def fn():
                    dz = aten.threshold_backward(dy, y, 0)
                    aten.batch_norm_backward(dz, x, weight, running_mean, running_var, save_mean,
                                             save_var, True, EPS, mask, reserve)
            else:
                def fn():
                    aten.batch_norm_backward(dy, x, weight, running_mean, running_var, save_mean,
                                             save_var, training, EPS, mask, reserve)
        if op.endswith("_graph"):
            timing = time_graph(torch, timer, fn)
        else:
            timing = timer.time(fn)
    return timing, backend


def time_graph(torch, timer, fn):
    """Per-call timing of GRAPH_CALLS calls of `fn` captured in one CUDA graph and replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graphs asks
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    t = timer.time(graph.replay, cold=False)
    return {k: (v / GRAPH_CALLS if k != "runs" else v) for k, v in t.items()}


def bench_norm(torch, timer, row):
    """Times one group/layer/RMS/instance norm row (PyTorch's native kernels: none of them has a
    cuDNN path): the training forward, or one autograd.grad call of its backward."""
    F = torch.nn.functional
    shape, op = row["shape"], row["op"]
    dtype = torch_dtype(torch, row["dtype"])
    x = make_input(torch, shape, row.get("layout"), dtype, lambda ch: (ch * 7 % 13) * 0.5 - 3.0,
                   lambda ch: 0.5 + (ch * 5 % 11) * 0.1)
    c = shape[1]
    weight = torch.rand(c, device="cuda") * 0.5 + 0.75
    bias = torch.rand(c, device="cuda") - 0.5
    if op.startswith("group_norm"):
        def forward():
            return F.group_norm(x, row["groups"], weight.to(dtype), bias.to(dtype), EPS)
    elif op.startswith("layer_norm"):
        def forward():
            return F.layer_norm(x, shape[1:], weight.to(dtype), bias.to(dtype), EPS)
    elif op.startswith("rms_norm"):
        def forward():
            return F.rms_norm(x, shape[1:], weight.to(dtype), EPS)
    else:
        def forward():
            return F.instance_norm(x, None, None, weight, bias, True, MOMENTUM, EPS)
    if op.endswith("_fwd"):
        def fn():
            with torch.no_grad():
                forward()
        return timer.time(fn)
    dy = make_input(torch, shape, row.get("layout"), dtype, lambda ch: 0.1 * ((ch * 7 % 13) * 0.5 - 3.0),
                    lambda ch: torch.ones_like(ch))
    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    y = forward()
    def fn():
        torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True, allow_unused=True)
    return timer.time(fn)


def bench_fold(torch, timer, row):
    from torch.nn.utils import fusion

    dtype = torch_dtype(torch, row["dtype"])
    kind, shape = row["fold_kind"], row["shape"]
    c = fold_c_out(row)
    w = (torch.randn(shape, device="cuda") * 0.05).to(dtype)
    rm = torch.rand(c, device="cuda") - 0.5
    rv = torch.rand(c, device="cuda") + 0.5
    bn_w = torch.rand(c, device="cuda") * 0.5 + 0.75
    bn_b = torch.rand(c, device="cuda") - 0.5
    if kind == "linear":
        # Older torch needs a bias tensor; the fold of a missing bias is the fold of zeros.
        lin_b = torch.zeros(c, device="cuda", dtype=dtype)

        def fn():
            with torch.no_grad():
                fusion.fuse_linear_bn_weights(w, lin_b, rm, rv, EPS, bn_w, bn_b)
    else:
        transpose = kind == "conv_transpose"

        def fn():
            with torch.no_grad():
                fusion.fuse_conv_bn_weights(w, None, rm, rv, EPS, bn_w, bn_b, transpose=transpose)
    return timer.time(fn)


# ------------------------------------------------------------------------------------------------
# Merging and writing


def geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def merge(row, ours_copy_gbs, torch_copy_gbs):
    """One comparison row from a gpu_bench row (or a default row) and the torch timings."""
    bytes_min, _ = row_bytes(row)
    ours = row.get("time_us")
    cudnn = (row.get("torch_cudnn") or {}).get("median_us")
    native = (row.get("torch_native") or {}).get("median_us")
    candidates = [(t, name) for t, name in ((cudnn, "cudnn_enabled"), (native, "cudnn_disabled"))
                  if t is not None]
    best, best_name = min(candidates) if candidates else (None, None)
    copy = ours_copy_gbs or torch_copy_gbs

    def frac(t):
        return bytes_min / (t * 1e-6) / 1e9 / copy if t and copy else None

    return {
        "name": row["name"], "op": row["op"], "suite": row.get("suite"), "dtype": row["dtype"],
        "layout": row.get("layout"), "shape": row["shape"],
        "ours_us": ours, "ours_ok": row.get("ok"), "ours_rel_err": row.get("rel_err"),
        "ours_error": row.get("error"),
        "torch_cudnn_enabled_us": cudnn, "torch_cudnn_disabled_us": native,
        "torch_backend_cudnn_enabled": row.get("torch_cudnn_backend"),
        "torch_backend_cudnn_disabled": row.get("torch_native_backend"),
        "torch_error": row.get("torch_error"),
        "best_torch_us": best, "best_torch": best_name,
        "speedup_vs_best_torch": best / ours if best and ours else None,
        "ours_frac_copy_min": frac(ours), "best_torch_frac_copy_min": frac(best),
        "bytes_min": bytes_min,
    }


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def stats_passes(merged, read_gbs, copy_gbs):
    """The statistics pass alone of every shape with a training and an eval forward: forward
    minus eval (us) for ours and each torch backend, and GB/s of its one read of x against the
    read-only and the copy yardsticks."""
    by_name = {m["name"]: m for m in merged}
    out = []
    for m in merged:
        if m["op"] != "bn_fwd":
            continue
        ev = by_name.get(m["name"].replace("bn_fwd/", "bn_eval/", 1))
        if not ev:
            continue

        def diff(key):
            a, b = m.get(key), ev.get(key)
            return a - b if a is not None and b is not None else None

        ours, cudnn, native = diff("ours_us"), diff("torch_cudnn_enabled_us"), diff("torch_cudnn_disabled_us")
        torch_best = min([t for t in (cudnn, native) if t is not None and t > 0], default=None)
        read_bytes = m["bytes_min"] / 2

        def gbs(us):
            return read_bytes / (us * 1e-6) / 1e9 if us and us > 0 else None

        def frac(us, yardstick):
            g = gbs(us)
            return g / yardstick if g and yardstick else None

        out.append({"name": m["name"].replace("bn_fwd/", "bn_stats_pass/", 1),
                    "ours_us": ours, "torch_cudnn_enabled_us": cudnn, "torch_cudnn_disabled_us": native,
                    "best_torch_us": torch_best, "ours_gbs": gbs(ours),
                    "ours_frac_read": frac(ours, read_gbs), "ours_frac_copy": frac(ours, copy_gbs),
                    "best_torch_frac_read": frac(torch_best, read_gbs)})
    return out


def write_outputs(out_dir, header, rows, fake=False):
    merged = [merge(r, header.get("ours_copy_gbs"), header.get("torch_copy_gbs")) for r in rows]
    geo = {op: geomean([m["speedup_vs_best_torch"] for m in merged if m["op"] == op]) for op in OPS}
    counts = {op: sum(1 for m in merged if m["op"] == op and m["speedup_vs_best_torch"]) for op in OPS}
    copy = header.get("ours_copy_gbs") or header.get("torch_copy_gbs")
    passes = stats_passes(merged, header.get("torch_read_gbs"), copy)
    doc = {"schema": 1, "header": header, "geomean_speedup_vs_best_torch": geo, "rows": merged,
           "stats_pass": passes}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "comparison.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    h = header
    md = []
    if fake:
        md += ["**FAKE TIMINGS: output of `--self-test`, not a measurement.**", ""]
    md += ["# batchnorm-cuda vs PyTorch", ""]
    md += [f"- date: {h.get('date')}",
           f"- device: {h.get('device')}, driver {h.get('driver')}",
           f"- torch {h.get('torch')}, CUDA {h.get('torch_cuda')}, cuDNN {h.get('cudnn')}",
           f"- ours: {h.get('ours_file') or 'not given (PyTorch only)'}"
           + (f", measured {h.get('ours_date')} on {h.get('ours_device')}" if h.get("ours_date") else ""),
           f"- copy yardstick: ours {fmt(h.get('ours_copy_gbs'), '.0f') or '-'} GB/s, "
           f"torch {fmt(h.get('torch_copy_gbs'), '.0f') or '-'} GB/s (1 GiB device-to-device, read + write); "
           f"read-only yardstick {fmt(h.get('torch_read_gbs'), '.0f') or '-'} GB/s (torch `x.sum()` over 1 GiB)",
           ""]
    md += ["Times are medians in us, CUDA events, L2 flushed before every run. `cuDNN on`: PyTorch with "
           "`cudnn.enabled = True`, its own dispatch choosing cuDNN or not (the backend column says what "
           "it chose, when torch exposes it); `cuDNN off`: PyTorch's native kernels. Speedup = best PyTorch time / our time (> 1: we are faster). "
           "% copy: minimal-model bytes (each input read once, each output written once) / time / copy "
           "bandwidth. L2 flushed before every run by a copy of 4x the L2 and a synchronize; `_graph` rows: "
           f"{GRAPH_CALLS} calls replayed from one CUDA graph on both sides, warm L2, time per call. PyTorch's "
           "backward is `aten.batch_norm_backward` called directly (what autograd calls, without autograd); "
           "its fused rows are eager `batch_norm + add_ + relu_` and `threshold_backward + batch_norm_backward`.", ""]
    md += ["## Geometric-mean speedup over the best PyTorch backend", "", "| op | rows | speedup |",
           "| --- | ---: | ---: |"]
    for op in OPS:
        if counts[op]:
            md.append(f"| {op} | {counts[op]} | {geo[op]:.2f}x |")
    md.append("")
    for op in OPS:
        op_rows = [m for m in merged if m["op"] == op]
        if not op_rows:
            continue
        md += [f"## {op}", "",
               "| name | ours us | cuDNN on us | cuDNN off us | speedup | ours % copy | best torch % copy "
               "| torch backend (cuDNN on) | ours check |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for m in op_rows:
            check = "" if m["ours_ok"] is None else ("ok" if m["ours_ok"] else "**FAILED**")
            if m["ours_error"]:
                check = "error"
            md.append(
                f"| {m['name']} | {fmt(m['ours_us'], '.1f')} | {fmt(m['torch_cudnn_enabled_us'], '.1f')} "
                f"| {fmt(m['torch_cudnn_disabled_us'], '.1f')} "
                f"| {fmt(m['speedup_vs_best_torch'], '.2f')}{'x' if m['speedup_vs_best_torch'] else ''} "
                f"| {fmt(m['ours_frac_copy_min'] and 100 * m['ours_frac_copy_min'], '.0f')} "
                f"| {fmt(m['best_torch_frac_copy_min'] and 100 * m['best_torch_frac_copy_min'], '.0f')} "
                f"| {m['torch_backend_cudnn_enabled'] or ''} | {check} |")
        md.append("")
    if passes:
        md += ["## Statistics pass alone (bn_fwd minus bn_eval)", "",
               "One read of x: % read is against the read-only yardstick, % copy against the copy one.", "",
               "| name | ours us | cuDNN on us | cuDNN off us | ours GB/s | ours % read | ours % copy | best torch % read |",
               "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p in passes:
            md.append(
                f"| {p['name']} | {fmt(p['ours_us'], '.1f')} | {fmt(p['torch_cudnn_enabled_us'], '.1f')} "
                f"| {fmt(p['torch_cudnn_disabled_us'], '.1f')} | {fmt(p['ours_gbs'], '.0f')} "
                f"| {fmt(p['ours_frac_read'] and 100 * p['ours_frac_read'], '.0f')} "
                f"| {fmt(p['ours_frac_copy'] and 100 * p['ours_frac_copy'], '.0f')} "
                f"| {fmt(p['best_torch_frac_read'] and 100 * p['best_torch_frac_read'], '.0f')} |")
        md.append("")
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write("\n".join(md))
    return doc


# ------------------------------------------------------------------------------------------------


def driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_ours(path):
    """gpu_bench's document, or None when no path was given or the file is missing."""
    if not path:
        return None
    if not os.path.exists(path):
        print(f"pytorch_bench: {path} not found (did gpu_bench run?); timing the default suite",
              file=sys.stderr)
        return None
    with open(path) as f:
        return json.load(f)


def run(args):
    started = time.monotonic()
    ours = load_ours(args.ours)
    rows = ours["rows"] if ours else default_rows(args.quick)
    if args.filter:
        rows = [r for r in rows if args.filter in r["name"]]
    try:
        import torch
    except ImportError:
        print("pytorch_bench: PyTorch is not installed (`pip install torch`); nothing to benchmark. "
              "`--self-test` checks the table code without it.", file=sys.stderr)
        return 3
    if not torch.cuda.is_available():
        print("pytorch_bench: torch sees no CUDA device; nothing to benchmark.", file=sys.stderr)
        return 3

    torch.backends.cudnn.benchmark = False
    header = {
        "date": utc_now(), "device": torch.cuda.get_device_name(0), "driver": driver_version(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": sys.version.split()[0],
        "ours_file": args.ours if ours else None,
        "ours_date": ours.get("date") if ours else None,
        "ours_device": ours.get("device") if ours else None,
        "ours_copy_gbs": ours.get("copy_gbs") if ours else None,
        "method": {"warmup": WARMUP, "min_runs": MIN_RUNS, "max_runs": MAX_RUNS,
                   "target_ms_per_op": TARGET_MS, "graph_calls": GRAPH_CALLS,
                   **((ours or {}).get("method") or {})},
    }
    torch.manual_seed(0)
    header["torch_copy_gbs"] = copy_bandwidth(torch)
    header["torch_read_gbs"] = read_bandwidth(torch)
    timer = Timer(torch, header["method"])
    header["method"]["l2_flush_bytes"] = timer.flush_bytes
    print(f"[{time.monotonic() - started:.1f} s] {header['device']}: torch copy {header['torch_copy_gbs']:.0f} GB/s, "
          f"read {header['torch_read_gbs']:.0f} GB/s; torch {header['torch']}, cuDNN {header['cudnn']}; "
          f"L2 flush {timer.flush_bytes >> 20} MiB; {len(rows)} rows")
    for row in rows:  # filled in place: the merge reads the torch_* keys
        row_started = time.monotonic()
        try:
            if row["op"] == "bn_fold":
                row["torch_native"] = bench_fold(torch, timer, row)
            elif row["op"] in NORM_OPS:
                row["torch_native"] = bench_norm(torch, timer, row)
            else:  # every batch-norm op, graph rows included
                row["torch_cudnn"], row["torch_cudnn_backend"] = bench_bn(torch, timer, row, True)
                row["torch_native"], row["torch_native_backend"] = bench_bn(torch, timer, row, False)
        except Exception as e:  # one failing row (OOM, unsupported) must not lose the others
            row["torch_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        m = merge(row, header["ours_copy_gbs"], header["torch_copy_gbs"])
        print(f"{m['name']:<48} ours {fmt(m['ours_us'], '9.1f') or '        -'} us  "
              f"cuDNN on {fmt(m['torch_cudnn_enabled_us'], '9.1f') or '        -'} us  "
              f"off {fmt(m['torch_cudnn_disabled_us'], '9.1f') or '        -'} us  "
              f"speedup {fmt(m['speedup_vs_best_torch'], '.2f') or '-'}"
              + f"  ({time.monotonic() - row_started:.1f} s)"
              + (f"  ERROR {m['torch_error']}" if m["torch_error"] else ""), flush=True)
    doc = write_outputs(args.out, header, rows)
    print("geometric-mean speedup over the best PyTorch backend: "
          + ", ".join(f"{op} {v:.2f}x" for op, v in doc["geomean_speedup_vs_best_torch"].items() if v))
    print(f"[{time.monotonic() - started:.1f} s] wrote {os.path.join(args.out, 'comparison.json')} and "
          f"{os.path.join(args.out, 'comparison.md')}")
    return 0


def self_test(ours_path=None):
    """Runs the merge and table code on fake timings in a temporary directory; no torch needed.
    With `--ours` (e.g. from `gpu_bench --dry-run`), also checks that gpu_bench's suite is this
    script's default suite, row for row, and fakes timings on its rows."""
    ours = load_ours(ours_path)
    quick = bool(ours["quick"]) if ours else True
    rows = default_rows(quick)
    if ours:
        names = [r["name"] for r in ours["rows"]]
        assert names == [r["name"] for r in rows], "gpu_bench's suite and the default suite differ"
        for mine, theirs in zip(rows, ours["rows"]):
            assert row_bytes(mine) == (theirs["bytes_min"], theirs["bytes_practical"]), mine["name"]
        rows = ours["rows"]
    for k, row in enumerate(rows):
        if row["op"] in BN_OPS + GRAPH_OPS + ("bn_fwd_single_pass",):
            row["torch_cudnn"] = {"median_us": 100.0 + k}
            row["torch_cudnn_backend"] = "Cudnn" if row["dtype"] != "bf16" else "Native"
        row["torch_native"] = {"median_us": 120.0 + k}
        row["time_us"] = None if k == 1 else 50.0 + k
        row["ok"] = k != 2
        row["error"] = "fake error" if k == 1 else None
    header = {"date": utc_now(), "device": "FAKE", "driver": None, "torch": None, "torch_cuda": None,
              "cudnn": None, "ours_copy_gbs": 3000.0, "torch_copy_gbs": 2900.0, "torch_read_gbs": 3500.0}
    with tempfile.TemporaryDirectory() as tmp:
        doc = write_outputs(tmp, header, rows, fake=True)
        with open(os.path.join(tmp, "comparison.json")) as f:
            assert json.load(f)["rows"][0]["name"] == rows[0]["name"]
        with open(os.path.join(tmp, "comparison.md")) as f:
            md = f.read()
    m0 = doc["rows"][0]
    assert m0["best_torch_us"] == 100.0 and abs(m0["speedup_vs_best_torch"] - 2.0) < 1e-12, m0
    assert doc["rows"][1]["speedup_vs_best_torch"] is None
    bytes_min = 2 * numel(rows[0]["shape"]) * SIZES[rows[0]["dtype"]]
    assert abs(m0["ours_frac_copy_min"] - bytes_min / 50e-6 / 1e9 / 3000.0) < 1e-12
    assert abs(geomean([2.0, 8.0]) - 4.0) < 1e-12 and geomean([None]) is None
    # One statistics pass per shape with both forwards; fake times: eval is 1 us after fwd.
    fwd_rows = [r for r in rows if r["op"] == "bn_fwd"]
    assert len(doc["stats_pass"]) == len(fwd_rows), doc["stats_pass"]
    assert doc["stats_pass"][0]["ours_us"] is None  # row 1 (its eval) has no time of ours
    assert doc["stats_pass"][1]["ours_us"] == -1.0 and doc["stats_pass"][1]["ours_gbs"] is None
    # Quick: issue 16's six shapes, fwd/eval/bwd each; full: every case and op of gpu_bench.
    # Plus a single-pass row right after each bn_fwd row of a small enough rows tensor.
    quick_rows = default_rows(quick=True)
    singles = [r["name"] for r in quick_rows if r["op"] == "bn_fwd_single_pass"]
    assert singles == ["bn_fwd_single_pass/f32/100000x32/channels_first"], singles
    assert [r["name"] for r in quick_rows if r["op"] != "bn_fwd_single_pass"][::3] == [
        f"bn_fwd/{dtype}/{dims_name(dims)}/{layout}" for _, dims, layout, dtype in QUICK]
    assert len(quick_rows) == 6 * 3 + 1
    bn_full = (6 * 6 + 12 * 2 * 3 * 6 + 12 * 2 * 3 * 3 + 5 * 2 * 3 * 6 + (2 * 2 + 1) * 3 * 6
               + 2 * 3 * 3 + 3 * 6 + (1 + 2 * 2) * 3 * 6)
    full_rows = default_rows(quick=False)
    full_singles = [k for k, r in enumerate(full_rows) if r["op"] == "bn_fwd_single_pass"]
    for k in full_singles:
        r, before = full_rows[k], full_rows[k - 1]
        assert before["name"] == r["name"].replace("bn_fwd_single_pass/", "bn_fwd/", 1), r["name"]
        assert len(r["shape"]) == 2 or r["layout"] == "channels_last", r["name"]
        assert numel(r["shape"]) * SIZES[r["dtype"]] <= SINGLE_PASS_MAX_BYTES, r["name"]
    assert len(full_rows) == bn_full + len(full_singles) + 7 * 3 + 10 * 3 * 2
    print(md)
    print(f"self-test passed on {len(rows)} rows" + (f" of {ours_path}" if ours else "")
          + " (fake timings above; nothing was measured)")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", help="ours.json from examples/gpu_bench.rs (its rows are timed)")
    parser.add_argument("--out", default=".", help="directory for comparison.json and comparison.md")
    parser.add_argument("--quick", action="store_true", help="small default suite (without --ours)")
    parser.add_argument("--filter", help="only rows whose name contains this text")
    parser.add_argument("--self-test", action="store_true", help="check the table code on fake timings")
    args = parser.parse_args()
    if args.self_test:
        return self_test(args.ours)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
