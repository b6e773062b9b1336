#!/usr/bin/python3
"""The seed's own PyTorch script, timed the way diffusion_bench times the library.

The models, calc_x_t, the training step, calc_x_t_minus_one and the DataLoader (torchvision MNIST,
ToTensor + Normalize, batch 128, shuffle, num_workers=4) are the seed post's code, unchanged; only the
timing around them is added. Run it with Debian's python3-torch (LibTorch 1.13.1, the same as the
library's) and the same thread count:

    /usr/bin/python3 bench/seed_bench.py --data data/mnist --threads 2

--bf16 wraps the model calls in torch.autocast('cpu', dtype=torch.bfloat16), the library's Precision::BFloat16
in Python, to compare like with like. The seed's ConvNet cannot run that way on LibTorch 1.13: its GroupNorm
receives bf16 activations beside float32 weights and raises; the script reports that instead of a number.
"""
import argparse
import json
import math
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

device = torch.device('cpu')

# ---- The seed's code, verbatim but for `device` above -------------------------------------------


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        embeddings = math.log(10000) / (half_dim - 1)
        embeddings = torch.exp(torch.arange(half_dim, device=device) * -embeddings)
        embeddings = time[:, None] * embeddings[None, :]
        embeddings = torch.cat((embeddings.sin(), embeddings.cos()), dim=-1)
        return embeddings


class ConvBlock(nn.Module):
    def __init__(self, in_ch, out_ch, time_emb_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        self.norm1 = nn.GroupNorm(8, out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)

    def forward(self, x, t):
        h = self.conv1(x)
        h = self.norm1(h)
        h = F.relu(h)
        time_emb = self.time_mlp(t)
        time_emb = time_emb[:, :, None, None]
        h = h + time_emb
        h = self.conv2(h)
        h = self.norm2(h)
        h = F.relu(h)
        return h


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        time_dim = 256
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(time_dim), nn.Linear(time_dim, time_dim), nn.ReLU())
        self.enc1 = ConvBlock(1, 32, time_dim)
        self.enc2 = ConvBlock(32, 64, time_dim)
        self.enc3 = ConvBlock(64, 128, time_dim)
        self.enc4 = ConvBlock(128, 256, time_dim)
        self.bottleneck = ConvBlock(256, 256, time_dim)
        self.dec4 = ConvBlock(256, 128, time_dim)
        self.dec3 = ConvBlock(128, 64, time_dim)
        self.dec2 = ConvBlock(64, 32, time_dim)
        self.dec1 = ConvBlock(32, 32, time_dim)
        self.final = nn.Conv2d(32, 1, 1)

    def forward(self, x, t):
        t = self.time_mlp(t)
        x = self.enc1(x, t)
        x = self.enc2(x, t)
        x = self.enc3(x, t)
        x = self.enc4(x, t)
        x = self.bottleneck(x, t)
        x = self.dec4(x, t)
        x = self.dec3(x, t)
        x = self.dec2(x, t)
        x = self.dec1(x, t)
        return self.final(x)


