"""Codec primitives from FFmpeg's exported motion vectors: per-frame motion fields, their fusion
over a step, `warp` and the residual. Conventions are docs/architecture.md §3's:

- `mv[y, x] = (dx, dy)`: position in the later frame minus the position of the same content in the
  earlier one. FFmpeg exports `src = dst + motion / motion_scale` with `dst` the block centre, so
  one block's displacement is `dst - src = -motion / motion_scale`.
- `warp(prev, mv)[p] = prev[nearest(p - mv[p])]`, coordinates clamped to the frame.
- `residual = rgb - warp(prev_rgb, mv)` in int16.
"""

from __future__ import annotations

import numpy as np

# Fields are kept per CELL x CELL pixels: the finest partition MPEG-4 Part 2 codes (4MV mode).
CELL = 8


def block_motion(vectors: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """One frame's exported vectors (AVMotionVector records) -> float32 [height/CELL, width/CELL, 2].

    Cells that no vector covers (intra blocks) get 0. Only forward prediction is accepted: the
    canonical stream has no B-frames, so a vector with a future reference means a broken stream.
    """
    field = np.zeros((height // CELL, width // CELL, 2), np.float32)
    if vectors is None or len(vectors) == 0:
        return field
    if np.any(vectors["source"] > 0):
        raise ValueError("motion vector referencing a future frame in a stream without B-frames")
    scale = vectors["motion_scale"].astype(np.float32)
    displacement = np.stack([-vectors["motion_x"] / scale, -vectors["motion_y"] / scale], axis=-1)
    if (vectors["w"] == 16).all() and (vectors["h"] == 16).all() and height % 16 == 0 and width % 16 == 0:
        # Fast path, the canonical stream's only partition (no 4MV): fill 16 px blocks, then split.
        coarse = np.zeros((height // 16, width // 16, 2), np.float32)
        coarse[(vectors["dst_y"] - 8) // 16, (vectors["dst_x"] - 8) // 16] = displacement
        return coarse.repeat(16 // CELL, axis=0).repeat(16 // CELL, axis=1)
    for block_w, block_h in set(zip(vectors["w"].tolist(), vectors["h"].tolist())):
        pick = (vectors["w"] == block_w) & (vectors["h"] == block_h)
        left = (vectors["dst_x"][pick] - block_w // 2) // CELL
        top = (vectors["dst_y"][pick] - block_h // 2) // CELL
        rows = np.clip(top[:, None, None] + np.arange(max(block_h // CELL, 1))[None, :, None], 0, field.shape[0] - 1)
        cols = np.clip(left[:, None, None] + np.arange(max(block_w // CELL, 1))[None, None, :], 0, field.shape[1] - 1)
        field[rows, cols] = displacement[pick][:, None, None, :]
    return field


def _nearest(coordinate: np.ndarray, size: int) -> np.ndarray:
    """Nearest pixel index, clamped: round half up (not numpy's half-to-even), so +0.5 and -0.5
    displacements resolve the same way everywhere."""
    return np.clip(np.floor(coordinate + 0.5), 0, size - 1).astype(np.intp)


# Back-tracing works in exact integer quarter-pixels: MPEG-4 Part 2 vectors are half- or quarter-pel.
SUBPEL = 4


def _cell_lookup(size: int, stride: int) -> np.ndarray:
    """Quarter-pel coordinate -> index of the cell holding its nearest pixel (times `stride`).

    Used with `np.take(mode="clip")`, which clamps coordinates outside the frame to the edge cells.
    """
    quarter = np.arange(size * SUBPEL)
    nearest_pixel = np.minimum((quarter + SUBPEL // 2) // SUBPEL, size - 1)
    return ((nearest_pixel // CELL) * stride).astype(np.int32)


def fuse(fields: list[np.ndarray], height: int, width: int, block: int = 1) -> np.ndarray:
    """Back-traces pixels of the last frame through `fields` (oldest first, each the motion of a
    frame relative to the one before) and returns their total displacement, float32
    [H / block, W / block, 2]: one trace per block x block tile, from the tile's pixel
    (block // 2, block // 2), shared by the whole tile (`block=1`: every pixel).

    CoViAR-style accumulation (paper §3.2): a pixel follows its cell's vector into the previous
    frame, then that frame's vector at the nearest pixel of the new position, and so on. An intra
    cell contributes zero motion for its frame, so a pixel intra in every fused frame gets 0.
    """
    if height % block or width % block:
        raise ValueError(f"fuse: {height}x{width} is not a multiple of block {block}")
    rows, cols = np.meshgrid(np.arange(block // 2, height, block, dtype=np.int32) * SUBPEL,
                             np.arange(block // 2, width, block, dtype=np.int32) * SUBPEL, indexing="ij")
    x, y = cols.copy(), rows.copy()
    row_cells, col_cells = _cell_lookup(height, width // CELL), _cell_lookup(width, 1)
    cell = np.empty_like(x)
    step = np.empty_like(x)
    for field in reversed(fields):
        if not field.any():
            continue
        quarter = np.rint(field * SUBPEL).astype(np.int32)
        if not np.array_equal(quarter, field * SUBPEL):
            raise ValueError("motion vectors finer than quarter-pel")
        np.take(row_cells, y, out=cell, mode="clip")
        cell += np.take(col_cells, x, mode="clip")
        np.take(quarter[..., 0], cell, out=step)
        x -= step
        np.take(quarter[..., 1], cell, out=step)
        y -= step
    return np.stack([cols - x, rows - y], axis=-1).astype(np.float32) / SUBPEL


def upsample(mv_blocks: np.ndarray, block: int) -> np.ndarray:
    """[h, w, 2] per-tile motion -> [h * block, w * block, 2] per-pixel motion (each tile shares one)."""
    return mv_blocks if block == 1 else np.repeat(np.repeat(mv_blocks, block, axis=0), block, axis=1)


def warp(prev: np.ndarray, mv: np.ndarray) -> np.ndarray:
    """Motion-compensated prediction of the later frame: `prev[nearest(p - mv[p])]` (docs/architecture.md §3).

    prev: [H, W, C]; mv: float [H, W, 2] as (dx, dy). Returns an array like `prev`.
    """
    height, width = prev.shape[:2]
    if mv.shape != (height, width, 2):
        raise ValueError(f"warp: mv has shape {mv.shape}, expected {(height, width, 2)}")
    rows, cols = np.mgrid[0:height, 0:width]
    source_rows = _nearest(rows - mv[..., 1], height)
    source_cols = _nearest(cols - mv[..., 0], width)
    return prev[source_rows, source_cols]


def residual(rgb: np.ndarray, prev_rgb: np.ndarray, mv: np.ndarray) -> np.ndarray:
    """What motion compensation leaves to explain: int16 [H, W, 3]."""
    return rgb.astype(np.int16) - warp(prev_rgb, mv).astype(np.int16)


def reconstruct(prev_rgb: np.ndarray, mv: np.ndarray, residual_: np.ndarray) -> np.ndarray:
    """Inverse of `residual`: warp(prev, mv) + residual, clipped to uint8."""
    return np.clip(warp(prev_rgb, mv).astype(np.int16) + residual_, 0, 255).astype(np.uint8)


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images (inf when identical)."""
    mse = np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
