"""Image grids as PNG files with the standard library only (zlib), so the CLI needs no imaging package."""

from __future__ import annotations

import math
import os
import struct
import zlib

import torch


def grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] → one (C, rows·(H+pad)+pad, cols·(W+pad)+pad) uint8 grid, black gaps."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be (N, 1 or 3, H, W) with N >= 1, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    out = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        out[:, y : y + h, x : x + w] = pixels[i]
    return out


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png(path: str | os.PathLike[str], images: torch.Tensor, columns: int = 8) -> None:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one grayscale (C = 1) or RGB (C = 3) PNG grid."""
    g = grid(images, columns)  # (C, H, W)
    c, h, w = g.shape
    rows = g.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    # Filter type 0 (none) before every scanline, 8 bits per sample (PNG spec, section 9).
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + body)
