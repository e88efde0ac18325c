"""Built-in synthetic training and test data: procedural textured 3-D scenes (a room with boxes)
rendered from two camera poses with exact depth, intrinsics and relative pose. Nothing to download.

Rendering is closed-form ray casting of textured quads, vectorised in numpy: per pixel and quad the
ray-plane depth and texture coordinates, a z-buffer across quads, then one texture lookup per quad.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass
class Quad:
    """A textured parallelogram: points ``origin + a * u + b * v`` for a, b in [0, 1].

    Its texture is entry ``texture`` of the texture bank, tiled ``repeats`` times along u and v, read from
    a random ``offset`` with optionally swapped axes and inverted intensities, times ``shade``.
    """

    origin: np.ndarray  # (3,)
    u: np.ndarray  # (3,)
    v: np.ndarray  # (3,)
    texture: int
    repeats: tuple[float, float]
    offset: tuple[float, float]
    swap: bool
    invert: bool
    shade: float


# ----------------------------------------------------------------------------------------------- textures
def pink_noise(size: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """1/f^exponent noise ``(size, size)`` in [0, 1]: detail at every scale, like natural images."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape)) / radius**exponent
    spectrum[0, 0] = 0.0
    img = np.fft.irfft2(spectrum, s=(size, size))
    img = (img - img.min()) / (np.ptp(img) + 1e-9)
    return img.astype(np.float32)


