"""Built-in shapes dataset: deterministic generation, valid COCO annotations of the visible parts,
cache validation, and detectron2 registration (mapper, train loader, COCO evaluator)."""
import hashlib
import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks, polygons_to_bitmask
from pycocotools.coco import COCO

from d2norm.data import (
    DEMO,
    SHAPE_CATEGORIES,
    SHAPES_DEMO_TRAIN,
    SHAPES_DEMO_VAL,
    SHAPES_TRAIN,
    SHAPES_VAL,
    SHAPES_VAL500,
    STUDY,
    default_shapes_root,
    ensure_shapes_split,
    generate_shapes_split,
    register_shapes_dataset,
    register_shapes_demo_dataset,
    register_shapes_split,
)
from d2norm.data.coco_format import instance_annotation
from d2norm.data.scene import random_scene, sample_layout, visible_instances
from d2norm.data.shapes import ShapeSpec, rasterize

SIZE = 128
# sha256 of manifest.json (which holds the digests of every image and of the json) of the 4-image,
# seed-0 study split, as generated before scene styles existed.
STUDY_4_IMAGES_MANIFEST_SHA256 = "6e27d9bb6d630d331af9fe91d89ea3643656c7d5586541e0e5965dd84d0dc320"


def _files(split_dir):
    return {str(p.relative_to(split_dir)): p.read_bytes() for p in split_dir.rglob("*") if p.is_file()}


