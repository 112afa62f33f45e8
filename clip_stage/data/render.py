"""Synthetic street-view renderer for the built-in demo city.

A scene is a straight street seen by a camera standing on it: building facades on both sides (colour,
height, window grid, shop awnings), a road (surface, centre markings, tram rails and overhead wires),
a sidewalk with trees, parked cars and pedestrians as occluders, sky, haze, lighting and pixel noise.
`render_scene` ray-casts every pixel at once with numpy (walls and ground are planes, so each pixel
is a closed-form intersection); trees, cars and pedestrians are painted far to near as projected
sprites. `caption_scene` writes the matching "a street view of ..." caption from the same numbers.

Facade details (building widths, heights, colour jitter) and trees are indexed by the camera's
position along the street (`Scene.s` + `direction` * depth), so two cameras a few metres apart see
the same buildings shifted, and a camera facing the other way sees the same street from behind.

Used by `clip_stage.data.demo_city`; nothing here knows about maps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[float, float, float]

# Named facade colours: the caption uses the name of the colour a facade was drawn from.
PALETTE: dict[str, RGB] = {
    "ochre": (0.80, 0.60, 0.25),
    "red brick": (0.62, 0.25, 0.18),
    "pale yellow": (0.93, 0.86, 0.55),
    "grey": (0.55, 0.55, 0.57),
    "white": (0.90, 0.90, 0.88),
    "light blue": (0.55, 0.70, 0.85),
    "green": (0.38, 0.58, 0.40),
    "pink": (0.88, 0.62, 0.65),
    "beige": (0.82, 0.74, 0.60),
    "brown": (0.45, 0.32, 0.22),
    "dark grey": (0.30, 0.30, 0.33),
    "terracotta": (0.78, 0.42, 0.28),
    "mint": (0.62, 0.85, 0.72),
    "lavender": (0.66, 0.60, 0.80),
}
WINDOW_COLOURS: dict[str, RGB] = {
    "dark": (0.10, 0.11, 0.14),
    "blue-glass": (0.30, 0.45, 0.62),
    "lit": (0.95, 0.82, 0.45),
    "white-framed": (0.22, 0.25, 0.30),
}
ROAD_SURFACES: dict[str, RGB] = {
    "asphalt": (0.28, 0.28, 0.30),
    "pale asphalt": (0.45, 0.45, 0.46),
    "cobblestone": (0.50, 0.42, 0.34),
}
MARKINGS = ("none", "dashed", "double", "bike")

FOV_DEG = 80.0
FLOOR_H = 3.2
CAM_H = 1.7
MAX_CAPTION_WORDS = 30
TABLE = 64  # per-side table of building variations, indexed by building number along the street


@dataclass(frozen=True)
class Facade:
    """One side of the street."""

    colour_name: str
    """key of PALETTE the facade colour was drawn from (for the caption)"""
    colour: RGB
    """facade colour actually used (PALETTE colour after variation), 0-1 floats"""
    floors: float
    """typical number of floors"""
    col_spacing: float
    """metres between window columns"""
    window_w: float
    """window width as a fraction of the column spacing"""
    window_h: float
    """window height as a fraction of the floor height"""
    window_name: str
    """key of WINDOW_COLOURS"""
    building_width: float
    """metres per building along the street"""
    awnings: bool
    """shop awnings over the ground floor"""
    awning_colour: RGB
    tree_spacing: float
    """metres between trees on this sidewalk; 0 = no trees"""
    building_seed: int
    """seeds the per-building height / colour table (same street block -> same buildings)"""


@dataclass(frozen=True)
class Scene:
    """Everything `render_scene` draws. Distances in metres, angles in radians."""

    left: Facade
    right: Facade
    road_half: float
    sidewalk: float
    road_name: str
    """key of ROAD_SURFACES"""
    sidewalk_colour: RGB
    marking: str
    """one of MARKINGS"""
    tram: bool
    tree_colour: RGB
    sky_top: RGB
    sky_bottom: RGB
    brightness: float
    tint: RGB
    shade_side: int
    """-1: left facade in shadow, +1: right, 0: overcast"""
    yaw: float
    pitch: float
    cam_x: float
    """lateral camera offset from the street centre line (right positive)"""
    s: float
    """camera position along the street"""
    direction: int
    """+1 looking along increasing s, -1 the other way"""
    cars: tuple[tuple[float, float, RGB], ...] = ()
    """(x, depth, colour) of parked / driving cars"""
    pedestrians: tuple[tuple[float, float, RGB], ...] = ()
    noise: float = 4.0
    """pixel noise standard deviation (0-255 scale)"""
    noise_seed: int = 0
    haze: float = 90.0
    """metres over which colours fade into the haze"""

    def flipped(self) -> "Scene":
        """The same spot seen facing the other way: facades swap sides."""
        return replace(self, left=self.right, right=self.left, direction=-self.direction, cam_x=-self.cam_x,
                       shade_side=-self.shade_side)


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


@functools.lru_cache(maxsize=1024)
def _building_table(f: Facade) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(f.building_seed)
    heights = np.clip(np.round(f.floors + rng.normal(0, 0.9, TABLE)), 1, 12) * FLOOR_H + 0.6
    colour = np.clip(np.asarray(f.colour) * rng.uniform(0.86, 1.14, (TABLE, 1)) + rng.normal(0, 0.025, (TABLE, 3)), 0, 1)
    return heights, colour


def _facade_pixels(f: Facade, pos: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Colours of facade points at street position `pos` (metres) and height `y`."""
    heights, colours = _building_table(f)
    idx = np.floor(pos / f.building_width).astype(np.int64) % TABLE
    col = colours[idx].copy()
    fx = np.mod(pos, f.col_spacing) / f.col_spacing
    fy = np.mod(y, FLOOR_H) / FLOOR_H
    in_window = (np.abs(fx - 0.5) < f.window_w / 2) & (np.abs(fy - 0.55) < f.window_h / 2) & (y > FLOOR_H)
    win = np.asarray(WINDOW_COLOURS[f.window_name])
    col[in_window] = win * (0.85 + 0.3 * fy[in_window, None])
    # ground floor: dark shop windows, optional striped awnings above them
    shop = (y < FLOOR_H * 0.75) & (y > 0.4) & (np.abs(fx - 0.5) < 0.38)
    col[shop] = col[shop] * 0.35
    if f.awnings:
        aw = (y > FLOOR_H * 0.75) & (y < FLOOR_H * 0.95)
        stripe = np.mod(pos, 1.0) < 0.5
        col[aw & stripe] = f.awning_colour
        col[aw & ~stripe] = 0.92
    # cornice under each roof line
    top = heights[idx]
    col[(y > top - 0.45)] *= 0.7
    return col