def draw_shapes(img: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Random filled / outlined circles, rectangles, polygons and lines of several sizes, in place."""
    s = img.shape[0]
    for _ in range(count):
        color = float(rng.random())
        kind = rng.integers(4)
        size = int(s * rng.choice([0.02, 0.05, 0.1, 0.2]))
        cx, cy = (int(c) for c in rng.integers(0, s, 2))
        thick = -1 if rng.random() < 0.6 else int(rng.integers(1, 4))
        if kind == 0:
            cv2.circle(img, (cx, cy), max(size, 1), color, thick, cv2.LINE_AA)
        elif kind == 1:
            cv2.rectangle(img, (cx, cy), (cx + size, cy + int(size * rng.uniform(0.3, 2))), color, thick, cv2.LINE_AA)
        elif kind == 2:
            pts = (np.array([cx, cy]) + rng.normal(0, size, (int(rng.integers(3, 7)), 2))).astype(np.int32)
            cv2.fillPoly(img, [pts], color, cv2.LINE_AA) if thick < 0 else cv2.polylines(img, [pts], True, color, 2)
        else:
            end = (cx + int(rng.normal(0, 2 * size)), cy + int(rng.normal(0, 2 * size)))
            cv2.line(img, (cx, cy), end, color, int(rng.integers(1, 4)), cv2.LINE_AA)


def periodic_pattern(size: int, rng: np.random.Generator) -> np.ndarray:
    """Stripes or a checkerboard with a random period and angle, in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 40)
    coord = (x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period
    if rng.random() < 0.5:
        return 0.5 + 0.5 * np.sign(np.sin(coord)) * np.sign(np.sin((-x * np.sin(angle) + y * np.cos(angle)) * 2 * np.pi / period))
    return (0.5 + 0.5 * np.sin(coord)).astype(np.float32)


def random_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A texture ``(size, size)`` in [0, 1] mixing 1/f noise, shapes and sometimes a periodic pattern."""
    tex = pink_noise(size, rng, rng.uniform(0.8, 1.6))
    if rng.random() < 0.25:
        tex = 0.5 * tex + 0.5 * periodic_pattern(size, rng)
    draw_shapes(tex, rng, int(rng.integers(5, 40)))
    contrast = rng.uniform(0.5, 1.0)
    return np.clip(0.5 + contrast * (tex - tex.mean()), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------- scene
@functools.lru_cache(maxsize=2)
def texture_bank(seed: int = 1234, count: int = 48, size: int = 512) -> tuple[np.ndarray, ...]:
    """A fixed bank of textures, built once per process (about a second) and shared by all scenes;
    scenes vary them by offset, tiling, axis swaps, inversion and shading."""
    rng = np.random.default_rng(seed)
    return tuple(random_texture(size, rng) for _ in range(count))


def _quad(origin, u, v, rng: np.random.Generator, tile_m: float) -> Quad:
    origin, u, v = (np.asarray(x, np.float64) for x in (origin, u, v))
    reps = (max(np.linalg.norm(u) / tile_m, 0.2), max(np.linalg.norm(v) / tile_m, 0.2))
    return Quad(
        origin, u, v, int(rng.integers(len(texture_bank()))), reps, tuple(rng.random(2)), bool(rng.random() < 0.5),
        bool(rng.random() < 0.3), float(rng.uniform(0.45, 1.0)),
    )


def _box(center: np.ndarray, size: np.ndarray, yaw: float, rng: np.random.Generator) -> list[Quad]:
    """The 6 faces of a box rotated by ``yaw`` about the vertical axis."""
    c, s = np.cos(yaw), np.sin(yaw)
    axes = [np.array([c, 0, -s]) * size[0], np.array([0, 1.0, 0]) * size[1], np.array([s, 0, c]) * size[2]]
    corner = center - 0.5 * (axes[0] + axes[1] + axes[2])
    faces = []
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        faces.append(_quad(corner, axes[i], axes[j], rng, rng.uniform(0.6, 1.5)))
        faces.append(_quad(corner + axes[k], axes[i], axes[j], rng, rng.uniform(0.6, 1.5)))
    return faces


def random_scene(rng: np.random.Generator) -> list[Quad]:
    """A room (floor, ceiling, four walls) with 3-7 boxes at several depths; the first camera sits at the
    origin looking along +z."""
    half_w, floor_y, ceil_y = rng.uniform(2.5, 4.5), rng.uniform(1.2, 1.8), -rng.uniform(1.5, 2.5)
    back_z, front_z = rng.uniform(5.0, 9.0), -rng.uniform(2.0, 3.0)
    w, h, d = 2 * half_w, floor_y - ceil_y, back_z - front_z
    x0, y0, z0 = -half_w, ceil_y, front_z
    tile = rng.uniform(3.0, 6.0)
    quads = [
        _quad([x0, y0, back_z], [w, 0, 0], [0, h, 0], rng, tile),  # back wall
        _quad([x0, y0, z0], [w, 0, 0], [0, h, 0], rng, tile),  # front wall
        _quad([x0, floor_y, z0], [w, 0, 0], [0, 0, d], rng, tile),  # floor
        _quad([x0, y0, z0], [w, 0, 0], [0, 0, d], rng, tile),  # ceiling
        _quad([x0, y0, z0], [0, h, 0], [0, 0, d], rng, tile),  # left wall
        _quad([half_w, y0, z0], [0, h, 0], [0, 0, d], rng, tile),  # right wall
    ]
    for _ in range(int(rng.integers(3, 8))):
        size = rng.uniform([0.3, 0.3, 0.3], [1.6, 1.5, 1.6])
        z = rng.uniform(1.5, back_z - 0.8)
        x = rng.uniform(-half_w + 0.5, half_w - 0.5)
        y = floor_y - size[1] / 2 if rng.random() < 0.7 else rng.uniform(ceil_y + 0.8, floor_y - 0.8)
        quads += _box(np.array([x, y, z]), size, rng.uniform(0, np.pi), rng)
    return quads


# ----------------------------------------------------------------------------------------------- cameras
def look_at(center: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """World-to-camera ``(4, 4)`` of a camera at ``center`` looking at ``target`` (y down), rolled."""
    forward = target - center
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.array([0.0, -1.0, 0.0]))  # world up is -y
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    c, s = np.cos(roll), np.sin(roll)
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ R
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, -R @ center
    return T


def intrinsics(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = hw
    f = w * rng.uniform(0.7, 1.1)
    return np.array([[f, 0, w / 2 - 0.5 + rng.normal(0, 2)], [0, f, h / 2 - 0.5 + rng.normal(0, 2)], [0, 0, 1]])


def random_poses(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two world-to-camera poses looking at a common point, a wide-ish baseline apart."""
    target = np.array([rng.uniform(-1, 1), rng.uniform(-0.3, 0.6), rng.uniform(3.5, 6.0)])
    c0 = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), rng.uniform(-0.5, 0.3)])
    offset = rng.normal(0, 1, 3) * np.array([0.7, 0.3, 0.5])
    return look_at(c0, target, rng.normal(0, 0.05)), look_at(c0 + offset, target + rng.normal(0, 0.4, 3), rng.normal(0, 0.12))


