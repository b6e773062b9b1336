#!/usr/bin/env python3
"""Does this machine's PyTorch compute its CPU convolutions right? A standalone reproduction for oneDNN's or
Debian's tracker: it needs only PyTorch, and prints the platform and every case that disagrees.

Each case is a 2-D convolution (batch 16, 28x28 or 14x14, padding kernel // 2) run in float32 (forward, input
gradient, weight gradient) and in bfloat16 (forward, as CPU autocast runs it), compared with a float64
convolution of the same inputs, which PyTorch computes with its own kernels, never oneDNN. Conditions varied:
input and output channels, kernel, stride, intra-op threads, memory format (contiguous or channels-last) and
oneDNN on or off (torch.backends.mkldnn.enabled). Bounds: float32 within 1e-4 relative (rounding gives about
2e-7), bf16 within 1e-2 (the output's rounding to 8 significant bits gives at most 2^-9).

    python3 scripts/probe-onednn.py            # exit 0: every case agrees; 1: some disagree (listed)
    python3 scripts/probe-onednn.py --quick    # the shapes of diffusion's own self-check only
    scripts/probe-onednn.sh                    # installs Debian's python3-torch if missing, then runs this
    scripts/test-debian13.sh scripts/probe-onednn.sh   # the same inside the Debian 13 root (PyTorch 2.6)

Seen on an AMD EPYC of family 26 (Zen 5) with Debian 13's PyTorch 2.6.0+dfsg-7 and oneDNN 3.7.2: non-finite
input gradients for few output channels at 2 threads, and a bf16 forward into 1 channel 35% off. See
docs/platforms.md in the diffusion repository.
"""
import argparse
import itertools
import os
import platform
import re
import subprocess
import sys

import torch
import torch.nn.functional as F


def cpu_facts():
    facts = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                facts[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(facts.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"]
    return {
        "cpu": facts.get("model name", platform.processor() or "unknown"),
        "family": facts.get("cpu family", "?"),
        "model": facts.get("model", "?"),
        "stepping": facts.get("stepping", "?"),
        "microcode": facts.get("microcode", "?"),
        "flags": " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted),
    }


def lscpu_caches():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu not available"
    return "; ".join(re.sub(r"\s+", " ", l.strip()) for l in out.splitlines() if re.match(r"\s*L[123]\w* cache", l))


def onednn_version():
    m = re.search(r"(?:MKL-DNN|oneDNN) v([0-9][^ \n]*)", torch.__config__.show())
    return m.group(1) if m else "none"


def rel(got, want):
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def run_case(shape, threads, channels_last, mkldnn, bf16_ok, gen):
    n, cin, cout, size, k, stride = shape
    x = torch.randn(n, cin, size, size, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen)
    # The reference, in float64 on the bf16-rounded inputs (rounding them changes x by at most 2^-9).
    xr, wr, br = (t.bfloat16().float() for t in (x, w, b))
    xd, wd = xr.double().requires_grad_(), wr.double().requires_grad_()
    yd = F.conv2d(xd, wd, br.double(), stride=stride, padding=k // 2)
    gy = torch.randn(yd.shape, generator=gen)
    yd.backward(gy.double())
    errors = {}
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = mkldnn
    try:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xf = xr.clone().to(memory_format=fmt).requires_grad_()
        wf = wr.clone().to(memory_format=fmt).requires_grad_()
        y = F.conv2d(xf, wf, br, stride=stride, padding=k // 2)
        y.backward(gy.to(memory_format=fmt) if channels_last else gy)
        errors["fp32 forward"] = (rel(y.detach(), yd.detach()), 1e-4)
        errors["fp32 input gradient"] = (rel(xf.grad, xd.grad), 1e-4)
        errors["fp32 weight gradient"] = (rel(wf.grad, wd.grad), 1e-4)
        if bf16_ok:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                yb = F.conv2d(xr.to(memory_format=fmt), wr.to(memory_format=fmt), br, stride=stride, padding=k // 2)
            errors["bf16 forward"] = (rel(yb, yd.detach()), 1e-2)
    finally:
        torch.backends.mkldnn.enabled = True
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the shapes of diffusion's own self-check")
    parser.add_argument("--verbose", action="store_true", help="print every case, not only those that disagree")
    args = parser.parse_args()

    cpu = cpu_facts()
    cores = os.cpu_count() or 1
    bf16_ok = "avx512_bf16" in cpu["flags"] or "amx_bf16" in cpu["flags"]
    print(f"cpu: {cpu['cpu']} (family {cpu['family']}, model {cpu['model']}, stepping {cpu['stepping']}, "
          f"microcode {cpu['microcode']}); {cores} cores; flags: {cpu['flags']}")
    print(f"caches: {lscpu_caches()}")
    print(f"torch {torch.__version__}, oneDNN {onednn_version()}, python {platform.python_version()}, "
          f"{platform.platform()}")
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "ONEDNN_", "DNNL_", "OPENBLAS_", "MKL"))}
    print(f"environment: {env or 'no OMP_/ONEDNN_/DNNL_/OPENBLAS_/MKL variables'}")
    if not bf16_ok:
        print("bf16 cases skipped: this CPU has no bf16 instructions")

    threads = sorted({1, 2, cores})
    if args.quick:
        shapes = [(16, 32, 1, 28, 3, 1), (16, 16, 1, 28, 3, 1), (16, 64, 1, 28, 3, 1), (16, 32, 3, 28, 3, 1),
                  (16, 32, 32, 14, 3, 1)]
        grid = itertools.product(shapes, threads, [False], [True])
    else:
        shapes = [(16, cin, cout, 28 if cout < 32 else 14, k, s)
                  for cin, cout, k, s in itertools.product([16, 32, 64], [1, 2, 3, 4, 8, 16, 32], [1, 3], [1, 2])]
        grid = itertools.product(shapes, threads, [False, True], [True, False])
    gen = torch.Generator().manual_seed(0)
    failures, total = [], 0
    for shape, n, channels_last, mkldnn in grid:
        errors = run_case(shape, n, channels_last, mkldnn, bf16_ok, gen)
        for what, (err, bound) in errors.items():
            total += 1
            where = (f"{what:21s} mb{shape[0]} ic{shape[1]:<3d} oc{shape[2]:<3d} {shape[3]}x{shape[3]} k{shape[4]} "
                     f"s{shape[5]} threads {n} {'nhwc' if channels_last else 'nchw'} "
                     f"oneDNN {'on ' if mkldnn else 'off'}")
            verdict = "not finite" if err == float("inf") else f"rel err {err:.1e}"
            if not err <= bound:
                failures.append(where)
                print(f"WRONG  {where}: {verdict} (bound {bound:g})")
            elif args.verbose:
                print(f"ok     {where}: {verdict}")
    print(f"{len(failures)} of {total} results disagree with float64")
    if failures:
        for key in ["threads 1", "oneDNN off", "nhwc", "bf16"]:
            print(f"  with '{key}': {sum(key in f for f in failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
