#!/usr/bin/env python3
"""Writes the PyTorch batch-norm checkpoint that tests/state.rs reads, and the values it holds.

Outputs (in --out-dir, default tests/data):
  pytorch_bn_state.safetensors  `safetensors.torch.save_file(model.state_dict(), ...)` of a small
                                model of BatchNorm2d layers under ResNet-like prefixes
                                (`layer1.0.bn1.` ...), after a few training steps on fixed-seed
                                data, so weights, biases, running statistics and
                                num_batches_tracked are all non-trivial; one layer is float16.
  pytorch_bn_state.json         the values of that state_dict as PyTorch prints them
                                (`tensor.float().tolist()`, exact for f32 and f16), with each
                                layer's configuration, so the Rust test compares against values
                                PyTorch produced rather than against our own writer.

Backends:
  --backend torch (the default, preferred): real `torch.nn.BatchNorm2d` training steps and
      `safetensors.torch.save_file`. Needs `pip install torch safetensors numpy`.
  --backend numpy: for a machine without PyTorch. It emulates BatchNorm2d's training forward
      (batch statistics, momentum and cumulative running updates with the unbiased variance)
      and one SGD step in numpy, and writes with `safetensors.numpy.save_file`: the same key
      names, dtypes (F32 / F16 parameters, I64 scalar counter of shape []), shapes and
      `__metadata__` as the torch backend, but the values come from numpy, not from PyTorch.
      Regenerate with the torch backend wherever PyTorch is available.
  The JSON's "generator" field records which backend and version wrote the files.

Also:
  --check FILE  (torch only) loads FILE, e.g. one written by this crate's
      `StateFile::save`, into the same model with `load_state_dict(strict=True)` and compares
      every value with the JSON (exactly: the crate writes f32), proving the round trip into
      PyTorch.

Usage:
  python3 scripts/make_pytorch_checkpoint.py [--backend torch|numpy] [--out-dir tests/data]
  python3 scripts/make_pytorch_checkpoint.py --check /tmp/from_rust.safetensors
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

NAME = "pytorch_bn_state"
SEED = 0
STEPS = 3  # training steps: num_batches_tracked ends at 3
BATCH = (6, 5, 4)  # N, H, W of each training batch
LR = 0.1
EPS = 1e-5

# (prefix, num_features, affine, track_running_stats, momentum, dtype)
LAYERS = [
    ("layer1.0.bn1.", 4, True, True, 0.1, "float32"),
    # momentum=None: the cumulative average, driven by num_batches_tracked.
    ("layer1.0.bn2.", 4, False, True, None, "float32"),
    # No running statistics: the state_dict holds weight and bias only.
    ("layer2.0.bn1.", 3, True, False, 0.1, "float32"),
    # Converted with .half() after training: F16 parameters, I64 counter.
    ("layer2.0.downsample.1.", 5, True, True, 0.1, "float16"),
]

SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16"}


def batch(rng_normal, channels, step):
    """A batch with a per-channel mean and scale far from 0 and 1, so the statistics are not."""
    n, h, w = BATCH
    shift = np.arange(channels, dtype=np.float32) - 1.5 + 0.25 * step
    scale = 0.5 + 0.75 * np.arange(channels, dtype=np.float32)
    x = rng_normal((n, channels, h, w))
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def expected_json(state, generator):
    """The values of `state` (name -> numpy array) grouped per layer, plus each configuration."""
    layers = {}
    for prefix, channels, affine, track, momentum, dtype in LAYERS:
        layer = {
            "num_features": channels,
            "affine": affine,
            "track_running_stats": track,
            "momentum": momentum,
            "dtype": SAFETENSORS_DTYPE[dtype],
        }
        for name in ("weight", "bias", "running_mean", "running_var"):
            if prefix + name in state:
                layer[name] = [float(v) for v in state[prefix + name].astype(np.float32)]
        if prefix + "num_batches_tracked" in state:
            layer["num_batches_tracked"] = int(state[prefix + "num_batches_tracked"])
        layers[prefix] = layer
    return {"generator": generator, "eps": EPS, "layers": layers}


# ---------------------------------------------------------------------------- torch backend


def torch_model():
    import torch

    root = torch.nn.Module()
    for prefix, channels, affine, track, momentum, _ in LAYERS:
        *parents, leaf = prefix.rstrip(".").split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        bn = torch.nn.BatchNorm2d(
            channels, eps=EPS, momentum=momentum, affine=affine, track_running_stats=track
        )
        module.add_module(leaf, bn)
    return root


def layer_module(model, prefix):
    module = model
    for part in prefix.rstrip(".").split("."):
        module = getattr(module, part)
    return module


def make_torch(out_dir):
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(SEED)
    model = torch_model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    targets = {p: torch.randn(BATCH[0], c, BATCH[1], BATCH[2]) for p, c, *_ in LAYERS}
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = torch.zeros(())
        for prefix, channels, *_ in LAYERS:
            x = torch.from_numpy(batch(lambda shape: torch.randn(shape).numpy(), channels, step))
            y = layer_module(model, prefix)(x)
            loss = loss + (y * targets[prefix]).mean()
        loss.backward()
        optimizer.step()
    for prefix, *_, dtype in LAYERS:
        if dtype == "float16":
            layer_module(model, prefix).half()

    state = model.state_dict()
    path = os.path.join(out_dir, NAME + ".safetensors")
    save_file(state, path, metadata={"format": "pt"})

    # The file loads back into the model, strictly, with every value unchanged.
    reloaded = torch_model()
    for prefix, *_, dtype in LAYERS:
        if dtype == "float16":
            layer_module(reloaded, prefix).half()
    reloaded.load_state_dict(load_file(path), strict=True)
    for key, value in reloaded.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key

    as_numpy = {k: v.detach().cpu().numpy() for k, v in state.items()}
    return expected_json(as_numpy, f"torch {torch.__version__} (safetensors.torch.save_file)")


def check_torch(path, expected_path):
    """Loads a file (e.g. written by the crate) into the model strictly; compares with the JSON."""
    import torch
    from safetensors.torch import load_file

    with open(expected_path) as f:
        expected = json.load(f)["layers"]
    model = torch_model()
    model.load_state_dict(load_file(path), strict=True)
    for prefix, values in expected.items():
        bn = layer_module(model, prefix)
        for name in ("weight", "bias", "running_mean", "running_var"):
            tensor = getattr(bn, name)
            assert (tensor is None) == (name not in values), prefix + name
            if tensor is not None:
                got = tensor.detach().float().tolist()
                assert got == values[name], f"{prefix}{name}: {got} != {values[name]}"
        if "num_batches_tracked" in values:
            assert int(bn.num_batches_tracked) == values["num_batches_tracked"], prefix
    print(f"{path}: loads into torch {torch.__version__} with load_state_dict(strict=True); "
          f"all {len(expected)} layers match {expected_path}")


# ---------------------------------------------------------------------------- numpy backend


def make_numpy(out_dir):
    """Emulates make_torch without PyTorch: same names, dtypes, shapes and metadata; values
    from numpy's generator and a numpy BatchNorm2d training step, not from PyTorch."""
    import safetensors
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(SEED)
    normal = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    params = {}
    for prefix, channels, affine, track, _, _ in LAYERS:
        if affine:
            params[prefix + "weight"] = np.ones(channels, np.float32)
            params[prefix + "bias"] = np.zeros(channels, np.float32)
        if track:
            params[prefix + "running_mean"] = np.zeros(channels, np.float32)
            params[prefix + "running_var"] = np.ones(channels, np.float32)
            params[prefix + "num_batches_tracked"] = np.array(0, np.int64)
    targets = {p: normal((BATCH[0], c, BATCH[1], BATCH[2])) for p, c, *_ in LAYERS}
    for step in range(STEPS):
        for prefix, channels, affine, track, momentum, _ in LAYERS:
            x = batch(normal, channels, step)
            m = x.size // channels
            mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
            var = x.var(axis=(0, 2, 3), dtype=np.float64)
            if track:
                count = params[prefix + "num_batches_tracked"] + 1
                params[prefix + "num_batches_tracked"] = np.array(count, np.int64)
                factor = 1.0 / count if momentum is None else momentum
                for name, batch_value in (("running_mean", mean), ("running_var", var * m / (m - 1))):
                    old = params[prefix + name].astype(np.float64)
                    params[prefix + name] = ((1 - factor) * old + factor * batch_value).astype(np.float32)
            if affine:
                # loss = mean(y * target), y = xhat * weight + bias.
                xhat = (x - mean[None, :, None, None]) / np.sqrt(var + EPS)[None, :, None, None]
                target = targets[prefix]
                grad_w = (xhat * target).sum(axis=(0, 2, 3)) / x.size
                grad_b = target.sum(axis=(0, 2, 3)) / x.size
                params[prefix + "weight"] = (params[prefix + "weight"] - LR * grad_w).astype(np.float32)
                params[prefix + "bias"] = (params[prefix + "bias"] - LR * grad_b).astype(np.float32)
    for prefix, *_, dtype in LAYERS:
        if dtype == "float16":
            for key in list(params):
                if key.startswith(prefix) and not key.endswith("num_batches_tracked"):
                    params[key] = params[key].astype(np.float16)

    path = os.path.join(out_dir, NAME + ".safetensors")
    save_file(params, path, metadata={"format": "pt"})
    reloaded = load_file(path)
    assert reloaded.keys() == params.keys()
    for key, value in params.items():
        assert reloaded[key].dtype == value.dtype and np.array_equal(reloaded[key], value), key
    return expected_json(
        params,
        f"numpy {np.__version__} emulating torch.nn.BatchNorm2d (safetensors.numpy.save_file "
        f"{safetensors.__version__}): NOT real PyTorch; regenerate with --backend torch",
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("torch", "numpy"), default="torch")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data"))
    parser.add_argument("--check", metavar="FILE", help="load FILE into PyTorch and compare (torch only)")
    args = parser.parse_args()
    expected_path = os.path.join(args.out_dir, NAME + ".json")

    if args.check:
        check_torch(args.check, expected_path)
        return
    os.makedirs(args.out_dir, exist_ok=True)
    if args.backend == "torch":
        if importlib.util.find_spec("torch") is None:
            sys.exit("PyTorch is not installed: pip install torch, or use --backend numpy")
        expected = make_torch(args.out_dir)
    else:
        expected = make_numpy(args.out_dir)
    with open(expected_path, "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out_dir}/{NAME}.safetensors and {NAME}.json ({expected['generator']})")


if __name__ == "__main__":
    main()
