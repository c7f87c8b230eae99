"""Procedural text-to-image data: coloured shapes on white, captioned in GenEval's six prompt families.

A prompt-following model must be learnable on two CPU cores, and its quality must be checkable
exactly. Scenes are a few flat shapes (circle, square, triangle, cross) in six well-separated
colours; every caption is made from a scene's specification, so the judge knows what the image must
show. GenEval's families: single object, two objects, counting (1-4), colours, position (left of /
right of / above / below) and colour attribution. A few colour-shape pairs are never rendered in
training and a few position captions never written: the held-out split asks for exactly those, to
measure compositional generalisation.

Everything comes from a seed: the same seed gives the same scenes, captions and pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a camera would see them
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (220, 30, 30), "yellow": (235, 195, 0), "green": (20, 150, 50),
    "blue": (30, 80, 230), "purple": (145, 50, 190), "black": (25, 25, 25),
}
BACKGROUND = (255, 255, 255)
FAMILIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
SIZE_RANGE = (10, 14)  # object extent in pixels at 32 px: a circle under 10 px rasterises nearly square
GAP = 2  # pixels between the boxes of two objects, so that each is its own connected region

HELD_OUT_PAIRS = frozenset({("blue", "triangle"), ("red", "cross"), ("green", "circle"), ("yellow", "square")})
HELD_OUT_POSITIONS = frozenset({("triangle", "above", "circle"), ("square", "left of", "cross"),
                                ("circle", "below", "square"), ("cross", "right of", "triangle")})
HELD_OUT_FAMILIES = ("colors", "position", "color_attr")

_RELATION_WORDS = {"left of": ("left of", "to the left of"), "right of": ("right of", "to the right of"),
                   "above": ("above", "over"), "below": ("below", "under")}
_PREFIXES = ("", "a photo of ", "an image of ")


@dataclass(frozen=True)
class Thing:
    """One drawn object: its shape, colour name, centre (x, y) and extent, in pixels of the 32 px image."""

    shape: str
    colour: str
    x: float
    y: float
    size: float


@dataclass(frozen=True)
class Prompt:
    """A caption and what it asks for: the family, the objects named (shape, colour or None), their count
    (counting) and the relation between the first and the second (position)."""

    caption: str
    family: str
    objects: tuple[tuple[str, str | None], ...]
    count: int | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Scene:
    prompt: Prompt
    things: tuple[Thing, ...] = field(default_factory=tuple)


def _allowed(colour: str, shape: str, split: str) -> bool:
    return split != "train" or (colour, shape) not in HELD_OUT_PAIRS


def _random_colour(rng: np.random.Generator, shape: str, split: str) -> str:
    names = [c for c in COLOURS if _allowed(c, shape, split)]
    return names[rng.integers(len(names))]


def _two_shapes(rng: np.random.Generator) -> tuple[str, str]:
    a, b = rng.choice(len(SHAPES), 2, replace=False)
    return SHAPES[a], SHAPES[b]


def _caption(rng: np.random.Generator, body: str) -> str:
    return _PREFIXES[rng.integers(len(_PREFIXES))] + body


def sample_prompt(rng: np.random.Generator, family: str, split: str = "train") -> Prompt:
    """One prompt of `family`. 'train' never names a held-out colour-shape pair or position caption;
    'held_out' always names one (colour families and position only)."""
    if split == "held_out" and family not in HELD_OUT_FAMILIES:
        raise ValueError(f"the held-out split has {', '.join(HELD_OUT_FAMILIES)} prompts, not {family}")
    held_out = split == "held_out"
    if family == "single_object":
        shape = SHAPES[rng.integers(len(SHAPES))]
        return Prompt(_caption(rng, f"a {shape}"), family, ((shape, None),))
    if family == "two_objects":
        a, b = _two_shapes(rng)
        return Prompt(_caption(rng, f"a {a} and a {b}"), family, ((a, None), (b, None)))
    if family == "counting":
        shape, n = SHAPES[rng.integers(len(SHAPES))], int(rng.integers(1, 5))
        noun = shape if n == 1 else PLURALS[shape]
        return Prompt(_caption(rng, f"{NUMBERS[n - 1]} {noun}"), family, ((shape, None),), count=n)
    if family == "colors":
        while True:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
            if ((colour, shape) in HELD_OUT_PAIRS) == held_out:
                return Prompt(_caption(rng, f"a {colour} {shape}"), family, ((shape, colour),))
    if family == "position":
        while True:
            (a, b), relation = _two_shapes(rng), RELATIONS[rng.integers(len(RELATIONS))]
            if ((a, relation, b) in HELD_OUT_POSITIONS) == held_out:
                words = _RELATION_WORDS[relation][rng.integers(2)]
                return Prompt(_caption(rng, f"a {a} {words} a {b}"), family, ((a, None), (b, None)),
                              relation=relation)
    if family == "color_attr":
        while True:
            (a, b) = _two_shapes(rng)
            ca, cb = rng.choice(list(COLOURS), 2, replace=False)
            if (((ca, a) in HELD_OUT_PAIRS or (cb, b) in HELD_OUT_PAIRS)) == held_out:
                return Prompt(_caption(rng, f"a {ca} {a} and a {cb} {b}"), family, ((a, str(ca)), (b, str(cb))))
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")


def _place(rng: np.random.Generator, sizes: list[float], relation: str | None) -> list[tuple[float, float]] | None:
    """Centres for objects of `sizes`, apart by GAP; the first two in `relation` with a clear margin."""
    placed: list[tuple[float, float, float]] = []
    for size in sizes:
        for _ in range(100):
            half = size / 2
            x, y = rng.uniform(half + 1, RESOLUTION - half - 1, 2)
            if len(placed) == 1 and relation:
                ox, oy, osize = placed[0]
                dx, dy = x - ox, y - oy  # the second object relative to the first
                along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx),
                                 "below": (-dy, dx)}[relation]
                if along < (size + osize) / 2 + GAP or abs(across) > along / 2:
                    continue
            if all(max(abs(x - px), abs(y - py)) >= (size + ps) / 2 + GAP for px, py, ps in placed):
                placed.append((x, y, size))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def sample_scene(rng: np.random.Generator, family: str, split: str = "train") -> Scene:
    prompt = sample_prompt(rng, family, split)
    pixel_split = "train" if split == "train" else "any"
    if prompt.count:
        shape = prompt.objects[0][0]
        wanted = [(shape, _random_colour(rng, shape, pixel_split)) for _ in range(prompt.count)]
    else:
        wanted = [(shape, colour or _random_colour(rng, shape, pixel_split)) for shape, colour in prompt.objects]
    while True:
        sizes = list(rng.uniform(*SIZE_RANGE, len(wanted)))
        centres = _place(rng, sizes, prompt.relation)
        if centres:
            return Scene(prompt, tuple(Thing(s, c, x, y, size) for (s, c), (x, y), size in zip(wanted, centres, sizes)))


def _outline(thing: Thing, scale: int) -> list[tuple[float, float]] | tuple[float, float, float, float]:
    x, y, h = thing.x * scale, thing.y * scale, thing.size * scale / 2
    if thing.shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if thing.shape == "cross":
        t = h / 3
        return [(x - t, y - h), (x + t, y - h), (x + t, y - t), (x + h, y - t), (x + h, y + t), (x + t, y + t),
                (x + t, y + h), (x - t, y + h), (x - t, y + t), (x - h, y + t), (x - h, y - t), (x - t, y - t)]
    return (x - h, y - h, x + h, y + h)


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as (resolution, resolution, 3) uint8 RGB."""
    from PIL import Image, ImageDraw

    scale = SUPERSAMPLE * resolution / RESOLUTION
    big = resolution * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for thing in scene.things:
        outline, colour = _outline(thing, scale), COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse(outline, fill=colour)
        elif thing.shape == "square":
            draw.rectangle(outline, fill=colour)
        else:
            draw.polygon(outline, fill=colour)
    return np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX))


