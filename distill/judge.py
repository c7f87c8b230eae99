"""The judge: reads shapes, colours, counts and positions off an image and checks each clause of a prompt.

GenEval scores a generator by detecting the objects a prompt names and checking every clause
(present, how many, which colour, where). Our scenes are flat colours on white, so detection can be
exact and needs no training: each pixel is un-mixed against white for every palette colour (an
anti-aliased edge is a colour blended with the background), the colour that explains it best with
at least half coverage labels it, connected regions of one label are objects, and a region's shape
is the nearest of four prototypes in (fill of its box, centroid offset, fill of its corners) space,
or no shape at all where even the nearest is far (a blob is not a circle). Nothing here comes from
the model being judged.

Scores follow GenEval: per family, the fraction of images whose every clause holds; overall, the
mean of the families. `features` gives the vector the Fréchet distance (the FID analogue) is
computed on: colour coverage, counts per shape and colour, sizes and places of objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from .scenes import COLOURS, FAMILIES, SHAPES, Prompt, Scene

MIN_AREA = 12  # pixels at 32 px: the smallest object covers about 40; smaller regions are edge debris
RELATION_MARGIN = 2.0  # pixels the centres must differ by along the named axis
SHAPE_TOLERANCE = 0.25  # farthest a region may sit from its shape's prototype (renders: 0.19, VAE recons: 0.22)
UNKNOWN = "unknown"  # a region of colour that is no shape: a blob satisfies no clause
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    x: float
    y: float
    area: int


def unmix(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the palette index that best explains it as colour-over-white (-1 for background) and its coverage."""
    pixels = 255.0 - image.astype(np.float32).reshape(-1, 3)  # distance from white
    towards = 255.0 - _PALETTE  # each colour's distance from white
    alpha = np.clip(pixels @ towards.T / (towards * towards).sum(1), 0.0, 1.0)  # (P, C)
    residual = np.linalg.norm(pixels[:, None, :] - alpha[:, :, None] * towards[None], axis=-1)
    best = residual.argmin(1)
    coverage = alpha[np.arange(len(best)), best]
    label = np.where(coverage >= 0.5, best, -1)
    return label.reshape(image.shape[:2]), coverage.reshape(image.shape[:2])


