"""The synthetic world the embedded ShapesT2I model is trained on, scored in, and drawn from.

A scene is 1-3 coloured shapes on a plain or mildly graded background, each shape inside its own
cell of a 3x3 grid. Everything is seeded through a numpy Generator, so a seed gives the same
pixels, captions and boxes on every machine. The spec is fixed: the oracle, the
held-out prompts and every benchmark score against it, so change nothing here without changing
those too.

Images are drawn at twice the output size and box-downsampled, which anti-aliases the edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 35, 35),
    "green": (40, 175, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 35),
    "purple": (145, 55, 200),
    "orange": (250, 140, 25),
}
BACKGROUNDS = {
    "black": (22, 22, 22),
    "white": (235, 235, 235),
    "gray": (125, 125, 125),
}
# Cell index = row * 3 + column, row 0 at the top.
CELL_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
COLOUR_JITTER = 15
GRID = 3
# Radius as a fraction of a cell's side ("about 1/3 to 1/2 of a cell").
RADIUS_RANGE = (0.33, 0.45)
# Gap kept between a shape and its cell's edges, as a fraction of a cell, so shapes in
# neighbouring cells never touch (the oracle separates them by connected components).
CELL_MARGIN = 0.05
STAR_INNER_RATIO = 0.45
SQUARE_HALF_SIDE = 0.86  # of the radius: a square reads about as big as a circle of that radius
GRADIENT_RANGE = (8, 20)  # half the top-to-bottom change of a graded background, per channel
P_GRADIENT = 0.5
P_POSITION_PHRASES = 0.75
P_BACKGROUND_PHRASE = 0.6
OBJECT_COUNT_WEIGHTS = (0.4, 0.35, 0.25)  # 1, 2, 3 objects


@dataclass
class ShapeObject:
    colour: str
    shape: str
    cell: int
    center: tuple[float, float]  # x, y in 0..1 image coordinates
    radius: float  # 0..1 image coordinates
    rgb: tuple[int, int, int]  # the jittered colour actually drawn

    @property
    def box(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 of the drawn outline, 0..1 image coordinates."""
        xs, ys = zip(*shape_outline(self.shape, self.center, self.radius))
        return (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))

    @property
    def position_phrase(self) -> str:
        return CELL_PHRASES[self.cell]

    def to_dict(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "cell": self.cell,
                "box": [round(v, 4) for v in self.box]}


@dataclass
class Scene:
    objects: list[ShapeObject]
    background: str
    background_top: tuple[int, int, int]  # the background's colour at the top row
    background_bottom: tuple[int, int, int]  # ... and at the bottom row (equal when flat)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [o.to_dict() for o in self.objects]}


def cell_bounds(cell: int) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a grid cell in 0..1 image coordinates."""
    row, col = divmod(cell, GRID)
    return (col / GRID, row / GRID, (col + 1) / GRID, (row + 1) / GRID)


def cell_of_point(x: float, y: float) -> int:
    col = min(GRID - 1, max(0, int(x * GRID)))
    row = min(GRID - 1, max(0, int(y * GRID)))
    return row * GRID + col


def shape_outline(shape: str, center: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The shape's outline as points (circles: their bounding box corners)."""
    cx, cy = center
    r = radius
    if shape == "circle":
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = r * SQUARE_HALF_SIDE
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # upright, apex at the top, filling its box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, one straight up; centred on its box, not its centroid
        points = []
        for k in range(10):
            angle = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * STAR_INNER_RATIO
            points.append((np.cos(angle) * rr, np.sin(angle) * rr))
        top, bottom = min(p[1] for p in points), max(p[1] for p in points)
        shift = -(top + bottom) / 2
        return [(cx + float(x), cy + float(y + shift)) for x, y in points]
    raise ValueError(f"unknown shape {shape!r}")


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    delta = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(rgb) + delta, 0, 255))


def sample_scene(rng: np.random.Generator, n_objects: int | None = None,
                 colours=None, shapes=None, cells=None, background: str | None = None) -> Scene:
    """Draw a random scene. Optional lists fix the colour/shape/cell of each object in turn."""
    if n_objects is None:
        if colours is not None or shapes is not None or cells is not None:
            n_objects = len(colours or shapes or cells)
        else:
            n_objects = int(rng.choice([1, 2, 3], p=OBJECT_COUNT_WEIGHTS))
    if cells is None:
        cells = [int(c) for c in rng.choice(GRID * GRID, size=n_objects, replace=False)]
    objects = []
    for i in range(n_objects):
        colour = colours[i] if colours is not None else str(rng.choice(list(COLOURS)))
        shape = shapes[i] if shapes is not None else str(rng.choice(SHAPES))
        cell = int(cells[i])
        radius_in_cells = rng.uniform(*RADIUS_RANGE)
        slack = max(0.0, 0.5 - radius_in_cells - CELL_MARGIN)
        offset = rng.uniform(-slack, slack, size=2)
        row, col = divmod(cell, GRID)
        center = ((col + 0.5 + offset[0]) / GRID, (row + 0.5 + offset[1]) / GRID)
        objects.append(ShapeObject(colour, shape, cell, (float(center[0]), float(center[1])),
                                   float(radius_in_cells / GRID), _jitter(rng, COLOURS[colour])))
    if background is None:
        background = str(rng.choice(list(BACKGROUNDS)))
    base = np.array(BACKGROUNDS[background])
    if rng.random() < P_GRADIENT:
        half = rng.integers(GRADIENT_RANGE[0], GRADIENT_RANGE[1] + 1) * rng.choice([-1, 1])
        top = tuple(int(v) for v in np.clip(base + half, 0, 255))
        bottom = tuple(int(v) for v in np.clip(base - half, 0, 255))
    else:
        top = bottom = tuple(int(v) for v in base)
    return Scene(objects, background, top, bottom)


