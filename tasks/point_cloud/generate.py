"""Generate a PCN-style completion dataset from meshes (primitives and composites per category).

ShapeNet-derived PCN cannot be shipped, so the default sample is made the way PCN was made
(Yuan et al., 3DV 2018), from procedural meshes instead of ShapeNet models:

1. a mesh per model: trimesh primitives (boxes, cylinders, capsules, cones, spheres) composed
   into one of PCN's 8 categories with seeded random proportions (a chair is a seat, a back and
   four legs; a car a body, a cabin and four wheels; ...), normalised into the unit cube
   [-0.5, 0.5]^3 by its longest bounding-box side, y up;
2. the complete cloud: points sampled uniformly on the surface (16384, as PCN);
3. partial views: for each of 8 random viewpoints on a sphere around the object, a pinhole
   depth camera (PCN used rendered depth images) keeps, for every pixel, the surface point
   nearest to the camera; the back-projected pixels are the partial cloud, in object coordinates.

It writes PCN's layout: ``PCN.json`` (the split index), ``category.txt``,
``{train,val,test}/complete/<taxonomy>/<model>.pcd`` and
``{train,val,test}/partial/<taxonomy>/<model>/NN.pcd`` (8 views in train, view 00 in val and
test). Seeded: the same arguments write byte-identical files.

The shipped sample (``tasks/point_cloud/samples/pcn_synthetic``) was written by::

    attnbench data prepare pcn_generate tasks/point_cloud/samples/pcn_synthetic \\
        --train 3 --val 1 --test 2 --complete-points 2048 --max-partial-points 384 --seed 0

(2048 complete points and at most 384 partial points per view to stay small); the full-size
sample: ``attnbench data prepare pcn_generate OUT`` (or ``attnbench data fetch pcn_synthetic``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.point_cloud.pcd import write_pcd

#: PCN's categories and ShapeNet taxonomy ids (PCN_category.txt, PCN.json).
CATEGORIES: dict[str, str] = {
    "airplane": "02691156", "cabinet": "02933112", "car": "02958343", "chair": "03001627",
    "lamp": "03636649", "sofa": "04256520", "table": "04379243", "watercraft": "04530566",
}
SPLITS = ("train", "val", "test")
VIEWS = 8


def _trimesh():
    try:
        import trimesh
    except ImportError as error:
        raise ImportError(
            "the PCN-style generator needs trimesh: pip install 'attnbench[point-cloud]'") from error
    return trimesh


def _box(extents, centre):
    trimesh = _trimesh()
    return trimesh.creation.box(extents=extents, transform=trimesh.transformations.translation_matrix(centre))


def _cylinder(radius, height, centre, axis="y", sections=24):
    trimesh = _trimesh()
    mesh = trimesh.creation.cylinder(radius=radius, height=height, sections=sections)  # along z
    _orient(mesh, axis)
    mesh.apply_translation(centre)
    return mesh


def _orient(mesh, axis: str) -> None:
    trimesh = _trimesh()
    if axis == "y":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
    elif axis == "x":
        mesh.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))


def _airplane(rng: np.random.Generator):
    trimesh = _trimesh()
    length, radius = rng.uniform(0.8, 1.2), rng.uniform(0.05, 0.09)
    span, chord = rng.uniform(0.7, 1.2), rng.uniform(0.15, 0.3)
    body = trimesh.creation.capsule(height=length, radius=radius, count=[16, 16])
    _orient(body, "x")
    sweep = rng.uniform(-0.1, 0.1)
    parts = [body, _box([chord, 0.02, span], [sweep, 0.0, 0.0]),
             _box([chord * 0.5, 0.015, span * 0.35], [-length / 2 + 0.05, 0.0, 0.0]),
             _box([chord * 0.5, rng.uniform(0.12, 0.22), 0.015], [-length / 2 + 0.05, radius + 0.06, 0.0])]
    if rng.random() < 0.6:  # engines under the wings
        for side in (-1, 1):
            parts.append(_cylinder(0.035, 0.18, [sweep + 0.02, -0.06, side * span * 0.25], axis="x"))
    return trimesh.util.concatenate(parts)


def _cabinet(rng: np.random.Generator):
    width, height, depth = rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.2), rng.uniform(0.35, 0.6)
    parts = [_box([width, height, depth], [0, height / 2 + 0.05, 0]), _box([width * 0.95, 0.05, depth * 0.9],
                                                                            [0, 0.025, 0])]
    doors = int(rng.integers(1, 4))
    for i in range(doors):
        x = -width / 2 + width * (i + 0.5) / doors
        parts.append(_box([0.03, 0.12, 0.03], [x + 0.05, height * 0.6, depth / 2 + 0.015]))
    if rng.random() < 0.5:  # a top shelf overhang
        parts.append(_box([width * 1.05, 0.03, depth * 1.05], [0, height + 0.065, 0]))
    return _trimesh().util.concatenate(parts)


def _car(rng: np.random.Generator):
    length, width, height = rng.uniform(0.9, 1.2), rng.uniform(0.4, 0.5), rng.uniform(0.15, 0.22)
    wheel = rng.uniform(0.08, 0.11)
    parts = [_box([length, height, width], [0, wheel + height / 2, 0]),
             _box([length * rng.uniform(0.4, 0.6), height * rng.uniform(0.7, 1.0), width * 0.9],
                  [rng.uniform(-0.1, 0.05), wheel + height * 1.35, 0])]
    for x in (-length * 0.32, length * 0.32):
        for z in (-width / 2, width / 2):
            parts.append(_cylinder(wheel, 0.07, [x, wheel, z], axis="z"))
    return _trimesh().util.concatenate(parts)


def _chair(rng: np.random.Generator):
    width, depth, seat = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.55), rng.uniform(0.4, 0.5)
    back, leg = rng.uniform(0.4, 0.6), rng.uniform(0.025, 0.045)
    parts = [_box([width, 0.05, depth], [0, seat, 0]),
             _box([width, back, 0.04], [0, seat + back / 2, -depth / 2 + 0.02])]
    for x in (-width / 2 + leg, width / 2 - leg):
        for z in (-depth / 2 + leg, depth / 2 - leg):
            parts.append(_box([leg, seat, leg], [x, seat / 2, z]))
    if rng.random() < 0.4:  # armrests
        for x in (-width / 2, width / 2):
            parts.append(_box([0.04, 0.03, depth * 0.9], [x, seat + 0.2, 0]))
            parts.append(_box([0.03, 0.2, 0.03], [x, seat + 0.1, depth * 0.35]))
    return _trimesh().util.concatenate(parts)


def _lamp(rng: np.random.Generator):
    trimesh = _trimesh()
    pole = rng.uniform(0.6, 1.2)
    parts = [_cylinder(rng.uniform(0.12, 0.2), 0.04, [0, 0.02, 0]),
             _cylinder(rng.uniform(0.012, 0.025), pole, [0, pole / 2 + 0.04, 0])]
    if rng.random() < 0.5:  # a conical shade, open downwards
        radius, height = rng.uniform(0.15, 0.28), rng.uniform(0.15, 0.3)
        shade = trimesh.creation.cone(radius=radius, height=height, sections=32)
        _orient(shade, "y")
        shade.apply_translation([0, pole - height * 0.3, 0])
        parts.append(shade)
    else:  # a globe
        parts.append(trimesh.creation.icosphere(subdivisions=2, radius=rng.uniform(0.1, 0.18)))
        parts[-1].apply_translation([0, pole + 0.1, 0])
    return trimesh.util.concatenate(parts)


def _sofa(rng: np.random.Generator):
    length, depth, seat = rng.uniform(1.2, 2.0), rng.uniform(0.6, 0.8), rng.uniform(0.3, 0.4)
    back, arm = rng.uniform(0.3, 0.45), rng.uniform(0.1, 0.18)
    parts = [_box([length, seat, depth], [0, seat / 2, 0]),
             _box([length, back, 0.15], [0, seat + back / 2, -depth / 2 + 0.075])]
    for side in (-1, 1):
        arm_height = seat + back * 0.5
        parts.append(_box([arm, arm_height, depth], [side * (length / 2 + arm / 2), arm_height / 2, 0]))
    cushions = int(rng.integers(2, 4))
    for i in range(cushions):
        x = -length / 2 + length * (i + 0.5) / cushions
        parts.append(_box([length / cushions * 0.95, 0.08, depth * 0.8], [x, seat + 0.04, 0.05]))
    return _trimesh().util.concatenate(parts)


def _table(rng: np.random.Generator):
    height = rng.uniform(0.5, 0.8)
    if rng.random() < 0.6:
        width, depth, leg = rng.uniform(0.8, 1.6), rng.uniform(0.5, 0.9), rng.uniform(0.03, 0.06)
        parts = [_box([width, 0.04, depth], [0, height, 0])]
        for x in (-width / 2 + leg, width / 2 - leg):
            for z in (-depth / 2 + leg, depth / 2 - leg):
                parts.append(_box([leg, height, leg], [x, height / 2, z]))
    else:  # a round table on a pedestal
        radius = rng.uniform(0.35, 0.6)
        parts = [_cylinder(radius, 0.04, [0, height, 0], sections=48),
                 _cylinder(0.04, height, [0, height / 2, 0]), _cylinder(radius * 0.5, 0.03, [0, 0.015, 0])]
    return _trimesh().util.concatenate(parts)


def _watercraft(rng: np.random.Generator):
    trimesh = _trimesh()
    length, beam, depth = rng.uniform(1.0, 1.5), rng.uniform(0.25, 0.4), rng.uniform(0.15, 0.25)
    hull = trimesh.creation.box(extents=[length, depth, beam])
    vertices = hull.vertices.copy()
    bottom, bow = vertices[:, 1] < 0, vertices[:, 0] > 0
    vertices[bottom, 2] *= 0.35  # a narrow keel
    vertices[bow, 2] *= 0.1  # a pointed bow
    vertices[bow & ~bottom, 0] += length * 0.15
    hull = trimesh.Trimesh(vertices=vertices, faces=hull.faces)
    cabin = _box([length * rng.uniform(0.2, 0.35), depth * 0.8, beam * 0.6], [-length * 0.15, depth * 0.9, 0])
    parts = [hull, cabin]
    if rng.random() < 0.5:  # a sailing boat
        mast = rng.uniform(0.6, 1.0)
        parts += [_cylinder(0.015, mast, [0.05, depth / 2 + mast / 2, 0]),
                  _box([length * 0.4, mast * 0.8, 0.01], [-length * 0.15, depth / 2 + mast * 0.5, 0])]
    return trimesh.util.concatenate(parts)


SHAPES: dict[str, Callable[[np.random.Generator], object]] = {
    "airplane": _airplane, "cabinet": _cabinet, "car": _car, "chair": _chair, "lamp": _lamp,
    "sofa": _sofa, "table": _table, "watercraft": _watercraft,
}


def make_mesh(category: str, rng: np.random.Generator):
    """A random mesh of ``category``, normalised into [-0.5, 0.5]^3 by its longest side."""
    if category not in SHAPES:
        raise ValueError(f"unknown category {category!r}; valid: {', '.join(SHAPES)}")
    mesh = SHAPES[category](rng)
    yaw = rng.uniform(-np.pi / 12, np.pi / 12)  # small pose jitter around the canonical pose
    mesh.apply_transform(_trimesh().transformations.rotation_matrix(yaw, [0, 1, 0]))
    low, high = mesh.bounds
    mesh.apply_translation(-(low + high) / 2)
    mesh.apply_scale(1.0 / float((high - low).max()))
    return mesh


def sample_surface(mesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniformly on the surface (area-weighted): [count, 3] float32."""
    points, _ = _trimesh().sample.sample_surface(mesh, count, seed=rng)
    return np.asarray(points, dtype=np.float32)