class SmolMLP(nn.Module):
    def __init__(self):
        super().__init__()
        time_dim = 256
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(time_dim), nn.Linear(time_dim, time_dim), nn.ReLU())
        self.fc1 = nn.Linear(28*28 + time_dim, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 512)
        self.fc4 = nn.Linear(512, 28*28)

    def forward(self, x, t):
        batch_size = x.shape[0]
        t = self.time_mlp(t)
        x_flat = x.view(batch_size, -1)
        x = torch.cat([x_flat, t], dim=1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = self.fc4(x)
        return x.view(batch_size, 1, 28, 28)


class ChunkyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        time_dim = 256
        self.time_mlp = nn.Sequential(SinusoidalPositionEmbeddings(time_dim), nn.Linear(time_dim, time_dim), nn.ReLU())
        self.fc1 = nn.Linear(28*28 + time_dim, 2048)
        self.fc2 = nn.Linear(2048, 2048)
        self.fc3 = nn.Linear(2048, 2048)
        self.fc4 = nn.Linear(2048, 2048)
        self.fc5 = nn.Linear(2048, 2048)
        self.fc6 = nn.Linear(2048, 28*28)

    def forward(self, x, t):
        batch_size = x.shape[0]
        t = self.time_mlp(t)
        x_flat = x.view(batch_size, -1)
        x = torch.cat([x_flat, t], dim=1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = F.relu(self.fc4(x))
        x = F.relu(self.fc5(x))
        x = self.fc6(x)
        return x.view(batch_size, 1, 28, 28)


T = 1000
beta_start = 1e-4
beta_end = 0.02
batch_size = 128
lr = 1e-3

betas = torch.linspace(beta_start, beta_end, T).to(device)
alphas = 1 - betas
alphas_cumprod = torch.cumprod(alphas, dim=0)
sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
sqrt_one_minus_alphas_cumprod = torch.sqrt(1 - alphas_cumprod)
alphas_cumprod_prev = torch.cat([torch.ones(1).to(device), alphas_cumprod[:-1]])
sqrt_recip_alphas = torch.sqrt(1.0 / alphas)
posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)


def calc_x_t(x_0, t, noise=None):
    if noise is None:
        noise = torch.randn_like(x_0)
    sqrt_alphas_cumprod_t = sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus_alphas_cumprod_t = sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return sqrt_alphas_cumprod_t * x_0 + sqrt_one_minus_alphas_cumprod_t * noise


def calc_x_t_minus_one(model, x_t, t, t_index):
    betas_t = betas[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus_alphas_cumprod_t = sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sqrt_recip_alphas_t = sqrt_recip_alphas[t].reshape(-1, 1, 1, 1)
    model_mean = sqrt_recip_alphas_t * (x_t - betas_t * model(x_t, t) / sqrt_one_minus_alphas_cumprod_t)
    if t_index == 0:
        return model_mean
    else:
        posterior_variance_t = posterior_variance[t].reshape(-1, 1, 1, 1)
        noise = torch.randn_like(x_t)
        return model_mean + torch.sqrt(posterior_variance_t) * noise

# ---- Timing ------------------------------------------------------------------------------------


def bench(name, model_cls, dataloader, args):
    model = model_cls().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    times = []
    it = iter(dataloader)
    last = time.perf_counter()
    for step in range(args.warmup + args.steps):
        # The body of the seed's training loop; fetching the next batch is part of its cost.
        x, _ = next(it)
        x = x.to(device)
        optimizer.zero_grad()
        t = torch.randint(0, T, (x.shape[0],), device=device).long()
        noise = torch.randn_like(x)
        x_noisy = calc_x_t(x, t, noise)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
            predicted_noise = model(x_noisy, t)
        loss = F.mse_loss(predicted_noise.float(), noise)
        loss.backward()
        optimizer.step()
        _ = loss.item()
        now = time.perf_counter()
        if step >= args.warmup:
            times.append(now - last)
        last = now
    train = batch_size / statistics.median(times)

    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=args.bf16):
        x = torch.randn(25, 1, 28, 28).to(device)
        t = torch.full((25,), 500, device=device, dtype=torch.long)
        calc_x_t_minus_one(model, x, t, 500)
        rev = []
        for _ in range(args.reverse_steps):
            t0 = time.perf_counter()
            x = calc_x_t_minus_one(model, x, t, 500).float()
            rev.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(backbone=name, precision='bf16' if args.bf16 else 'fp32', parameters=params, train_img_per_s=train, reverse_step_s=statistics.median(rev),
                full_sample_s=1000 * statistics.median(rev), full_sample='extrapolated', peak_rss_mib=rss)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='data/mnist', help='directory with the raw MNIST idx files')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--backbones', default='conv,smol,chunky')
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--reverse-steps', type=int, default=5)
    p.add_argument('--bf16', action='store_true', help="autocast the model calls to bfloat16 (torch.autocast('cpu'))")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    # torchvision reads ROOT/MNIST/raw/<idx files>; point it at ours instead of downloading.
    root = tempfile.mkdtemp()
    os.makedirs(os.path.join(root, 'MNIST', 'raw'))
    for f in os.listdir(args.data):
        os.symlink(os.path.abspath(os.path.join(args.data, f)), os.path.join(root, 'MNIST', 'raw', f))
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.MNIST(root, train=True, download=False, transform=transform)
    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=4)

    print(f'seed script, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch_size}, '
          f'{args.steps} timed steps (median), {"bf16 autocast" if args.bf16 else "fp32"}')
    models = {'conv': ConvNet, 'smol': SmolMLP, 'chunky': ChunkyMLP}
    for name in args.backbones.split(','):
        try:
            r = bench(name, models[name], dataloader, args)
        except RuntimeError as e:
            print(f"{name:<8} fails: {str(e).splitlines()[0]}")
            print(json.dumps(dict(backbone=name, precision='bf16' if args.bf16 else 'fp32', error=str(e).splitlines()[0])))
            continue
        print(f"{name:<8} {r['parameters']:>10} params  train {r['train_img_per_s']:8.1f} img/s  "
              f"reverse step(25) {r['reverse_step_s']:.4f} s")
        print(json.dumps(r))


if __name__ == '__main__':
    main()