def _background_array(scene: Scene, size: int) -> np.ndarray:
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    top = np.array(scene.background_top, dtype=np.float32)
    bottom = np.array(scene.background_bottom, dtype=np.float32)
    rows = top[None, :] * (1 - t[:, None]) + bottom[None, :] * t[:, None]
    return np.repeat(rows[:, None, :], size, axis=1)


def render_array(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 array, drawn at 2x and box-downsampled."""
    big = 2 * size
    canvas = Image.fromarray(np.round(_background_array(scene, big)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        # Pixel centres sit at half-integers: scale 0..1 coordinates to 0..big and shift by -0.5.
        points = [(x * big - 0.5, y * big - 0.5) for x, y in shape_outline(obj.shape, obj.center, obj.radius)]
        if obj.shape == "circle":
            draw.ellipse([points[0], points[1]], fill=obj.rgb)
        else:
            draw.polygon(points, fill=obj.rgb)
    return downsample(np.asarray(canvas), size)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as a PIL image (see render_array)."""
    return Image.fromarray(render_array(scene, size))


def downsample(img, size: int) -> np.ndarray:
    """Box-filter an image (PIL or HxWx3 uint8 array) down to size x size; size must divide it."""
    arr = np.asarray(img)
    factor = arr.shape[0] // size
    if factor * size != arr.shape[0] or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"cannot box-downsample {arr.shape[:2]} to {size}x{size}")
    if factor == 1:
        return arr.copy()
    blocks = arr.reshape(size, factor, size, factor, -1).astype(np.float32).mean(axis=(1, 3))
    return np.clip(np.round(blocks), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: ShapeObject, with_position: bool) -> str:
    phrase = f"{_article(obj.colour)} {obj.colour} {obj.shape}"
    return f"{phrase} {obj.position_phrase}" if with_position else phrase


def caption_for(scene: Scene, with_position: bool, with_background: bool) -> str:
    phrases = [object_phrase(o, with_position) for o in scene.objects]
    if len(phrases) == 1:
        text = phrases[0]
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if with_background:
        text += f", {scene.background} background"
    return text


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption for the scene; position and background phrases are sometimes left out."""
    with_position = bool(rng.random() < P_POSITION_PHRASES)
    with_background = bool(rng.random() < P_BACKGROUND_PHRASE)
    return caption_for(scene, with_position, with_background)


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (lowercase, punctuation as its own word)."""
    words = {"a", "an", "and", ",", "background"} | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS)
    for phrase in CELL_PHRASES:
        words.update(phrase.split())
    return sorted(words)


def sample(rng: np.random.Generator, size: int = 64, n_objects: int | None = None):
    """One (image array, caption, scene) triple."""
    scene = sample_scene(rng, n_objects)
    return render_array(scene, size), caption(scene, rng), scene


def generate_batch(seed: int, count: int, size: int = 32, one_object_fraction: float | None = None,
                   exclude_captions=frozenset()):
    """Pre-generate `count` samples for training: (uint8 array (N, size, size, 3), captions, n_objects).

    Rendered at 64 px (drawn at 128) and box-downsampled to `size`, so the pixels equal
    downsample(render(scene, 64), size). `one_object_fraction` overrides the object count mix
    (1 object with that probability, else 2 or 3). Samples whose caption is in
    `exclude_captions` are drawn again (the held-out prompts).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    counts = np.empty(count, dtype=np.int8)
    i = 0
    while i < count:
        n = None
        if one_object_fraction is not None:
            n = 1 if rng.random() < one_object_fraction else int(rng.choice([2, 3], p=[0.6, 0.4]))
        scene = sample_scene(rng, n)
        text = caption(scene, rng)
        if text in exclude_captions:
            continue
        img = render_array(scene, 64)
        images[i] = img if size == 64 else downsample(img, size)
        captions.append(text)
        counts[i] = len(scene.objects)
        i += 1
    return images, captions, counts
