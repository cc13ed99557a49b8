"""Draws one synthetic pet photo and its trimap, for the embedded data set (`petseg.data.synth`).

The pictures are simple but not trivial to segment: textured indoor and
outdoor backgrounds with distractor objects in pet colours, a body, head,
ears, legs and tail whose colours, coat patterns and proportions follow the
breed, standing or sitting poses at varied size and position (sometimes cut
off by the frame or partly hidden behind an object), uneven lighting, sensor
noise and JPEG compression, on photos 160-260 px a side. All randomness comes
from the generator passed to `render`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from petseg import oxford

SIDE_RANGE = (160, 260)
"""Smallest and largest photo side in pixels."""


@dataclass(frozen=True)
class Breed:
    """How one breed looks, in the units of the drawing code.

    Attributes:
        name: Oxford name (capitalised for cats, lower case for dogs).
        coat: main fur colour, RGB 0-255.
        marking: second colour used by ``pattern``.
        pattern: where ``marking`` goes: solid, tabby, spotted, patches,
            ticked, points (ears, face, legs, tail), mask (face and ears),
            bicolor (belly and chest), saddle (back), tricolor (black back,
            ``marking`` head) or hairless (faint wrinkles).
        ears: pointed, erect, floppy or folded.
        tail: long, plume, curled or short.
        size: body length relative to the average pet.
        build: body length over body height (long, low breeds are larger).
        snout: muzzle length relative to the head radius (0 = flat face).
        fluff: how ragged the fur outline is, 0-1.
    """

    name: str
    coat: tuple[int, int, int]
    marking: tuple[int, int, int]
    pattern: str
    ears: str
    tail: str
    size: float
    build: float
    snout: float
    fluff: float

    @property
    def species(self) -> str:
        """``"cat"`` or ``"dog"``."""
        return oxford.species_of(self.name)


# The looks of the Oxford breeds, in oxford.BREEDS order (a unit test checks the names).
BREEDS: tuple[Breed, ...] = (
    Breed("Abyssinian", (176, 110, 60), (90, 55, 30), "ticked", "pointed", "long", 0.9, 1.9, 0.25, 0.0),
    Breed("american_bulldog", (235, 230, 220), (170, 120, 80), "patches", "folded", "short", 1.3, 1.6, 0.45, 0.0),
    Breed("american_pit_bull_terrier", (150, 110, 80), (240, 235, 225), "bicolor", "folded", "long", 1.2, 1.7, 0.5, 0),
    Breed("basset_hound", (240, 235, 225), (140, 85, 40), "tricolor", "floppy", "long", 1.3, 2.6, 0.6, 0.0),
    Breed("beagle", (240, 235, 225), (160, 100, 45), "tricolor", "floppy", "long", 1.0, 1.8, 0.55, 0.0),
    Breed("Bengal", (200, 150, 80), (60, 40, 20), "spotted", "pointed", "long", 1.0, 2.0, 0.25, 0.0),
    Breed("Birman", (230, 220, 200), (100, 75, 60), "points", "pointed", "plume", 1.0, 1.7, 0.2, 0.5),
    Breed("Bombay", (25, 22, 22), (45, 40, 35), "solid", "pointed", "long", 0.9, 1.8, 0.2, 0.0),
    Breed("boxer", (190, 120, 60), (45, 35, 30), "mask", "folded", "short", 1.3, 1.6, 0.35, 0.0),
    Breed("British_Shorthair", (130, 135, 145), (110, 115, 125), "solid", "pointed", "long", 1.0, 1.5, 0.15, 0.15),
    Breed("chihuahua", (210, 170, 120), (240, 230, 210), "bicolor", "erect", "long", 0.6, 1.5, 0.3, 0.0),
    Breed("Egyptian_Mau", (180, 180, 170), (50, 50, 45), "spotted", "pointed", "long", 0.95, 1.9, 0.25, 0.0),
    Breed("english_cocker_spaniel", (140, 80, 40), (40, 30, 25), "solid", "floppy", "short", 1.0, 1.7, 0.55, 0.6),
    Breed("english_setter", (245, 245, 240), (60, 50, 45), "spotted", "floppy", "plume", 1.3, 1.9, 0.65, 0.4),
    Breed("german_shorthaired", (110, 70, 45), (235, 230, 220), "ticked", "floppy", "short", 1.3, 1.9, 0.7, 0.0),
    Breed("great_pyrenees", (245, 242, 235), (225, 215, 195), "solid", "floppy", "plume", 1.6, 1.7, 0.55, 0.8),
    Breed("havanese", (235, 225, 205), (180, 150, 110), "bicolor", "floppy", "curled", 0.7, 1.6, 0.35, 0.9),
    Breed("japanese_chin", (250, 250, 250), (30, 25, 25), "mask", "floppy", "curled", 0.6, 1.5, 0.1, 0.8),
    Breed("keeshond", (150, 150, 145), (40, 40, 40), "saddle", "erect", "curled", 1.0, 1.5, 0.4, 0.9),
    Breed("leonberger", (190, 140, 80), (50, 40, 30), "mask", "floppy", "plume", 1.6, 1.8, 0.55, 0.8),
    Breed("Maine_Coon", (120, 85, 55), (50, 35, 25), "tabby", "pointed", "plume", 1.3, 1.8, 0.25, 0.7),
    Breed("miniature_pinscher", (40, 30, 25), (170, 100, 50), "points", "erect", "short", 0.6, 1.6, 0.5, 0.0),
    Breed("newfoundland", (25, 22, 20), (45, 40, 35), "solid", "floppy", "plume", 1.6, 1.7, 0.5, 0.7),
    Breed("Persian", (235, 230, 220), (200, 190, 175), "solid", "pointed", "plume", 1.0, 1.5, 0.05, 0.9),
    Breed("pomeranian", (215, 130, 60), (235, 180, 110), "bicolor", "erect", "curled", 0.5, 1.3, 0.25, 1.0),
    Breed("pug", (215, 185, 140), (35, 30, 28), "mask", "folded", "curled", 0.7, 1.5, 0.1, 0.0),
    Breed("Ragdoll", (225, 215, 195), (95, 85, 80), "points", "pointed", "plume", 1.2, 1.7, 0.2, 0.6),
    Breed("Russian_Blue", (110, 120, 135), (95, 105, 120), "solid", "pointed", "long", 0.95, 1.8, 0.2, 0.0),
    Breed("saint_bernard", (245, 240, 235), (160, 80, 35), "patches", "floppy", "plume", 1.7, 1.7, 0.5, 0.4),
    Breed("samoyed", (250, 250, 248), (235, 232, 225), "solid", "erect", "curled", 1.2, 1.6, 0.45, 1.0),
    Breed("scottish_terrier", (35, 33, 33), (60, 55, 50), "solid", "erect", "short", 0.8, 1.9, 0.55, 0.6),
    Breed("shiba_inu", (210, 125, 55), (245, 235, 220), "bicolor", "erect", "curled", 0.9, 1.6, 0.4, 0.3),
    Breed("Siamese", (225, 210, 180), (60, 45, 35), "points", "pointed", "long", 0.95, 2.0, 0.3, 0.0),
    Breed("Sphynx", (215, 170, 160), (180, 140, 130), "hairless", "pointed", "long", 0.9, 1.8, 0.2, 0.0),
    Breed("staffordshire_bull_terrier", (110, 75, 55), (240, 235, 225), "bicolor", "folded", "long", 0.9, 1.6, 0.4, 0),
    Breed("wheaten_terrier", (225, 200, 150), (200, 170, 120), "solid", "folded", "long", 1.0, 1.7, 0.5, 0.8),
    Breed("yorkshire_terrier", (60, 70, 85), (190, 140, 80), "points", "erect", "short", 0.45, 1.6, 0.35, 0.8),
)


def render(rng: np.random.Generator, breed: Breed) -> tuple[bytes, bytes]:
    """Draw one photo of a pet of ``breed`` and its trimap.

    Args:
        rng: the sample's own generator (all randomness comes from it).
        breed: the breed to draw.

    Returns:
        JPEG bytes of the photo and PNG bytes of the trimap (same size,
        values 1 pet, 2 background, 3 border).
    """
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    scene = _background(rng, height, width, breed)
    pet = _Pet(rng, breed, height, width)

    # A soft shadow on the ground makes the pet less separable by colour edges alone.
    shadow = _blur(pet.shadow, 6.0)[..., None]
    scene *= 1.0 - 0.35 * shadow

    alpha = _blur(pet.silhouette, 0.7)[pet.crop][..., None]
    region = scene[pet.crop]
    region[...] = region * (1.0 - alpha) + pet.colours(rng) * alpha

    visible = pet.silhouette > 0.5
    if rng.random() < 0.35:
        cover = _occluder(rng, height, width, pet.box)
        cover_alpha = _blur(cover, 0.6)[..., None]
        scene = scene * (1.0 - cover_alpha) + _texture(rng, height, width, _palette(rng)) * cover_alpha
        visible &= cover < 0.5

    scene = _light(rng, scene)
    scene += rng.uniform(0.004, 0.03) * rng.standard_normal(scene.shape, dtype=np.float32)
    photo = Image.fromarray(np.clip(scene * 255.0 + 0.5, 0, 255).astype(np.uint8))
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG", quality=int(rng.integers(60, 96)))

    png = io.BytesIO()
    Image.fromarray(_trimap(visible, radius=int(rng.integers(1, 3)))).save(png, format="PNG")
    return jpeg.getvalue(), png.getvalue()


def _trimap(visible: np.ndarray, *, radius: int) -> np.ndarray:
    """1 inside the pet, 2 outside, 3 on a band 2*radius px wide along its outline."""
    trimap = np.full(visible.shape, 2, dtype=np.uint8)
    trimap[visible] = 1
    trimap[_grow(visible, radius) & _grow(~visible, radius)] = 3
    return trimap


def _grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean mask by a (2*radius+1)-pixel square, one axis at a time."""
    grown = mask.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(1, radius + 1):
            ahead = [slice(None), slice(None)]
            behind = [slice(None), slice(None)]
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(ahead)] |= source[tuple(behind)]
            grown[tuple(behind)] |= source[tuple(ahead)]
    return grown