# ----------------------------------------------------------------------------------------------- rendering
def _screen_box(q: Quad, K: np.ndarray, T_w2c: np.ndarray, hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Pixel bounding box (y0, y1, x0, x1) of a quad, the whole image if it crosses the camera plane,
    None if it lies entirely behind the camera or off screen."""
    corners = np.stack([q.origin, q.origin + q.u, q.origin + q.v, q.origin + q.u + q.v])
    cam = corners @ T_w2c[:3, :3].T + T_w2c[:3, 3]
    h, w = hw
    if (cam[:, 2] <= 1e-3).all():
        return None
    if (cam[:, 2] <= 1e-3).any():
        return 0, h, 0, w
    proj = cam @ K.T
    xy = proj[:, :2] / proj[:, 2:]
    x0, y0 = np.floor(xy.min(0)).astype(int)
    x1, y1 = np.ceil(xy.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    return None if x0 >= x1 or y0 >= y1 else (y0, y1, x0, x1)


def render_view(quads: list[Quad], K: np.ndarray, T_w2c: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the quads: grayscale image ``(H, W)`` float32 in [0, 1] and depth ``(H, W)`` (camera z,
    0 where nothing is hit)."""
    h, w = hw
    R, t = T_w2c[:3, :3], T_w2c[:3, 3]
    center = -R.T @ t
    ys, xs = np.mgrid[0:h, 0:w]
    rays_cam = np.linalg.inv(K) @ np.stack([xs.ravel(), ys.ravel(), np.ones(h * w)], 0)
    rays = (R.T @ rays_cam).T.reshape(h, w, 3)  # world directions; camera z = 1, so the ray parameter is depth
    depth = np.full((h, w), np.inf)
    owner = np.full((h, w), -1)
    coords = np.zeros((h, w, 2))
    for qi, q in enumerate(quads):
        box = _screen_box(q, K, T_w2c, hw)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        sub = rays[y0:y1, x0:x1]
        normal = np.cross(q.u, q.v)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (normal @ (q.origin - center)) / (sub @ normal)
        rel = center + sub * s[..., None] - q.origin
        uu, uv, vv = q.u @ q.u, q.u @ q.v, q.v @ q.v  # dual basis: u and v need not be orthogonal
        det = uu * vv - uv * uv
        ru, rv = rel @ q.u, rel @ q.v
        a, b = (vv * ru - uv * rv) / det, (uu * rv - uv * ru) / det
        hit = (s > 1e-3) & (s < depth[y0:y1, x0:x1]) & (a >= 0) & (a <= 1) & (b >= 0) & (b <= 1)
        depth[y0:y1, x0:x1][hit] = s[hit]
        owner[y0:y1, x0:x1][hit] = qi
        coords[y0:y1, x0:x1][hit] = np.stack([a[hit], b[hit]], -1)
    bank = texture_bank()
    image = np.zeros((h, w), np.float32)
    for qi in np.unique(owner[owner >= 0]):
        q, sel = quads[qi], owner == qi
        tex = bank[q.texture]
        size = tex.shape[0]
        a, b = coords[sel, 0] * q.repeats[0] + q.offset[0], coords[sel, 1] * q.repeats[1] + q.offset[1]
        if q.swap:
            a, b = b, a
        values = sample_texture(tex, np.mod(a * size, size).astype(np.float32), np.mod(b * size, size).astype(np.float32))
        image[sel] = (1.0 - values if q.invert else values) * q.shade
    depth[owner < 0] = 0.0
    return image, depth.astype(np.float32)


def sample_texture(texture: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear, wrapping texture lookup at float coordinates ``(N,)`` (cv2.remap on a 2-D block, as its
    maps must have fewer than 32767 rows)."""
    n, cols = len(x), 1024
    rows = -(-n // cols)
    pad = rows * cols - n
    mx = np.pad(x, (0, pad)).reshape(rows, cols)
    my = np.pad(y, (0, pad)).reshape(rows, cols)
    return cv2.remap(texture, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP).ravel()[:n]


def photometric_change(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, bias, gamma, blur and noise, clipped to [0, 1]."""
    out = np.clip(img * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1), 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, 1.2))
    out = out + rng.normal(0, rng.uniform(0.0, 0.03), out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def covisible_share(depth0, depth1, K0, K1, T_0to1, stride: int = 8) -> float:
    """Share of image0's (subsampled) pixels that are visible in image1."""
    ys, xs = np.mgrid[0 : depth0.shape[0] : stride, 0 : depth0.shape[1] : stride]
    z = depth0[ys, xs].ravel()
    pts = np.linalg.inv(K0) @ np.stack([xs.ravel(), ys.ravel(), np.ones(z.size)]) * z
    cam1 = T_0to1[:3, :3] @ pts + T_0to1[:3, 3:]
    proj = K1 @ cam1
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = proj[0] / proj[2], proj[1] / proj[2]
    h, w = depth1.shape
    ok = (z > 0) & (cam1[2] > 0) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    ui, vi = np.clip(np.round(u), 0, w - 1).astype(int), np.clip(np.round(v), 0, h - 1).astype(int)
    seen = depth1[vi, ui]
    ok &= np.abs(seen - cam1[2]) < 0.2 * np.maximum(seen, 1e-6)
    return float(ok.mean())


def render_pair(seed: int | list[int], image_size: tuple[int, int] = (480, 640), photometric: bool = True, min_covisible: float = 0.3) -> dict[str, np.ndarray]:
    """One synthetic pair, deterministic in ``seed``: ``image0/1`` ``(H, W)`` float32 in [0, 1],
    ``depth0/1`` ``(H, W)`` metres, ``K0/K1`` ``(3, 3)``, ``T_0to1``/``T_1to0`` ``(4, 4)``.

    Poses are redrawn (at most 20 times) until at least ``min_covisible`` of image0 is seen in image1.
    """
    rng = np.random.default_rng(seed)
    quads = random_scene(rng)
    K0, K1 = intrinsics(image_size, rng), intrinsics(image_size, rng)
    for _ in range(20):
        T0, T1 = random_poses(rng)
        T_0to1 = T1 @ np.linalg.inv(T0)
        img0, depth0 = render_view(quads, K0, T0, image_size)
        img1, depth1 = render_view(quads, K1, T1, image_size)
        if covisible_share(depth0, depth1, K0, K1, T_0to1) >= min_covisible:
            break
    if photometric:
        img0, img1 = photometric_change(img0, rng), photometric_change(img1, rng)
    return {
        "image0": img0, "image1": img1, "depth0": depth0, "depth1": depth1, "K0": K0.astype(np.float32),
        "K1": K1.astype(np.float32), "T_0to1": T_0to1.astype(np.float32), "T_1to0": np.linalg.inv(T_0to1).astype(np.float32),
    }


class SyntheticDataset(Dataset):
    """Procedural pairs: sample ``i`` of a split is always the same pair; the splits' seed streams are
    disjoint, so ``val`` and ``test`` are fixed held-out sets.

    Returns the project's sample dict (``image0/1`` ``(1, H, W)``, ``depth0/1``, ``K0/1``, ``T_0to1``,
    ``T_1to0``, ``mask0/1`` all True, ``scale0/1`` = [1, 1], ``dataset_name``, ``scene_id``, ``pair_id``,
    ``pair_names``).
    """

    def __init__(self, split: str = "train", length: int = 1000, image_size: tuple[int, int] = (480, 640), seed: int = 0, photometric: bool = True) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        self.split, self.length, self.image_size = split, int(length), tuple(image_size)
        self.seed, self.photometric = seed, photometric

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        pair = render_pair([self.seed, SPLITS[self.split], index], self.image_size, self.photometric)
        sample = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in pair.items()}
        sample["image0"], sample["image1"] = sample["image0"][None], sample["image1"][None]
        mask = torch.ones(self.image_size, dtype=torch.bool)
        name = f"{self.split}-{self.seed}-{index}"
        sample.update(
            mask0=mask, mask1=mask.clone(), scale0=torch.ones(2), scale1=torch.ones(2), dataset_name="synthetic",
            scene_id=name, pair_id=index, pair_names=(f"{name}-0", f"{name}-1"),
        )
        return sample
