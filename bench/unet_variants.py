#!/usr/bin/python3
"""Layout and precision variants of the main command's UNet step, timed in Python on the same LibTorch.

Issue 24 asked which of the field's CPU tricks make the UNet's bf16 training step faster here. Trying
each in C++ costs a 40 s rebuild per variant; Debian's python3-torch runs the same LibTorch (1.13 on
Debian 12), so this script rebuilds the main command's UNet (widths 16, 32, 128; blocks 1, 1, 2;
attention at 7x7; GroupNorm in float32 as include/diffusion/precision.hpp's group_norm runs it) and
times its training step (autocast bf16 forward, MSE loss, backward, AdamW) at batch 64 under each
variant, alternating, and prints the medians and the ratio to the baseline. Only ratios within one run
mean anything; Python adds a few percent of overhead to every variant alike.

Variants:
  base        as the library runs it: NCHW, GroupNorm and SiLU in float32, convolutions in bf16
  silu-bf16   SiLU on bf16 (the GroupNorm output cast to bf16 before the SiLU rather than after it)
  cl          channels-last model and input throughout
  cl-gn-nchw  channels-last convolutions, GroupNorm and SiLU on NCHW float32 (one cast-and-reorder each way)

Usage (docs/performance.md):
  MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 bench/unet_variants.py [ROUNDS] [VARIANT,...]
"""
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("base", "silu-bf16", "cl", "cl-gn-nchw")


class Variant:
    def __init__(self, name):
        self.name = name
        self.channels_last = name in ("cl", "cl-gn-nchw")

    def norm(self, norm, x):
        """GroupNorm in float32 (LibTorch 1.13 refuses bf16 input with float32 weights)."""
        if self.name == "cl-gn-nchw":
            return norm(x.to(torch.float32, memory_format=torch.contiguous_format))
        return norm(x.float())

    def to_conv(self, y):
        """What the next convolution receives."""
        if self.name == "cl-gn-nchw":
            return y.to(torch.bfloat16, memory_format=torch.channels_last)
        return y

    def norm_act(self, norm, x):
        y = self.norm(norm, x)
        if self.name == "silu-bf16":
            y = y.to(torch.bfloat16)
        return self.to_conv(F.silu(y))


class TimeEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
        args = t[:, None].float() * freqs[None]
        return torch.cat([args.sin(), args.cos()], -1)


class ResBlock(nn.Module):
    def __init__(self, v, cin, cout, time_dim, groups):
        super().__init__()
        self.v = v
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(time_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, e):
        h = self.conv1(self.v.norm_act(self.norm1, x)) + self.time(e)[:, :, None, None]
        h = self.conv2(self.v.norm_act(self.norm2, h))
        return h + (self.skip(x) if self.skip is not None else x)


class SelfAttention(nn.Module):
    def __init__(self, v, width, groups):
        super().__init__()
        self.v = v
        self.norm, self.qkv, self.proj = nn.GroupNorm(groups, width), nn.Conv2d(width, 3 * width, 1), nn.Conv2d(width, width, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, val = self.qkv(self.v.to_conv(self.v.norm(self.norm, x))).reshape(n, 3, c, h * w).unbind(1)
        a = torch.softmax(q.transpose(1, 2).bmm(k) / math.sqrt(c), -1)
        return x + self.proj(val.bmm(a.transpose(1, 2)).reshape(x.shape))


class UNet(nn.Module):
    def __init__(self, v, widths=(16, 32, 128), blocks=(1, 1, 2), time_dim=128, groups=8):
        super().__init__()
        w, top = widths, len(widths) - 1
        self.v = v
        self.time_mlp = nn.Sequential(TimeEmbedding(time_dim), nn.Linear(time_dim, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.in_conv = nn.Conv2d(1, w[0], 3, padding=1)

        def stage(cin, level):
            return nn.ModuleList([ResBlock(v, cin, w[level], time_dim, groups)] +
                                 [ResBlock(v, w[level], w[level], time_dim, groups) for _ in range(blocks[level] - 1)])

        self.down = nn.ModuleList([stage(w[0] if i == 0 else w[i - 1], i) for i in range(top)])
        self.pools = nn.ModuleList([nn.Conv2d(w[i], w[i], 3, stride=2, padding=1) for i in range(top)])
        self.mid1, self.attn, self.mid2 = stage(w[top - 1], top), SelfAttention(v, w[top], groups), stage(w[top], top)
        self.up = nn.ModuleList([stage(w[i + 1] + w[i], i) for i in range(top)])
        self.out_norm, self.out_conv = nn.GroupNorm(groups, w[0]), nn.Conv2d(w[0], 1, 3, padding=1)

    def forward(self, x, t):
        e, h, skips = self.time_mlp(t), self.in_conv(x), []
        for i, blocks in enumerate(self.down):
            for b in blocks:
                h = b(h, e)
            skips.append(h)
            h = self.pools[i](h)
        for b in self.mid1:
            h = b(h, e)
        h = self.attn(h)
        for b in self.mid2:
            h = b(h, e)
        for i in reversed(range(len(self.up))):
            h = torch.cat([F.interpolate(h, scale_factor=2, mode="nearest"), skips[i]], 1)
            for b in self.up[i]:
                h = b(h, e)
        return self.out_conv(self.v.norm_act(self.out_norm, h))


def make_step(name, batch=64):
    v = Variant(name)
    torch.manual_seed(0)
    model = UNet(v)
    x, y = torch.randn(batch, 1, 28, 28), torch.randn(batch, 1, 28, 28)
    t = torch.randint(0, 1000, (batch,))
    if v.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
        loss = (out.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def img_per_s(step, steps=10, batch=64):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main():
    usage = f"usage: {sys.argv[0]} [ROUNDS >= 1] [VARIANT,...] (variants: {', '.join(VARIANTS)})"
    if len(sys.argv) > 3 or (len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help")):
        sys.exit(usage)
    rounds = sys.argv[1] if len(sys.argv) > 1 else "3"
    if not rounds.isdigit() or int(rounds) < 1:
        sys.exit(f"ROUNDS: expected an integer >= 1, got '{rounds}'\n{usage}")
    rounds = int(rounds)
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            sys.exit(f"unknown variant '{n}' (expected {', '.join(VARIANTS)})")
    if len(set(names)) != len(names):
        sys.exit(f"a variant is named twice in '{sys.argv[2]}'")
    if "base" not in names:
        names.insert(0, "base")
    torch.set_num_threads(torch.get_num_threads() if torch.get_num_threads() > 1 else 2)
    print(f"LibTorch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, bf16 autocast; "
          f"{rounds} rounds of 10 steps per variant, alternating")
    steps = {n: make_step(n) for n in names}
    for n in names:  # warm up every variant (oneDNN primitive caches, allocator)
        for _ in range(3):
            steps[n]()
    results = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            results[n].append(img_per_s(steps[n]))
    base = statistics.median(results["base"])
    for n in names:
        m = statistics.median(results[n])
        print(f"{n:<11} median {m:7.1f} img/s  ({', '.join(f'{v:.0f}' for v in results[n])})  x{m / base:.2f} of base")


if __name__ == "__main__":
    main()
