"""The offline smoke dataset: deterministic black-on-white line drawings of simple scenes, with captions."""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from stylestudy.data.dataset import METADATA, write_jsonl

Box = tuple[float, float, float, float]
Stroke = tuple[str, list[tuple[float, float]]]  # ("line" | "poly" | "ellipse", points in a unit box, y down)

_RAYS = [(1, 0), (-1, 0), (0, 1), (0, -1), (.7, .7), (-.7, .7), (.7, -.7), (-.7, -.7)]
SHAPES: dict[str, list[Stroke]] = {
    "house": [("poly", [(0, .45), (.5, 0), (1, .45)]), ("poly", [(0, .45), (1, .45), (1, 1), (0, 1)]),
              ("line", [(.2, 1), (.2, .65), (.42, .65), (.42, 1)]),
              ("poly", [(.6, .55), (.85, .55), (.85, .75), (.6, .75)])],
    "tree": [("line", [(.4, 1), (.42, .55)]), ("line", [(.6, 1), (.58, .55)]), ("ellipse", [(0, 0), (1, .65)])],
    "person": [("ellipse", [(.38, 0), (.62, .18)]), ("line", [(.5, .18), (.5, .6)]),
               ("line", [(.1, .45), (.5, .3), (.9, .45)]), ("line", [(.2, 1), (.5, .6), (.8, 1)])],
    "car": [("poly", [(.22, .45), (.32, .05), (.68, .05), (.8, .45)]),
            ("poly", [(0, .45), (1, .45), (1, .8), (0, .8)]),
            ("ellipse", [(.12, .6), (.36, 1)]), ("ellipse", [(.64, .6), (.88, 1)])],
    "horse": [("line", [(.2, .5), (.18, 1)]), ("line", [(.3, .5), (.32, 1)]), ("line", [(.62, .5), (.6, 1)]),
              ("line", [(.72, .5), (.75, 1)]), ("ellipse", [(.1, .25), (.82, .62)]), ("line", [(.7, .3), (.84, .05)]),
              ("line", [(.8, .42), (.92, .12)]), ("ellipse", [(.8, 0), (1, .16)]), ("line", [(.12, .35), (0, .7)])],
    "boat": [("poly", [(0, .6), (1, .6), (.85, .85), (.15, .85)]), ("line", [(.5, .6), (.5, 0)]),
             ("poly", [(.48, .05), (.48, .55), (.1, .55)]),
             ("line", [(0, 1), (.25, .94), (.5, 1), (.75, .94), (1, 1)])],
    "mountain": [("line", [(0, 1), (.2, .35), (.35, .7), (.6, 0), (.8, .55), (1, .8)]),
                 ("line", [(.5, .2), (.6, .3), (.7, .2)])],
    "road": [("line", [(0, 0), (1, 0)]), ("line", [(0, 1), (.45, 0)]), ("line", [(1, 1), (.55, 0)]),
             ("line", [(.5, .1), (.5, .25)]), ("line", [(.5, .45), (.5, .62)]), ("line", [(.5, .8), (.5, 1)])],
    "sun": [("ellipse", [(.25, .25), (.75, .75)])]
           + [("line", [(.5 + .33 * x, .5 + .33 * y), (.5 + .5 * x, .5 + .5 * y)]) for x, y in _RAYS],
    "cloud": [("ellipse", [(0, .35), (.45, 1)]), ("ellipse", [(.55, .35), (1, 1)]), ("ellipse", [(.22, 0), (.78, .85)])],
}
# kind -> (caption as subject, caption after "next to", height as a fraction of the image, width / height)
GROUND = {"house": ("a house", "a house", .45, 1.0), "tree": ("a tree", "a tree", .55, .7),
          "person": ("a man standing", "a man", .35, .45), "car": ("a car", "a car", .2, 2.0),
          "horse": ("a horse", "a horse", .3, 1.3), "boat": ("a boat on the water", "a boat", .3, 1.2)}