def _region_features(region: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Shape features of one region: fill of its box, vertical and horizontal centroid offsets, fill of the
    box's corner ninths, log aspect ratio, and the share of its outline's area that is a hole.

    Fill uses the anti-aliased coverage around the region (area over widest row times tallest column),
    so a 10 px circle is not mistaken for the rounded square its hard mask is. The last three are zero
    for every drawn shape: they let the judge reject blobs, bars, rings and L-shapes."""
    from scipy import ndimage

    soft = np.where(ndimage.binary_dilation(region), coverage, 0.0)
    fill = soft.sum() / (soft.sum(1).max() * soft.sum(0).max())
    ys, xs = np.nonzero(region)
    top, left = ys.min(), xs.min()
    h, w = ys.max() - top + 1, xs.max() - left + 1
    box = region[top:top + h, left:left + w]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    corner = ((rows < h / 3) | (rows >= 2 * h / 3)) & ((cols < w / 3) | (cols >= 2 * w / 3))
    down = (ys.mean() - top - (h - 1) / 2) / h  # a triangle's mass sits low in its box
    across = (xs.mean() - left - (w - 1) / 2) / w
    hole = 1.0 - box.sum() / ndimage.binary_fill_holes(box).sum()
    return np.array([fill, down, box[corner].mean(), across, np.log(w / h), hole])


@cache
def _prototypes() -> np.ndarray:
    """Mean region features of each shape over rendered scenes: the classifier's only parameters."""
    from .scenes import SIZE_RANGE, Thing, render

    rng = np.random.default_rng(0)
    rows = []
    for shape in SHAPES:
        feats = []
        for _ in range(64):
            size = rng.uniform(*SIZE_RANGE)
            x, y = rng.uniform(8, 24, 2)
            thing = Thing(shape, "black", x, y, size)
            label, coverage = unmix(render(Scene(None, (thing,))))  # type: ignore[arg-type]
            feats.append(_region_features(label >= 0, coverage))
        rows.append(np.mean(feats, 0))
    return np.stack(rows)


def _classify(features: np.ndarray) -> str:
    distance = np.sqrt((((_prototypes() - features) * np.array([2.0, 2.0, 0.5, 2.0, 1.0, 2.0])) ** 2).sum(1))
    nearest = int(np.argmin(distance))
    return SHAPES[nearest] if distance[nearest] <= SHAPE_TOLERANCE else UNKNOWN


@dataclass(frozen=True)
class Reading:
    """What the judge reads off one image: each pixel's palette label (-1 for background) and the objects."""

    label: np.ndarray
    found: list[Detection]


def read(image: np.ndarray) -> Reading:
    """Un-mix a uint8 RGB image once and detect its objects, largest first."""
    from scipy import ndimage

    label, coverage = unmix(image)
    found = []
    for index, colour in enumerate(_NAMES):
        regions, n = ndimage.label(label == index)  # 4-connected: diagonal neighbours are separate objects
        for region in range(1, n + 1):
            mask = regions == region
            ys, xs = np.nonzero(mask)
            if len(ys) >= MIN_AREA:
                found.append(Detection(_classify(_region_features(mask, coverage)), colour, float(xs.mean()),
                                       float(ys.mean()), len(ys)))
    return Reading(label, sorted(found, key=lambda d: -d.area))


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a uint8 RGB image, largest first."""
    return read(image).found


def _holds(relation: str, a: Detection, b: Detection) -> bool:
    dx, dy = b.x - a.x, b.y - a.y  # from the first object to the second
    along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
    return along >= RELATION_MARGIN


def satisfies(prompt: Prompt, found: list[Detection]) -> bool:
    """Whether every clause of `prompt` holds for the detections, as GenEval checks them."""
    def of(shape: str, colour: str | None = None) -> list[Detection]:
        return [d for d in found if d.shape == shape and (colour is None or d.colour == colour)]

    if prompt.family == "counting":
        return len(of(prompt.objects[0][0])) == prompt.count
    groups = [of(shape, colour) for shape, colour in prompt.objects]
    if not all(groups):
        return False
    if prompt.family == "position":
        return any(_holds(prompt.relation, a, b) for a in groups[0] for b in groups[1])
    return True


def features(reading: Reading) -> np.ndarray:
    """The Fréchet-distance vector of one image: colour coverage, counts by shape and colour, object geometry."""
    label, found = reading.label, reading.found
    coverage = [(label == i).mean() for i in range(len(_NAMES))]
    by_shape = [sum(d.shape == s for d in found) for s in SHAPES]
    by_colour = [sum(d.colour == c for d in found) for c in _NAMES]
    side = label.shape[0]
    geometry = ([np.mean([d.area for d in found]) / side**2, np.mean([d.x for d in found]) / side,
                 np.mean([d.y for d in found]) / side] if found else [0.0, 0.5, 0.5])
    return np.array(coverage + by_shape + by_colour + [len(found)] + geometry, dtype=np.float64)


def geneval(readings: list[Reading], scenes: list[Scene]) -> dict:
    """GenEval-style scores of the images read (one per scene's prompt): per family and overall (their mean)."""
    if len(readings) != len(scenes):
        raise ValueError("one image per prompt")
    passed: dict[str, list[bool]] = {}
    for reading, scene in zip(readings, scenes):
        passed.setdefault(scene.prompt.family, []).append(satisfies(scene.prompt, reading.found))
    families = {f: float(np.mean(passed[f])) for f in FAMILIES if f in passed}
    return {"overall": float(np.mean(list(families.values()))), "families": families}