def render_scene(sc: Scene, size: int) -> np.ndarray:
    """Renders `sc` as a (size, size, 3) uint8 array."""
    f = 1.0 / np.tan(np.radians(FOV_DEG) / 2)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(c, -c)
    R = _rotation(sc.yaw, sc.pitch)
    d = np.stack([u, v, np.full_like(u, f)], -1) @ R.T
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    wall_x_left = -(sc.road_half + sc.sidewalk)
    wall_x_right = sc.road_half + sc.sidewalk
    with np.errstate(divide="ignore", invalid="ignore"):
        t_wall = np.where(dx < -1e-9, (wall_x_left - sc.cam_x) / dx, np.where(dx > 1e-9, (wall_x_right - sc.cam_x) / dx, np.inf))
        t_ground = np.where(dy < -1e-9, CAM_H / -dy, np.inf)
    y_wall = CAM_H + t_wall * dy
    z_wall = t_wall * dz
    pos_wall = sc.s + sc.direction * z_wall

    img = np.empty((size, size, 3))
    depth = np.full((size, size), np.inf)

    # sky: vertical gradient, brightest at the horizon
    elev = np.clip(dy / np.linalg.norm(d, axis=-1) * 2.5, 0, 1)[..., None]
    img[:] = np.asarray(sc.sky_bottom) * (1 - elev) + np.asarray(sc.sky_top) * elev

    # facades
    for side, facade, sel in ((-1, sc.left, dx < 0), (1, sc.right, dx > 0)):
        heights, _ = _building_table(facade)
        m = sel & np.isfinite(t_wall) & (z_wall > 0)
        idx = np.floor(np.where(m, pos_wall, 0) / facade.building_width).astype(np.int64) % TABLE
        m &= (y_wall >= 0) & (y_wall <= heights[idx])
        if m.any():
            col = _facade_pixels(facade, pos_wall[m], y_wall[m])
            if sc.shade_side == side:
                col = col * 0.68
            img[m] = col
            depth[m] = t_wall[m]

    # ground: road, markings, rails, sidewalk
    g = np.isfinite(t_ground) & ~np.isfinite(depth)
    if g.any():
        tg = t_ground[g]
        gx = sc.cam_x + tg * dx[g]
        gpos = sc.s + sc.direction * tg * dz[g]
        px = tg * 2.0 / (size * f)  # world width of one pixel at that distance
        col = np.empty((tg.size, 3))
        road = np.abs(gx) < sc.road_half
        col[road] = ROAD_SURFACES[sc.road_name]
        if sc.road_name == "cobblestone":
            cob = (np.mod(gpos[road], 0.6) < 0.08) | (np.mod(gx[road], 0.5) < 0.06)
            col[road] = np.where(cob[:, None], np.asarray(ROAD_SURFACES["cobblestone"]) * 0.7, col[road])
        col[~road] = sc.sidewalk_colour
        kerb = np.abs(np.abs(gx) - sc.road_half) < np.maximum(0.12, px * 0.6)
        col[kerb] = 0.7
        lw = np.maximum(0.07, px * 0.6)
        if sc.marking == "dashed":
            col[(np.abs(gx) < lw) & (np.mod(gpos, 6.0) < 3.0)] = 0.95
        elif sc.marking == "double":
            col[(np.abs(np.abs(gx) - 0.15) < lw)] = (0.95, 0.80, 0.20)
        elif sc.marking == "bike":
            lane = road & (np.abs(gx) > sc.road_half - 1.6)
            col[lane] = (0.62, 0.30, 0.26)
            col[np.abs(np.abs(gx) - (sc.road_half - 1.6)) < lw] = 0.95
        if sc.tram:
            rail_x = np.abs(np.abs(gx) - 0.72)
            col[rail_x < np.maximum(0.045, px * 0.5)] = (0.62, 0.62, 0.64)
        img[g] = col
        depth[g] = tg

    # tram wires overhead (in front of the facades)
    if sc.tram:
        with np.errstate(divide="ignore", invalid="ignore"):
            t_w = np.where(dy > 1e-9, (6.0 - CAM_H) / dy, np.inf)
        wx = sc.cam_x + t_w * dx
        wire = np.isfinite(t_w) & (t_w < depth) & (np.abs(np.abs(wx) - 0.72) < t_w * 1.6 / (size * f))
        img[wire] = 0.12

    # haze: far things fade into the horizon colour
    fog = np.where(np.isfinite(depth), np.exp(-np.where(np.isfinite(depth), depth, 0.0) / sc.haze), 1.0)[..., None]  # the sky keeps its gradient
    img = img * fog + np.asarray(sc.sky_bottom) * (1 - fog)

    _paint_sprites(img, sc, R, f, size)

    img = (img * (255.0 * sc.brightness * np.asarray(sc.tint))).astype(np.float32)
    if sc.noise > 0:
        img += np.random.default_rng(sc.noise_seed).standard_normal(img.shape, dtype=np.float32) * np.float32(sc.noise)
    return np.clip(img, 0, 255).astype(np.uint8)