def _polygon_mask(polygons, size=SIZE):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, size, size))).astype(bool)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return generate_shapes_split(tmp_path_factory.mktemp("shapes") / "split", num_images=12, seed=0)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A registered 4-image split, unregistered afterwards."""
    name = "d2norm_shapes_test_tiny"
    register_shapes_split(name, tmp_path / "tiny", num_images=4, seed=0)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    first = _files(generate_shapes_split(tmp_path / "a", 4, seed=5).json_file.parent)
    second = _files(generate_shapes_split(tmp_path / "b", 4, seed=5).json_file.parent)
    other = _files(generate_shapes_split(tmp_path / "c", 4, seed=6).json_file.parent)
    assert first == second
    assert other.keys() == first.keys()
    assert all(other[name] != first[name] for name in first)


def test_annotations_load_in_pycocotools_with_tight_boxes_around_their_masks(split):
    coco = COCO(str(split.json_file))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPE_CATEGORIES)
    assert len(coco.getImgIds()) == 12 and len(coco.getAnnIds()) >= 12
    for ann in coco.loadAnns(coco.getAnnIds()):
        image = coco.loadImgs(ann["image_id"])[0]
        assert (image["width"], image["height"]) == (SIZE, SIZE)
        assert ann["iscrowd"] == 0
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
        mask = coco.annToMask(ann).astype(bool)
        assert ann["area"] == mask.sum() > 0
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
        ys, xs = np.nonzero(mask)  # the mask lies inside the box and touches all four sides
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_annotation_polygons_reproduce_the_visible_masks_exactly():
    for index in range(20):
        _, instances = random_scene(np.random.default_rng([0, index]), SIZE)
        covered = np.zeros((SIZE, SIZE), dtype=bool)
        for instance in instances:
            assert not (covered & instance.mask).any()  # each pixel belongs to one instance at most
            covered |= instance.mask
            annotation = instance_annotation(instance.mask, category_id=1)
            assert np.array_equal(_polygon_mask(annotation["segmentation"]), instance.mask)


def test_occluded_instance_is_annotated_with_its_visible_part_only():
    circle = ShapeSpec("circle", center=(40.0, 48.0), radius=24.0)
    square = ShapeSpec("square", center=(64.0, 48.0), radius=20.0)
    (circle_mask, square_mask), (bottom, top) = visible_instances([circle, square], SIZE)
    assert bottom.spec == circle and top.spec == square
    assert 0 < bottom.mask.sum() < bottom.full_area == circle_mask.sum()
    assert np.array_equal(top.mask, square_mask)
    assert np.array_equal(bottom.mask, circle_mask & ~square_mask)
    annotation = instance_annotation(bottom.mask, category_id=1)
    assert annotation["area"] == bottom.mask.sum() < circle_mask.sum()


def test_shape_on_top_of_another_leaves_a_hole_in_its_polygon_mask():
    square = ShapeSpec("square", center=(64.0, 64.0), radius=40.0, angle=0.3)
    star = ShapeSpec("star", center=(60.0, 66.0), radius=10.0)
    (square_mask, star_mask), (bottom, _) = visible_instances([square, star], SIZE)
    annotation = instance_annotation(bottom.mask, category_id=3)
    assert len(annotation["segmentation"]) == 1  # one polygon with a zero-width cut to the hole
    restored = _polygon_mask(annotation["segmentation"])
    assert not (restored & star_mask).any()
    assert np.array_equal(restored, square_mask & ~star_mask)


def test_mostly_hidden_or_mostly_outside_instances_are_dropped():
    hidden = ShapeSpec("circle", center=(48.0, 48.0), radius=10.0)
    cover = ShapeSpec("square", center=(50.0, 50.0), radius=40.0)
    outside = ShapeSpec("triangle", center=(-3.0, 100.0), radius=12.0)  # centre left of the image
    _, kept = visible_instances([hidden, cover, outside], SIZE)
    assert [instance.spec for instance in kept] == [cover]
    _, kept = visible_instances([hidden, cover], SIZE, min_visible_fraction=0.0, min_visible_area=1)
    assert [instance.spec for instance in kept] == [cover]  # fully covered: nothing visible at all
    mask, full_area = rasterize(outside, SIZE)
    assert 0 < mask.sum() < 0.5 * full_area


def test_default_layouts_cover_every_category_and_every_coco_area_range():
    categories, areas = set(), []
    for index in range(200):
        _, instances = visible_instances(sample_layout(np.random.default_rng([0, index]), SIZE), SIZE)
        categories.update(instance.spec.category for instance in instances)
        areas.extend(int(instance.mask.sum()) for instance in instances)
    areas = np.array(areas)
    assert categories == set(SHAPE_CATEGORIES)
    assert (areas < 32**2).sum() > 0.2 * len(areas)
    assert ((areas >= 32**2) & (areas < 96**2)).sum() > 0.2 * len(areas)
    assert (areas >= 96**2).sum() >= 5


def _truncate_image(split_dir):
    path = split_dir / "images" / "000001.png"
    path.write_bytes(path.read_bytes()[:100])


def _delete_image(split_dir):
    (split_dir / "images" / "000002.png").unlink()


def _edit_json(split_dir):
    path = split_dir / "instances.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 2 if coco["annotations"][0]["category_id"] != 2 else 3
    path.write_text(json.dumps(coco))


def _delete_manifest(split_dir):
    (split_dir / "manifest.json").unlink()


@pytest.mark.parametrize("corrupt", [_truncate_image, _delete_image, _edit_json, _delete_manifest])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, caplog, corrupt):
    split_dir = tmp_path / "split"
    ensure_shapes_split(split_dir, num_images=4, seed=0)
    original = _files(split_dir)
    corrupt(split_dir)
    with caplog.at_level(logging.INFO, logger="d2norm.data.splits"):
        ensure_shapes_split(split_dir, num_images=4, seed=0)
    assert any("Generating shapes split" in r.getMessage() for r in caplog.records)
    assert _files(split_dir) == original


def test_intact_cache_is_reused_and_changed_parameters_regenerate(tmp_path, caplog):
    split_dir = tmp_path / "split"
    files = ensure_shapes_split(split_dir, num_images=3, seed=0)
    stamp = (files.image_root / "000000.png").stat().st_mtime_ns
    caplog.clear()  # only the second call's records (the first one's show when "d2norm" logs at INFO)
    with caplog.at_level(logging.INFO, logger="d2norm.data.splits"):
        ensure_shapes_split(split_dir, num_images=3, seed=0)
    assert not caplog.records and (files.image_root / "000000.png").stat().st_mtime_ns == stamp
    ensure_shapes_split(split_dir, num_images=5, seed=0)
    assert len(json.loads(files.json_file.read_text())["images"]) == 5
    assert sorted(p.name for p in files.image_root.iterdir()) == [f"{i:06d}.png" for i in range(5)]


@pytest.fixture
def restore_default_registration():
    yield
    register_shapes_dataset()


def test_import_registers_default_splits_lazily_and_reregistering_replaces(
    tmp_path, monkeypatch, restore_default_registration
):
    for name in (SHAPES_TRAIN, SHAPES_VAL, SHAPES_VAL500):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).json_file.startswith(str(default_shapes_root()))
    monkeypatch.setenv("D2NORM_DATASETS", str(tmp_path / "elsewhere"))
    assert default_shapes_root() == tmp_path / "elsewhere" / "d2norm_shapes"

    root = tmp_path / "shapes"
    register_shapes_dataset(root, train_images=3, val_images=2)
    register_shapes_dataset(root, train_images=3, val_images=2)  # idempotent
    assert not root.exists()  # nothing is generated before first use
    metadata = MetadataCatalog.get(SHAPES_VAL)
    assert metadata.evaluator_type == "coco" and metadata.thing_classes == list(SHAPE_CATEGORIES)
    assert metadata.json_file == str(root / "val" / "instances.json")
    records = DatasetCatalog.get(SHAPES_VAL)
    assert len(records) == 2 and all(r["file_name"].startswith(str(root / "val")) for r in records)
    assert not (root / "train").exists()  # only the requested split was generated
    assert MetadataCatalog.get(SHAPES_VAL500).json_file == str(root / "val500" / "instances.json")
    assert len(DatasetCatalog.get(SHAPES_TRAIN)) == 3


def test_records_feed_detectron2_mapper_and_train_loader(tiny_dataset):
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.DATASETS.TRAIN = (tiny_dataset,)
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    records = DatasetCatalog.get(tiny_dataset)
    record = next(r for r in records if r["annotations"])
    mapped = DatasetMapper(cfg, is_train=True)(record)
    instances = mapped["instances"]
    assert mapped["image"].shape == (3, 160, 160)
    assert isinstance(instances.gt_masks, PolygonMasks) and len(instances) == len(record["annotations"])
    assert instances.gt_classes.min() >= 0 and instances.gt_classes.max() < len(SHAPE_CATEGORIES)
    # After resizing (and a possible flip) the boxes still enclose the masks tightly.
    mask_boxes = instances.gt_masks.get_bounding_boxes().tensor
    torch.testing.assert_close(mask_boxes, instances.gt_boxes.tensor, atol=1.0, rtol=0)

    batch = next(iter(build_detection_train_loader(cfg)))
    assert len(batch) == 2 and all(len(item["instances"]) > 0 for item in batch)


def test_coco_evaluator_scores_the_ground_truth_as_perfect(tiny_dataset):
    records = DatasetCatalog.get(tiny_dataset)
    evaluator = COCOEvaluator(tiny_dataset, output_dir=None, use_fast_impl=False)
    evaluator.reset()
    for record in records:
        size = (record["height"], record["width"])
        annotations = record["annotations"]
        prediction = Instances(size)
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations]
        prediction.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        prediction.scores = torch.ones(len(annotations))
        prediction.pred_classes = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
        masks = np.zeros((len(annotations), *size), dtype=bool)
        for mask, annotation in zip(masks, annotations):
            mask[:] = polygons_to_bitmask(annotation["segmentation"], *size)
        prediction.pred_masks = torch.from_numpy(masks)
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": prediction}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


def test_study_split_files_are_unchanged_by_the_demo_style(tmp_path):
    """The study splits' bytes (a study compares runs on them): digests of the generator before styles existed."""
    files = generate_shapes_split(tmp_path / "study", 4, seed=0)
    manifest = json.loads(files.manifest.read_text())
    assert manifest["params"] == {"version": 1, "num_images": 4, "seed": 0, "image_size": 128}
    assert hashlib.sha256(files.manifest.read_bytes()).hexdigest() == STUDY_4_IMAGES_MANIFEST_SHA256


