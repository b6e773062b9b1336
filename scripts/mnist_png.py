#!/usr/bin/python3
"""Writes one MNIST image as a 28x28 grey PNG, and optionally a mask, for `diffusion sample --init/--mask`.

    scripts/mnist_png.py IDX_IMAGES INDEX OUT.png [--mask-left MASK.png]

IDX_IMAGES is an uncompressed idx3 file (e.g. data/mnist/t10k-images-idx3-ubyte); --mask-left writes a mask
that keeps the left half (white) and asks for the right half (black). Python's standard library only (zlib,
struct): the figures in docs/results.md are made with it on machines without Pillow.
"""
import argparse
import struct
import zlib


def write_png(path, rows):
    height, width = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + bytes(row) for row in rows)  # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images")
    parser.add_argument("index", type=int)
    parser.add_argument("out")
    parser.add_argument("--mask-left")
    a = parser.parse_args()
    with open(a.images, "rb") as f:
        magic, count, height, width = struct.unpack(">IIII", f.read(16))
        if magic != 0x803:
            raise SystemExit(f"{a.images}: not an idx3 file of unsigned bytes (magic {magic:#x}, expected 0x803)")
        if not 0 <= a.index < count:
            raise SystemExit(f"{a.images}: index {a.index} out of range (the file holds {count} images)")
        f.seek(16 + a.index * height * width)
        pixels = f.read(height * width)
    write_png(a.out, [pixels[r * width:(r + 1) * width] for r in range(height)])
    if a.mask_left:
        write_png(a.mask_left, [[255] * (width // 2) + [0] * (width - width // 2) for _ in range(height)])


if __name__ == "__main__":
    main()