def _blur(mask: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian-blur a float mask in [0, 1]."""
    image = Image.fromarray((mask * 255.0).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Noise in [0, 1] that varies over about ``cells`` blobs per side."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)).clip(0, 1)


def _palette(rng: np.random.Generator, near: tuple[int, int, int] | None = None) -> np.ndarray:
    """Two colours (2, 3) in [0, 1]; close to ``near`` when given."""
    if near is None:
        return rng.uniform(0.05, 0.95, size=(2, 3))
    base = np.array(near) / 255.0
    return np.clip(base + rng.normal(0.0, 0.08, size=(2, 3)), 0.0, 1.0)


def _texture(rng: np.random.Generator, height: int, width: int, colours: np.ndarray) -> np.ndarray:
    """A surface between two colours: plaster, wood, carpet, tiles, fabric or foliage."""
    kind = rng.integers(6)
    y, x = np.ogrid[0:height, 0:width]
    y, x = y.astype(np.float32), x.astype(np.float32)
    if kind == 0:  # plaster or a painted wall
        mix = 0.7 * _smooth_noise(rng, height, width, 4) + 0.3 * rng.random((height, width), dtype=np.float32)
    elif kind == 1:  # wood grain
        warp = 25.0 * _smooth_noise(rng, height, width, 3)
        mix = 0.5 + 0.5 * np.sin((y + warp) * rng.uniform(0.15, 0.5))
    elif kind == 2:  # carpet, grass or gravel
        mix = rng.random((height, width), dtype=np.float32) * 0.6 + 0.4 * _smooth_noise(rng, height, width, 12)
    elif kind == 3:  # floor tiles with grout
        tile = rng.uniform(18, 60)
        cells = (np.floor(x / tile) + np.floor(y / tile)) % 2
        grout = (np.minimum(x % tile, y % tile) < 2).astype(np.float32)
        mix = 0.8 * cells + 0.1 * rng.random((height, width), dtype=np.float32) + grout
    elif kind == 4:  # striped fabric at an angle
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(6, 30)
        mix = (np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)
        mix = 0.85 * mix + 0.15 * rng.random((height, width), dtype=np.float32)
    else:  # out-of-focus foliage outdoors
        mix = _smooth_noise(rng, height, width, int(rng.integers(6, 14)))
    mix = np.clip(mix, 0.0, 1.0)[..., None]
    low, high = colours.astype(np.float32)
    return low * (1.0 - mix) + high * mix


def _background(rng: np.random.Generator, height: int, width: int, breed: Breed) -> np.ndarray:
    """A wall over a floor (or one surface) with a few objects, some in pet colours."""
    near = breed.coat if rng.random() < 0.25 else None
    scene = _texture(rng, height, width, _palette(rng, near))
    if rng.random() < 0.7:
        horizon = int(rng.uniform(0.3, 0.75) * height)
        scene[horizon:] = _texture(rng, height - horizon, width, _palette(rng))
    for _ in range(int(rng.integers(0, 4))):
        w, h = (rng.uniform(0.1, 0.5, size=2) * (width, height)).astype(int)
        left, top = (rng.uniform(0.0, 1.0, size=2) * (width - w, height - h)).astype(int)
        shape = Image.new("L", (w, h))
        draw = ImageDraw.Draw(shape)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([0, 0, w - 1, h - 1], fill=255)
        alpha = (np.asarray(shape, dtype=np.float32) / 255.0)[..., None]
        colours = _palette(rng, breed.marking if rng.random() < 0.3 else None)
        region = scene[top : top + h, left : left + w]
        region[...] = region * (1.0 - alpha) + _texture(rng, h, w, colours) * alpha
    return scene


def _occluder(rng: np.random.Generator, height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """A mask of something in front of the pet: a post, a cushion or a few leaves."""
    left, top, right, bottom = box
    shape = Image.new("L", (width, height))
    draw = ImageDraw.Draw(shape)
    kind = rng.integers(3)
    if kind == 0:  # a post or table leg crossing the pet
        x = rng.uniform(left, right)
        half = rng.uniform(0.04, 0.12) * (right - left)
        draw.rectangle([x - half, 0, x + half, height], fill=255)
    elif kind == 1:  # a cushion or bowl over one corner of the pet
        cx = rng.choice([left, right]) + rng.normal(0, 0.1) * (right - left)
        cy = bottom - rng.uniform(0, 0.3) * (bottom - top)
        r = rng.uniform(0.15, 0.3) * (right - left)
        draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=255)
    else:  # leaves in the foreground
        for _ in range(int(rng.integers(2, 6))):
            cx, cy = rng.uniform(left, right), rng.uniform(top, bottom)
            r = rng.uniform(0.05, 0.12) * (right - left)
            draw.ellipse([cx - r, cy - r / 2, cx + r, cy + r / 2], fill=255)
    return np.asarray(shape, dtype=np.float32) / 255.0


def _light(rng: np.random.Generator, scene: np.ndarray) -> np.ndarray:
    """Exposure, a colour cast and light falling off across the picture."""
    height, width, _ = scene.shape
    y, x = np.ogrid[0:height, 0:width]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((x / width - 0.5) * np.cos(angle) + (y / height - 0.5) * np.sin(angle))[..., None]
    gain = rng.uniform(0.6, 1.25) * (1.0 + rng.uniform(0.0, 0.6) * ramp)
    cast = 1.0 + rng.normal(0.0, 0.05, size=3)
    return scene * gain * cast


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, fluff: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Points (N, 2) on an ellipse; ``fluff`` > 0 (with ``rng``) roughens the outline like fur."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(t)
    if fluff:
        r += fluff * 0.12 * rng.random(t.size)
    return np.stack([cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)], axis=1)


_EAR_TRIANGLES = {"pointed": (0.35, 1.75, 0.0), "erect": (0.25, 1.95, 0.0), "folded": (0.3, 1.35, -0.5)}
"""Ear shape: half-width of the base (radians on the head), tip distance (head radii), tip turn (radians)."""


def _stroke(points: np.ndarray, width: float) -> np.ndarray:
    """An outline (2N, 2) of a polyline thickened to ``width``, tapering to the end."""
    direction = np.gradient(points, axis=0)
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    half = (width / 2) * np.linspace(1.0, 0.45, len(points))[:, None]
    return np.concatenate([points + normal * half, (points - normal * half)[::-1]])


class _Pet:
    """A pet drawn from parts in its own unit frame (facing +x, y down), then placed in the photo.

    Attributes:
        silhouette: (H, W) float mask of the whole pet.
        shadow: (H, W) float mask of its shadow on the ground.
        box: (left, top, right, bottom) of the silhouette in pixels.
    """

    def __init__(self, rng: np.random.Generator, breed: Breed, height: int, width: int):
        self.breed = breed
        self.height, self.width = height, width
        self.sitting = rng.random() < 0.4
        build = breed.build * rng.uniform(0.9, 1.1)
        self.ry = 0.5 / build
        self.head_r = (0.2 if breed.species == "cat" else 0.18) * rng.uniform(0.9, 1.15)
        parts, extremities, face = self._parts(rng, breed, build)

        # Place: pets fill 40-110 % of the shorter side, may be cut off by the frame.
        scale = min(height, width) * rng.uniform(0.4, 1.1) * (0.8 + 0.2 * breed.size)
        facing = rng.choice([-1.0, 1.0])
        angle = rng.normal(0.0, 0.12)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        self.matrix = scale * rotation @ np.diag([facing, 1.0])
        self.offset = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.3, 0.75) * height])

        self.silhouette = self._fill(parts)
        self.extremities = self._fill(extremities)
        self.face = self._fill(face)
        ground = 0.5 if self.sitting else self.ry + 0.35
        self.shadow = self._fill([_ellipse(0.05, ground, 0.6, 0.08)])
        # The body's centre lies inside the frame, so the silhouette is never empty.
        ys, xs = np.nonzero(self.silhouette > 0.5)
        self.box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        # Fur is coloured only around the pet (with room for the soft edge), which is much faster.
        top, bottom = max(int(ys.min()) - 3, 0), min(int(ys.max()) + 4, height)
        left, right = max(int(xs.min()) - 3, 0), min(int(xs.max()) + 4, width)
        self.crop = (slice(top, bottom), slice(left, right))
        self.eyes = self._fill(self._eye_and_nose())

        # Pixel coordinates of the crop back in the pet's frame, for coat patterns.
        y, x = np.ogrid[top:bottom, left:right]
        (a, b), (c, d) = (np.diag([facing, 1.0]) @ rotation.T / scale).astype(np.float32)  # inverse of matrix
        x, y = x.astype(np.float32) - self.offset[0], y.astype(np.float32) - self.offset[1]
        self.u, self.v = a * x + b * y, c * x + d * y

    def _parts(self, rng: np.random.Generator, breed: Breed, build: float) -> tuple[list, list, list]:
        """Return polygons of the body parts, of the extremities and of the face."""
        fluff, ry, hr = breed.fluff, self.ry, self.head_r
        if self.sitting:
            body = [_ellipse(0.0, 0.0, 0.3, 0.42, fluff, rng), _ellipse(-0.12, 0.25, 0.27, 0.2, fluff, rng)]
            head = (0.14, -0.52)
            legs = [np.array([[x, 0.05], [x + 0.09, 0.05], [x + 0.09, 0.45], [x, 0.45]]) for x in (0.08, 0.19)]
            tail_root = np.array([-0.32, 0.38])
            tail_dir = np.array([1.0, 0.05])
        else:
            body = [_ellipse(0.0, 0.0, 0.5, ry, fluff, rng)]
            head = (0.52, -ry - 0.1)
            leg_length = (0.3 if breed.species == "cat" else 0.35) * min(1.0, 1.9 / build)
            legs = []
            for x in (-0.36, -0.24, 0.22, 0.34):
                sway = rng.normal(0.0, 0.04)
                foot = ry + leg_length
                legs.append(np.array([[x, 0], [x + 0.09, 0], [x + 0.09 + sway, foot], [x + sway, foot]]))
            tail_root = np.array([-0.48, -0.35 * ry])
            tail_dir = np.array([-0.7, -0.7])
            neck = [[0.25, -ry * 0.6], [head[0] - 0.05, head[1]], [head[0] + 0.1, head[1] + hr], [0.45, 0]]
            body.append(np.array(neck))
        hx, hy = self.head = head
        head_shape = _ellipse(hx, hy, hr, hr * 0.95, fluff, rng)
        snout_length = hr * (0.3 + breed.snout)
        snout = _ellipse(hx + hr * 0.6 + snout_length * 0.5, hy + hr * 0.3, snout_length * 0.6 + 0.02, hr * 0.42)
        ears = self._ears(rng, breed, hx, hy, hr)
        tail = self._tail(rng, breed, tail_root, tail_dir)
        parts = body + legs + [head_shape, snout] + ears + [tail]
        paws = [leg.copy() for leg in legs]
        for paw in paws:  # lower half of each leg
            paw[:2, 1] = (paw[0, 1] + paw[2, 1]) / 2
        return parts, ears + [snout, tail] + paws, ears + [snout]

    def _ears(self, rng: np.random.Generator, breed: Breed, hx: float, hy: float, hr: float) -> list[np.ndarray]:
        ears = []
        for base_angle in (-1.15, -1.95):  # the near and the far ear, up from the head
            a = base_angle + rng.normal(0, 0.08)
            if breed.ears == "floppy":  # hangs beside the head
                drop = hr * (1.1 if breed.name == "basset_hound" else 0.7)
                centre_x = hx - hr * 0.25 + (a + 1.5) * hr * 0.4
                ears.append(_ellipse(centre_x, hy + hr * 0.35, hr * 0.32, drop, breed.fluff, rng))
                continue
            spread, reach, tip = _EAR_TRIANGLES[breed.ears]
            corners = [(a - spread, 0.9), (a + tip, reach), (a + spread, 0.9)]
            ears.append(np.array([[hx + hr * r * np.cos(angle), hy + hr * r * np.sin(angle)] for angle, r in corners]))
        return ears

    def _tail(self, rng: np.random.Generator, breed: Breed, root: np.ndarray, direction: np.ndarray) -> np.ndarray:
        t = np.linspace(0.0, 1.0, 16)[:, None]
        bend = rng.uniform(-0.3, 0.3)
        if breed.tail == "curled":  # a ring rising from the root
            angles = np.linspace(np.pi / 2, -np.pi * 1.1, 16)
            points = root + np.array([0.0, -0.15]) + 0.15 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
            return _stroke(points, 0.1 + 0.06 * breed.fluff)
        length = {"long": 0.55, "plume": 0.5, "short": 0.12}[breed.tail] * rng.uniform(0.85, 1.15)
        side = np.array([-direction[1], direction[0]])
        points = root + length * (t * direction + bend * t**2 * side)
        width = 0.13 if breed.tail == "plume" else (0.06 if breed.species == "cat" else 0.08)
        return _stroke(points, width)

    def _eye_and_nose(self) -> list[np.ndarray]:
        hx, hy = self.head
        r = self.head_r
        eye = _ellipse(hx + r * 0.35, hy - r * 0.15, r * 0.13, r * 0.13)
        nose = _ellipse(hx + r * (1.0 + self.breed.snout * 0.9), hy + r * 0.3, r * 0.12, r * 0.1)
        return [eye, nose]

    def _fill(self, polygons: list[np.ndarray]) -> np.ndarray:
        """Rasterise polygons given in the pet's frame to a float mask of the photo."""
        mask = Image.new("L", (self.width, self.height))
        draw = ImageDraw.Draw(mask)
        for polygon in polygons:
            pixels = polygon @ self.matrix.T + self.offset
            draw.polygon([tuple(p) for p in pixels.tolist()], fill=255)
        return np.asarray(mask, dtype=np.float32) / 255.0

    def colours(self, rng: np.random.Generator) -> np.ndarray:
        """The pet's fur colour at every pixel of ``crop`` (h, w, 3) in [0, 1]."""
        breed, u, v, crop = self.breed, self.u, self.v, self.crop
        height, width = u.shape
        colours = np.array([breed.coat, breed.marking]) / 255.0 + rng.normal(0, 0.05, size=(2, 3))
        coat, marking = np.clip(colours, 0, 1).astype(np.float32)
        pattern = breed.pattern
        if pattern == "tabby":
            weight = (np.sin(2 * np.pi * (u * rng.uniform(8, 12) + 0.25 * np.sin(v * 9))) > 0.3).astype(np.float32)
        elif pattern in ("spotted", "patches"):
            number, radii = ((25, 45), (0.03, 0.06)) if pattern == "spotted" else ((2, 5), (0.1, 0.25))
            spots = [
                _ellipse(rng.uniform(-0.5, 0.6), rng.uniform(-0.6, 0.5), *rng.uniform(*radii, size=2))
                for _ in range(int(rng.integers(*number)))
            ]
            weight = self._fill(spots)[crop]
        elif pattern == "ticked":
            weight = 0.6 * rng.random((height, width), dtype=np.float32)
        elif pattern == "points":
            weight = np.maximum(_blur(self.extremities, 2.0), _blur(self.face, 3.0))[crop]
        elif pattern == "mask":
            weight = _blur(self.face, 2.0)[crop]
        elif pattern == "bicolor":  # pale belly, chest and legs
            if self.sitting:
                weight = ((u > 0.02) & (v > -0.35)).astype(np.float32)
            else:
                weight = ((v > 0.3 * self.ry) | ((u > 0.35) & (v > -self.ry))).astype(np.float32)
        elif pattern in ("saddle", "tricolor"):  # dark back
            if self.sitting:
                weight = (u < -0.12).astype(np.float32)
            else:
                weight = ((v < -0.3 * self.ry) & (u < 0.4)).astype(np.float32)
        elif pattern == "hairless":
            weight = 0.25 * (np.sin(v * 80 + np.sin(u * 20)) > 0.6).astype(np.float32)
        else:
            weight = np.zeros((height, width), dtype=np.float32)
        weight = weight[..., None]
        if pattern == "tricolor":  # black saddle on a white coat, tan head and ears
            fur = coat * (1.0 - weight) + np.array([0.08, 0.07, 0.06], dtype=np.float32) * weight
            head = _blur(self.face, 3.0)[crop][..., None]
            fur = fur * (1.0 - head) + marking * head
        else:
            fur = coat * (1.0 - weight) + marking * weight

        # Fur grain, and shading that darkens the belly side as under a ceiling light.
        grain = 1.0 + (0.12 - 0.1 * (pattern == "hairless")) * (rng.random((height, width, 1), dtype=np.float32) - 0.5)
        shade = 1.0 - 0.25 * np.clip(v / (2 * self.ry) + 0.3, 0.0, 1.0)[..., None]
        fur = fur * grain * shade
        eyes = self.eyes[crop][..., None]
        return fur * (1.0 - eyes) + 0.05 * eyes
