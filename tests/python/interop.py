#!/usr/bin/python3
"""The Python side of the weight round trip (CTest python.*), with Debian's python3-torch.

    interop.py write DIR   the seed's ConvNet with random weights: its state_dict saved by torch.save, a
                           checkpoint dict like the seed's, the same weights as safetensors, and a fixed
                           input with the model's output (io.safetensors) for the C++ side to reproduce
    interop.py check DIR   loads the weights C++ exported (cpp.safetensors) into the seed's class and
                           checks its output against what C++ computed (cpp_io.safetensors)

safetensors is read and written here by hand (Debian 12 packages no safetensors module): an 8-byte
little-endian header length, a JSON header, the tensors' bytes.
"""
import json
import math
import struct
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- The seed's ConvNet (the post's code) ------------------------------------------------------------


class SinusoidalPositionEmbeddings(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, time):
        half_dim = self.dim // 2
        embeddings = math.log(10000) / (half_dim - 1)
        embeddings = torch.exp(torch.arange(half_dim) * -embeddings)
        embeddings = time[:, None] * embeddings[None, :]
        return torch.cat((embeddings.sin(), embeddings.cos()), dim=-1)


class ConvBlock(nn.Module):
    def __init__(self, in_ch, out_ch, time_emb_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.time_mlp = nn.Linear(time_emb_dim, out_ch)
        self.norm1 = nn.GroupNorm(8, out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)

    def forward(self, x, t):
        h = F.relu(self.norm1(self.conv1(x)))
        h = h + self.time_mlp(t)[:, :, None, None]
        return F.relu(self.norm2(self.conv2(h)))


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
        for block in (self.enc1, self.enc2, self.enc3, self.enc4, self.bottleneck, self.dec4, self.dec3, self.dec2,
                      self.dec1):
            x = block(x, t)
        return self.final(x)


# ---- safetensors ---------------------------------------------------------------------------------

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}


def save_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().contiguous().numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    start, out = 8 + size, {}
    names = {v: k for k, v in DTYPES.items()}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[start + begin:start + end]),
                                     dtype=names[entry["dtype"]]).reshape(entry["shape"])
    return out


def fixed_input():
    g = torch.Generator().manual_seed(11)
    return torch.randn(3, 1, 28, 28, generator=g), torch.tensor([0, 400, 999])


def write(out):
    torch.manual_seed(0)
    model = ConvNet().eval()
    x, t = fixed_input()
    with torch.no_grad():
        y = model(x, t)
    torch.save(model.state_dict(), f"{out}/seed_sd.pt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.save({"epoch": 7, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()},
               f"{out}/seed_ckpt.pt")
    save_safetensors(f"{out}/seed.safetensors", model.state_dict())
    save_safetensors(f"{out}/io.safetensors", {"x": x, "t": t, "y": y})
    # Training data as NumPy and PyTorch users hold it: arrays of several dtypes, one in Fortran order, and
    # a dict of examples and labels saved by torch.save. Values i * 0.25 - 3, in the array's dtype.
    import numpy as np
    values = np.arange(24, dtype=np.float64).reshape(4, 2, 3) * 0.25 - 3
    for dtype in ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8"):
        np.save(f"{out}/points_{dtype}.npy", (values if "int" not in dtype else np.arange(24).reshape(4, 2, 3)).astype(dtype))
    np.save(f"{out}/points_fortran.npy", np.asfortranarray(values))
    torch.save({"x": torch.from_numpy(values).float(), "labels": torch.tensor([0, 1, 1, 2])}, f"{out}/points.pt")
    print(f"wrote the seed ConvNet's weights ({sum(p.numel() for p in model.parameters())} parameters) to {out}")


def check(out):
    model = ConvNet().eval()
    model.load_state_dict(load_safetensors(f"{out}/cpp.safetensors"))
    io = load_safetensors(f"{out}/cpp_io.safetensors")
    with torch.no_grad():
        y = model(io["x"], io["t"])
    err = (y - io["y"]).abs().max().item()
    print(f"C++-exported weights in the seed's PyTorch ConvNet: max |y_python - y_cpp| = {err:.3g}")
    if not err <= 1e-5:
        sys.exit("python.check: the outputs differ by more than 1e-5")
    import numpy as np
    arr = np.load(f"{out}/cpp_points.npy")
    expected = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    if arr.dtype != np.float32 or arr.shape != (3, 4) or not (arr == expected).all():
        sys.exit(f"python.check: np.load read the C++ .npy file as {arr.dtype} {arr.shape}: {arr}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit("usage: interop.py write|check DIR")
    (write if sys.argv[1] == "write" else check)(sys.argv[2])