def family_of(index: int, seed: int) -> str:
    return FAMILIES[np.random.default_rng([seed, index, 0]).integers(len(FAMILIES))]


def scene_at(index: int, seed: int = 0, split: str = "train", family: str | None = None) -> Scene:
    """Scene number `index` of the stream `seed`: random access, so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, index, 1])
    return sample_scene(rng, family or family_of(index, seed), split)


@dataclass(frozen=True)
class SceneSet:
    """Rendered scenes: uint8 images (N, H, W, 3), their captions and their prompts."""

    images: np.ndarray
    prompts: list[Prompt]

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def tensors(self):
        """Images as float32 torch tensors (N, 3, H, W) in [-1, 1], the diffusers convention."""
        import torch

        return torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_set(scenes: list[Scene], resolution: int = RESOLUTION) -> SceneSet:
    images = np.stack([render(s, resolution) for s in scenes]) if scenes else np.zeros((0, resolution, resolution, 3),
                                                                                         np.uint8)
    return SceneSet(images, [s.prompt for s in scenes])


def training_set(count: int, seed: int = 0, resolution: int = RESOLUTION) -> SceneSet:
    """The first `count` scenes of the training stream: families in equal shares, no held-out pair drawn."""
    return render_set([scene_at(i, seed) for i in range(count)], resolution)


# Sixteen prompts, every family at least twice: grids, calibration trajectories and examples use them.
SHOWCASE_PROMPTS = ["a red circle", "a triangle", "a cross", "a circle and a square", "a triangle and a cross",
                    "two circles", "three triangles", "four squares", "a green triangle", "a purple cross",
                    "a circle left of a square", "a triangle above a cross", "a cross below a circle",
                    "a red square and a blue circle", "a yellow triangle and a black cross", "a blue cross"]

EVAL_SEED = 20261205


def evaluation_scenes(split: str = "in_distribution", per_family: int = 32) -> list[Scene]:
    """GenEval-style evaluation prompts with a reference scene each: `per_family` of every family in
    'in_distribution', of each held-out family in 'held_out'. Seeded apart from any training stream."""
    if split not in ("in_distribution", "held_out"):
        raise ValueError(f"split must be 'in_distribution' or 'held_out', not {split!r}")
    families = FAMILIES if split == "in_distribution" else HELD_OUT_FAMILIES
    data_split = "train" if split == "in_distribution" else "held_out"
    return [sample_scene(np.random.default_rng([EVAL_SEED, FAMILIES.index(f), i, split == "held_out"]), f, data_split)
            for f in families for i in range(per_family)]


def vocabulary_captions() -> list[str]:
    """Phrases holding every word any caption uses, so a tokenizer built from them covers all prompts."""
    words = [*SHAPES, *PLURALS.values(), *COLOURS, *NUMBERS, "and", "a", *_PREFIXES[1:]]
    return words + [w for pair in _RELATION_WORDS.values() for w in pair]