def depth_camera_view(
    surface: np.ndarray,
    direction: np.ndarray,
    *,
    distance: float = 2.0,
    resolution: int = 100,
    field_of_view: float = 40.0,
    tolerance: float = 0.03,
) -> np.ndarray:
    """What a depth camera sees: for each pixel, the visible surface point nearest to it.

    Args:
        surface: a dense surface sample [N, 3] (dense enough that every pixel the object covers
            holds a point of its front surface).
        direction: unit vector from the object's centre to the camera.
        distance: camera distance from the origin.
        resolution: image width and height in pixels.
        field_of_view: of the pinhole camera, in degrees.
        tolerance: a pixel's point is dropped when it lies deeper than ``tolerance`` behind the
            nearest point of the 3x3 pixels around it: where the front surface left a pixel
            without a sample, the surface behind must not show through.

    Returns:
        the back-projected pixels [P, 3] in object coordinates (P <= resolution^2).
    """
    eye = direction * distance
    forward = -direction
    helper = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.95 else np.array([1.0, 0.0, 0.0])
    right = np.cross(forward, helper)
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    relative = surface - eye  # [N, 3]
    depth = relative @ forward
    focal = resolution / (2 * np.tan(np.radians(field_of_view) / 2))
    u = np.floor(focal * (relative @ right) / depth + resolution / 2).astype(np.int64)
    v = np.floor(focal * (relative @ up) / depth + resolution / 2).astype(np.int64)
    inside = (depth > 0) & (u >= 0) & (u < resolution) & (v >= 0) & (v < resolution)
    candidates = np.flatnonzero(inside)
    pixel = v[candidates] * resolution + u[candidates]
    order = np.lexsort((depth[candidates], pixel))  # by pixel, nearest first
    first = np.ones(order.size, dtype=bool)
    first[1:] = pixel[order][1:] != pixel[order][:-1]
    nearest = candidates[order[first]]  # one point per covered pixel
    zbuffer = np.full((resolution + 2) ** 2, np.inf)
    padded = (v[nearest] + 1) * (resolution + 2) + u[nearest] + 1
    zbuffer[padded] = depth[nearest]
    image = zbuffer.reshape(resolution + 2, resolution + 2)
    around = np.min([np.roll(image, (dv, du), axis=(0, 1)) for dv in (-1, 0, 1) for du in (-1, 0, 1)], axis=0)
    visible = depth[nearest] <= around.reshape(-1)[padded] + tolerance
    return surface[nearest[visible]]