def _project(p: np.ndarray, sc: Scene, R: np.ndarray, f: float, size: int):
    """World points (n,3) in camera-relative street coords -> pixel (col, row) and depth."""
    pc = (p - np.array([sc.cam_x, CAM_H, 0.0])) @ R  # R^T applied to row vectors
    z = pc[:, 2]
    col = (f * pc[:, 0] / z + 1) / 2 * size
    row = (1 - f * pc[:, 1] / z) / 2 * size
    return col, row, z


def _paint_sprites(img: np.ndarray, sc: Scene, R: np.ndarray, f: float, size: int) -> None:
    sprites = []  # (depth, kind, x, z, colour)
    for facade, side in ((sc.left, -1), (sc.right, 1)):
        if facade.tree_spacing > 0:
            sp = facade.tree_spacing
            # trees stand at fixed street positions k*sp: nearby cameras see the same trees
            first = np.ceil((sc.s - 62) / sp) if sc.direction < 0 else np.ceil((sc.s + 2) / sp)
            for k in range(int(first), int(first) + int(60 / sp) + 1):
                z = (k * sp - sc.s) * sc.direction
                if 2.0 < z < 60.0:
                    sprites.append((z, "tree", side * (sc.road_half + sc.sidewalk * 0.45), z, sc.tree_colour))
    for x, z, colour in sc.cars:
        sprites.append((z, "car", x, z, colour))
    for x, z, colour in sc.pedestrians:
        sprites.append((z, "person", x, z, colour))
    sprites.sort(key=lambda t: -t[0])
    rows, cols = np.mgrid[0:size, 0:size] + 0.5

    def window(rlo, rhi, clo, chi):
        """Views of the image and pixel grids over a sprite's bounding box (None if off-screen)."""
        r0, r1 = max(int(np.floor(rlo)) - 1, 0), min(int(np.ceil(rhi)) + 1, size)
        c0, c1 = max(int(np.floor(clo)) - 1, 0), min(int(np.ceil(chi)) + 1, size)
        if r0 >= r1 or c0 >= c1:
            return None
        return img[r0:r1, c0:c1], rows[r0:r1, c0:c1], cols[r0:r1, c0:c1]

    for depth, kind, x, z, colour in sprites:
        fog = float(np.exp(-depth / sc.haze))
        haze = np.asarray(sc.sky_bottom)
        if kind == "tree":
            pts = np.array([[x, 4.6, z], [x, 0.0, z], [x + 1.9, 4.6, z]])
            c, r, zz = _project(pts, sc, R, f, size)
            if zz.min() <= 0.5:
                continue
            rad = abs(c[2] - c[0])
            half = max(0.6, rad * 0.13)
            win = window(min(r[0] - rad, r[1]), max(r[0] + rad, r[1]), min(c[0] - rad, c[1] - half), max(c[0] + rad, c[1] + half))
            if win is None:
                continue
            sub, rr, cc = win
            trunk = (np.abs(cc - c[1]) < half) & (rr < r[1]) & (rr > r[0])
            crown = (cc - c[0]) ** 2 + ((rr - r[0]) * 1.15) ** 2 < rad ** 2
            sub[trunk] = np.asarray((0.30, 0.22, 0.15)) * fog + haze * (1 - fog)
            mottle = 0.85 + 0.15 * np.sin(cc[crown] * 1.3 + z) * np.cos(rr[crown] * 1.1)
            sub[crown] = (np.asarray(colour) * mottle[:, None]) * fog + haze * (1 - fog)
        elif kind == "car":
            pts = np.array([[x - 0.9, 0.0, z], [x + 0.9, 1.45, z], [x - 0.75, 1.45, z], [x + 0.75, 0.9, z]])
            c, r, zz = _project(pts, sc, R, f, size)
            if zz.min() <= 0.5:
                continue
            win = window(r[1], r[0], c[0], c[1])
            if win is None:
                continue
            sub, rr, cc = win
            body = (cc > c[0]) & (cc < c[1]) & (rr < r[0]) & (rr > r[1])
            glass = body & (rr < r[3]) & (cc > c[2]) & (cc < c[3])
            sub[body] = np.asarray(colour) * fog + haze * (1 - fog)
            sub[glass] = np.asarray((0.15, 0.18, 0.22)) * fog + haze * (1 - fog)
        else:
            pts = np.array([[x, 1.0, z], [x, 0.0, z], [x + 0.28, 1.75, z]])
            c, r, zz = _project(pts, sc, R, f, size)
            if zz.min() <= 0.5:
                continue
            w = max(0.6, abs(c[2] - c[0]))
            h = max(abs(r[1] - r[2]) / 2, 0.6)
            mid = (r[1] + r[2]) / 2
            win = window(mid - h, mid + h, c[0] - w, c[0] + w)
            if win is None:
                continue
            sub, rr, cc = win
            person = ((cc - c[0]) / w) ** 2 + ((rr - mid) / h) ** 2 < 1
            sub[person] = np.asarray(colour) * fog + haze * (1 - fog)