def test_demo_style_is_easier_than_the_study_style():
    """Fewer shapes, none tiny, less occluded, and solid fills (one colour per instance)."""
    counts, areas = [], []
    for index in range(100):
        image, instances = random_scene(np.random.default_rng([0, index]), SIZE, DEMO)
        counts.append(len(instances))
        areas.extend(int(instance.mask.sum()) for instance in instances)
        for instance in instances:
            inside = image[instance.mask].astype(float)
            assert inside.std(axis=0).max() < 3 * DEMO.noise_std[1]  # no texture beyond pixel noise
    assert max(counts) <= DEMO.max_shapes and min(counts) >= 1
    assert min(areas) >= DEMO.min_visible_fraction * DEMO.size_class_areas["small"][0] * 0.9
    assert set(DEMO.background_patterns) < set(STUDY.background_patterns)


def test_demo_splits_are_registered_under_their_own_names_and_folders(tmp_path, restore_default_registration):
    register_shapes_demo_dataset(tmp_path, train_images=3, val_images=2)
    records = DatasetCatalog.get(SHAPES_DEMO_VAL)
    assert len(records) == 2 and all(r["file_name"].startswith(str(tmp_path / "demo_val")) for r in records)
    manifest = json.loads((tmp_path / "demo_val" / "manifest.json").read_text())
    assert manifest["params"]["style"] == "demo"
    assert MetadataCatalog.get(SHAPES_DEMO_TRAIN).thing_classes == list(SHAPE_CATEGORIES)
    assert not (tmp_path / "train").exists() and not (tmp_path / "val").exists()  # study splits untouched


def test_the_shifted_domain_has_the_study_scenes_through_another_camera():
    """Same layouts and annotations as the study style for the same seed; washed-out, lower-contrast
    images (the target domain of the label-free recalibration benchmark)."""
    from d2norm.data import SHIFTED, STUDY

    contrast = []
    for index in range(6):
        study_image, study_instances = random_scene(np.random.default_rng([9, index]), 96, STUDY)
        shifted_image, shifted_instances = random_scene(np.random.default_rng([9, index]), 96, SHIFTED)
        assert [i.spec for i in shifted_instances] == [i.spec for i in study_instances]
        assert all(np.array_equal(a.mask, b.mask) for a, b in zip(shifted_instances, study_instances))
        contrast.append(shifted_image.std() / study_image.std())
        assert shifted_image.mean() > study_image.mean() - 10
    assert max(contrast) < 0.9


def test_the_camera_stage_draws_nothing_for_the_study_and_demo_styles():
    """Splits generated before the camera stage existed keep their bytes (and cache digests)."""
    from d2norm.data import DEMO, STUDY
    from d2norm.data.scene import _camera

    for style in (STUDY, DEMO):
        rng = np.random.default_rng(0)
        canvas = np.random.default_rng(1).uniform(0, 255, (8, 8, 3)).astype(np.float32)
        assert _camera(rng, canvas, style) is canvas
        assert rng.random() == np.random.default_rng(0).random()