# kind -> (caption alone, caption appended to ground objects, box as fractions of the image)
BACKDROP = {"mountain": ("a mountain", " in front of a mountain", (0, .2, 1, .65)),
            "road": ("a road", " beside a road", (0, .6, 1, 1))}
SKY = {"sun": ("the sun", (.05, .03, .3, .28)), "cloud": ("a cloud", (.35, .05, .7, .25))}
KINDS = sorted([*GROUND, *BACKDROP, *SKY])


def _draw(d: ImageDraw.ImageDraw, kind: str, box: Box, rng: random.Random, width: int) -> None:
    """Draw one object's strokes into a pixel box, mirrored at random and with jittered points, like a hand sketch."""
    x0, y0, x1, y1 = box
    mirror = rng.random() < 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        x = (1 - x if mirror else x) + rng.uniform(-.04, .04)
        return x0 + x * (x1 - x0), y0 + (y + rng.uniform(-.04, .04)) * (y1 - y0)

    for how, points in SHAPES[kind]:
        xy = [at(*p) for p in points]
        if how == "line":
            d.line(xy, fill="black", width=width, joint="curve")
        elif how == "poly":
            d.polygon(xy, fill="white", outline="black", width=width)  # white fill hides the scenery behind
        else:
            (ax, ay), (bx, by) = xy
            d.ellipse([min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)], fill="white", outline="black", width=width)


def _caption(kinds: list[str]) -> str:
    """Caption of a scene from the kinds drawn, ground objects in left-to-right order."""
    ground = [k for k in kinds if k in GROUND]
    back, sky = [k for k in kinds if k in BACKDROP], [SKY[k][0] for k in kinds if k in SKY]
    if ground:
        rest = [GROUND[k][1] for k in ground[1:]]
        text = GROUND[ground[0]][0] + (" next to " + " and ".join(rest) if rest else "")
        text += "".join(BACKDROP[k][1] for k in back)
    else:
        text = " and ".join(BACKDROP[k][0] for k in back)
    if not text:
        return " and ".join(sky) + " in the sky"
    return text + (" under " + " and ".join(sky) if sky else "")


def random_sketch(size: int, rng: random.Random) -> tuple[Image.Image, str]:
    """One scene of 1-3 objects in black lines on white, and its caption."""
    kinds = rng.sample(KINDS, rng.randint(1, 3))
    image = Image.new("RGB", (size, size), "white")
    d, width = ImageDraw.Draw(image), max(1, round(size / 96))
    for k in kinds:  # scenery first, so ground objects sit in front of it
        if k in BACKDROP or k in SKY:
            box = BACKDROP[k][2] if k in BACKDROP else SKY[k][1]
            shift = rng.uniform(-.05, .05) if k in SKY else 0
            _draw(d, k, ((box[0] + shift) * size, box[1] * size, (box[2] + shift) * size, box[3] * size), rng, width)
    ground = [k for k in kinds if k in GROUND]
    floor = size * rng.uniform(.88, .96)
    for i, k in enumerate(ground):
        column = size / len(ground)
        h = size * GROUND[k][2] * rng.uniform(.85, 1.15) * (1.5 if len(ground) == 1 else 1)
        half = min(column * .45, h * GROUND[k][3] / 2)
        cx = column * (i + .5 + rng.uniform(-.05, .05))
        _draw(d, k, (cx - half, floor - h, cx + half, floor), rng, width)
    return image, _caption(kinds)


def make_synthetic_sketches(out_dir: Path, n_images: int, size: int, seed: int) -> None:
    """Write a deterministic imagefolder of black-on-white line drawings of simple scenes with matching captions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        # One generator per image; string seeds go through sha512, so PYTHONHASHSEED does not change them.
        image, caption = random_sketch(size, random.Random(f"{seed}:{i}"))
        file_name = f"{i:05d}.png"
        image.save(out_dir / file_name, format="PNG")
        rows.append({"file_name": file_name, "text": caption})
    write_jsonl(out_dir / METADATA, rows)