# --- captions ----------------------------------------------------------------------------------

def _height_word(floors: float) -> str:
    return "low" if floors < 3.5 else ("mid-rise" if floors < 6 else "tall")


def _window_word(f: Facade) -> str:
    return "dense" if f.col_spacing < 2.4 else ("regular" if f.col_spacing < 3.2 else "sparse")


def caption_scene(sc: Scene) -> str:
    """A 10-30 word "a street view of ..." caption built from the scene numbers."""
    left, right = sc.left, sc.right
    floors = (left.floors + right.floors) / 2
    if left.colour_name == right.colour_name:
        colours = left.colour_name
    else:
        colours = f"{left.colour_name} and {right.colour_name}"
    parts = [f"a street view of {_height_word(floors)} {colours} buildings with {_window_word(left)} windows"]
    trees_l, trees_r = left.tree_spacing > 0, right.tree_spacing > 0
    if trees_l and trees_r:
        parts.append("trees on both sides")
    elif trees_l or trees_r:
        parts.append(f"trees on the {'left' if trees_l else 'right'}")
    if left.awnings or right.awnings:
        parts.append("shop awnings")
    road = {"asphalt": "an asphalt road", "pale asphalt": "a pale asphalt road", "cobblestone": "a cobblestone road"}[sc.road_name]
    marking = {"none": "", "dashed": " with a dashed centre line", "double": " with a double yellow line",
               "bike": " with red bike lanes"}[sc.marking]
    parts.append(road + marking)
    if sc.tram:
        parts.append("a tram line")
    if sc.cars:
        parts.append("a parked car" if len(sc.cars) == 1 else "parked cars")
    if sc.pedestrians:
        parts.append("a pedestrian" if len(sc.pedestrians) == 1 else "pedestrians")
    light = "on a bright day" if sc.brightness > 1.05 else ("in dim light" if sc.brightness < 0.88 else "")

    def join(ps):
        return (", ".join(ps[:-1]) + (" and " if len(ps) > 1 else "") + ps[-1] + (" " + light if light else "")).strip()

    # the paper's captions are 10-30 words: drop the least telling details (people, cars, light) first
    text = join(parts)
    for drop in ("a pedestrian", "pedestrians", "a parked car", "parked cars", "shop awnings"):
        if len(text.split()) <= MAX_CAPTION_WORDS:
            break
        if drop in parts:
            parts.remove(drop)
            text = join(parts)
    if len(text.split()) > MAX_CAPTION_WORDS:
        light = ""
        text = join(parts)
    if len(text.split()) > MAX_CAPTION_WORDS:
        parts[parts.index(road + marking)] = road
        text = join(parts)
    return text