def random_directions(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors uniform on the sphere: [count, 3]."""
    vectors = rng.normal(size=(count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def model_id(category: str, split: str, index: int, seed: int) -> str:
    """A 32-hex identifier, like ShapeNet's, stable for the same arguments."""
    return hashlib.md5(f"{category}/{split}/{index}/{seed}".encode()).hexdigest()


def generate(
    root: str | Path,
    *,
    models: dict[str, int] | None = None,
    complete_points: int = 16384,
    max_partial_points: int = 0,
    surface_points: int = 100000,
    categories: tuple[str, ...] = tuple(CATEGORIES),
    seed: int = 0,
    binary: bool = True,
) -> Path:
    """Write a PCN-layout dataset under ``root`` and return ``root``.

    Args:
        models: models per category in each split (default train 16, val 2, test 4).
        complete_points: points of each complete cloud (PCN: 16384).
        max_partial_points: cap on the points of a partial view, 0 for none (a random subset).
        surface_points: the dense sample the depth camera sees.
        categories: which of PCN's categories.
        seed: seeds everything.
        binary: binary (default) or ASCII PCD files.
    """
    models = models if models is not None else {"train": 16, "val": 2, "test": 4}
    unknown = sorted(set(models) - set(SPLITS)) + sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown split or category {unknown}; splits: {', '.join(SPLITS)}; "
                         f"categories: {', '.join(CATEGORIES)}")
    root = Path(root)
    index = []
    for category in categories:
        # Seeds depend on the category's place in PCN's list, not in ``categories``, so a
        # subset of categories reproduces the same models.
        category_number = list(CATEGORIES).index(category)
        taxonomy = CATEGORIES[category]
        entry: dict[str, object] = {"taxonomy_id": taxonomy, "taxonomy_name": category}
        for split_number, split in enumerate(SPLITS):
            ids = []
            for i in range(models.get(split, 0)):
                rng = np.random.default_rng([seed, category_number, split_number, i])
                identifier = model_id(category, split, i, seed)
                mesh = make_mesh(category, rng)
                complete = sample_surface(mesh, complete_points, rng)
                write_pcd(root / split / "complete" / taxonomy / f"{identifier}.pcd", complete, binary=binary)
                surface = sample_surface(mesh, surface_points, rng)
                views = VIEWS if split == "train" else 1
                for view, direction in enumerate(random_directions(views, rng)):
                    partial = depth_camera_view(surface, direction)
                    if max_partial_points and len(partial) > max_partial_points:
                        keep = rng.choice(len(partial), max_partial_points, replace=False)
                        partial = partial[np.sort(keep)]
                    write_pcd(root / split / "partial" / taxonomy / identifier / f"{view:02d}.pcd", partial,
                              binary=binary)
                ids.append(identifier)
            entry[split] = ids
        index.append(entry)
    (root / "PCN.json").write_text(json.dumps(index, indent=4) + "\n")
    (root / "category.txt").write_text("".join(f"{c}\n" for c in categories))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attnbench data prepare pcn_generate",
        description="Generate a PCN-layout completion dataset from procedural meshes (seeded).")
    parser.add_argument("root", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=16, help="models per category (8 views each)")
    parser.add_argument("--val", type=int, default=2, help="models per category (view 00)")
    parser.add_argument("--test", type=int, default=4, help="models per category (view 00)")
    parser.add_argument("--complete-points", type=int, default=16384)
    parser.add_argument("--max-partial-points", type=int, default=0, help="0: keep every visible pixel")
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ascii", action="store_true", help="write ASCII PCD files")
    args = parser.parse_args(argv)
    root = generate(args.root, models={"train": args.train, "val": args.val, "test": args.test},
                    complete_points=args.complete_points, max_partial_points=args.max_partial_points,
                    categories=tuple(c for c in args.categories.split(",") if c), seed=args.seed,
                    binary=not args.ascii)
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
