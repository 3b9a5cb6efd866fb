"""Caption sources on generated files in the real formats, image decoding edge cases, and the synthetic shapes."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from captioning.config import ConfigError, load_config
from captioning.data.datasets import Preprocess, build_source
from captioning.data.features import FeatureLoader, extract_features
from captioning.data.sources import (
    BadImageError,
    CaptionSource,
    Sample,
    coco_source,
    flickr8k_source,
    karpathy_source,
    open_image,
)
from captioning.data.synthetic import SIZES, SyntheticShapes
from captioning.vocab import tokenize


def assert_captions_match_images(source: CaptionSource) -> None:
    """The fixtures put each image file's stem into its captions."""
    for sample in source.samples:
        assert Path(sample.path).is_file()
        assert sample.captions and all(Path(sample.path).stem in c for c in sample.captions)


# ---------------------------------------------------------------- COCO


@pytest.mark.parametrize("year", [2014, 2017])
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_source(make_coco, tmp_path, split, year):
    root = make_coco(tmp_path, split=split, year=year, n_images=5)
    data = json.loads((root / "annotations" / f"captions_{split}{year}.json").read_text())
    source = coco_source(root, split, year=year)

    assert len(source) == 5
    ids = [s.image_id for s in source.samples]
    assert ids == sorted(img["id"] for img in data["images"]) and all(isinstance(i, int) for i in ids)
    assert sum(len(s.captions) for s in source.samples) == len(data["annotations"]) == 26
    by_id = {s.image_id: s for s in source.samples}
    first = data["images"][0]
    assert len(by_id[first["id"]].captions) == 6
    assert by_id[first["id"]].path == str(root / f"{split}{year}" / first["file_name"])
    assert by_id[first["id"]].captions[0] == data["annotations"][0]["caption"]  # raw, as written
    if year == 2014:
        assert Path(source.samples[0].path).name.startswith(f"COCO_{split}2014_")
    assert_captions_match_images(source)
    img = source.load_image(0)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_coco_source_is_quiet_and_takes_image_dir(make_coco, tmp_path, capsys):
    root = make_coco(tmp_path, n_images=2)
    moved = tmp_path / "elsewhere"
    shutil.move(root / "val2017", moved)
    source = coco_source(root, "val", image_dir=moved)
    assert capsys.readouterr().out == ""  # pycocotools' "loading annotations into memory..." is swallowed
    assert all(Path(s.path).parent == moved for s in source.samples)
    assert_captions_match_images(source)


def test_coco_source_skips_images_without_captions(make_coco, tmp_path):
    root = make_coco(tmp_path, n_images=3)
    ann_path = root / "annotations" / "captions_val2017.json"
    data = json.loads(ann_path.read_text())
    dropped = data["images"][1]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != dropped]
    ann_path.write_text(json.dumps(data))
    assert dropped not in [s.image_id for s in coco_source(root, "val").samples]


def test_coco_errors(make_coco, tmp_path):
    root = make_coco(tmp_path, n_images=1)
    with pytest.raises(ValueError, match="no public captions.*data.dataset=karpathy"):
        coco_source(root, "test")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        coco_source(root, "minival")
    with pytest.raises(FileNotFoundError, match=r"captions_train2017\.json.*annotations_trainval2017\.zip"):
        coco_source(root, "train")
    with pytest.raises(FileNotFoundError, match=r"captions_val2014\.json.*annotations_trainval2014\.zip"):
        coco_source(root, "val", year=2014)
    shutil.rmtree(root / "val2017")
    with pytest.raises(FileNotFoundError, match=r"val2017 is not a folder.*zips/val2017\.zip.*image_dir="):
        coco_source(root, "val")


# ---------------------------------------------------------------- Karpathy


def test_karpathy_coco_with_restval(make_karpathy, tmp_path):
    json_path, image_root = make_karpathy(tmp_path, "coco", {"train": 3, "restval": 2, "val": 2, "test": 4})
    entries = json.loads(json_path.read_text())["images"]
    train = karpathy_source(json_path, image_root, "train")
    assert len(train) == 5
    assert len(karpathy_source(json_path, image_root, "train", use_restval=False)) == 3
    assert len(karpathy_source(json_path, image_root, "val")) == 2
    test = karpathy_source(json_path, image_root, "test")
    assert len(test) == 4

    assert [s.image_id for s in train.samples] == [e["cocoid"] for e in entries if e["split"] in ("train", "restval")]
    restval = next(s for s, e in zip(train.samples, entries[:5], strict=True) if e["split"] == "restval")
    assert Path(restval.path).parent == image_root / "val2014"
    assert Path(train.samples[0].path).parent == image_root / "train2014"
    assert train.samples[0].captions == [s["raw"] for s in entries[0]["sentences"]]
    assert_captions_match_images(train)
    assert_captions_match_images(test)
    assert {s.image_id for s in train.samples}.isdisjoint(s.image_id for s in test.samples)


def test_karpathy_flickr_without_filepath(make_karpathy, tmp_path):
    json_path, image_root = make_karpathy(tmp_path, "flickr8k", {"train": 3, "val": 1, "test": 2})
    train = karpathy_source(json_path, image_root, "train")
    assert [s.image_id for s in train.samples] == [0, 1, 2]  # imgid, as there is no cocoid
    assert all(Path(s.path).parent == image_root for s in train.samples)
    assert_captions_match_images(train)
    assert [s.image_id for s in karpathy_source(json_path, image_root, "test").samples] == [4, 5]


def test_karpathy_errors(make_karpathy, tmp_path):
    json_path, image_root = make_karpathy(tmp_path, "coco")
    with pytest.raises(FileNotFoundError, match=r"nothing\.json.*caption_datasets\.zip"):
        karpathy_source(tmp_path / "nothing.json", image_root, "train")
    with pytest.raises(FileNotFoundError, match=r"not found: .* Set data\.image_dir \(--set data\.image_dir="):
        karpathy_source(json_path, tmp_path / "no_images", "train")
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        karpathy_source(json_path, image_root, "restval")
    shutil.rmtree(image_root / "val2014")
    karpathy_source(json_path, image_root, "train", use_restval=False)  # only needs train2014
    with pytest.raises(FileNotFoundError, match="val2014"):
        karpathy_source(json_path, image_root, "val")
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(ValueError, match="not a Karpathy split file"):
        karpathy_source(tmp_path / "other.json", image_root, "train")


@pytest.mark.parametrize("overrides", [["data.dataset=karpathy", "data.image_dir=images"],
                                       ["data.dataset=karpathy", "data.karpathy_json=dataset_coco.json"],
                                       ["data.dataset=coco", "data.image_dir=images"],
                                       ["data.dataset=flickr8k", "data.karpathy_json=dataset_flickr8k.json"]])
def test_a_dataset_without_its_paths_is_refused_naming_the_keys_it_needs(overrides):
    cfg = load_config(None, overrides)
    needed = ["data.karpathy_json", "data.image_dir"] if cfg.data.dataset == "karpathy" else ["data.root"]
    with pytest.raises(ConfigError, match=f"data.dataset={cfg.data.dataset} needs") as info:
        build_source(cfg.data, "train")
    assert all(key in str(info.value) for key in needed)


def test_karpathy_images_are_found_under_data_root_when_data_image_dir_is_unset(make_karpathy, tmp_path):
    json_path, image_root = make_karpathy(tmp_path, "coco")
    cfg = load_config(None, ["data.dataset=karpathy", f"data.karpathy_json={json_path}", f"data.root={image_root}"])
    assert [s.image_id for s in build_source(cfg.data, "test").samples] == \
        [s.image_id for s in karpathy_source(json_path, image_root, "test").samples]


# ---------------------------------------------------------------- Flickr8k


def test_flickr8k_source(make_flickr8k, tmp_path):
    root = make_flickr8k(tmp_path, n_train=4, n_val=2, n_test=3)
    lists = {split: (root / f"Flickr_8k.{name}Images.txt").read_text().split()
             for split, name in [("train", "train"), ("val", "dev"), ("test", "test")]}
    for split, names in lists.items():
        source = flickr8k_source(root, split)
        assert [s.image_id for s in source.samples] == names  # split-list order, file names as ids
        assert all(len(s.captions) == 5 for s in source.samples)  # the odd "<name>.jpg.1" lines are not mixed in
        assert all(Path(s.path).parent == root / "Flicker8k_Dataset" for s in source.samples)
        assert_captions_match_images(source)
    assert flickr8k_source(root, "train").samples[0].captions[0].endswith("is climbing .")  # raw, as written


def test_flickr8k_files_saved_with_a_byte_order_mark_read_whole(make_flickr8k, tmp_path):
    root = make_flickr8k(tmp_path)
    plain = flickr8k_source(root, "train")
    for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt"):  # as an editor on Windows saves them
        (root / name).write_text("\ufeff" + (root / name).read_text(encoding="utf-8"), encoding="utf-8")
    marked = flickr8k_source(root, "train")
    assert [(s.image_id, s.captions) for s in marked.samples] == [(s.image_id, s.captions) for s in plain.samples]


def test_flickr8k_image_dir_and_errors(make_flickr8k, tmp_path):
    root = make_flickr8k(tmp_path, image_dir="images")
    with pytest.raises(FileNotFoundError, match=r"Flicker8k_Dataset is not a folder.*image_dir="):
        flickr8k_source(root, "train")
    assert len(flickr8k_source(root, "train", image_dir=root / "images")) == 4
    with pytest.raises(ValueError, match="one of"):
        flickr8k_source(root, "dev")
    (root / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Flickr_8k\.testImages\.txt. It comes in Flickr8k_text\.zip with "
                                                r"Flickr8k\.token\.txt; unzip the whole archive into"):
        flickr8k_source(root, "test", image_dir=root / "images")

    with open(root / "Flickr_8k.devImages.txt", "a") as f:
        f.write("404_uncaptioned.jpg\n")
    with pytest.raises(ValueError, match="404_uncaptioned.jpg"):
        flickr8k_source(root, "val", image_dir=root / "images")
    token = root / "Flickr8k.token.txt"
    token.write_text(token.read_text() + "no tab on this line\n")
    with pytest.raises(ValueError, match=r"Flickr8k\.token\.txt:\d+: expected"):
        flickr8k_source(root, "train", image_dir=root / "images")
    token.unlink()
    with pytest.raises(FileNotFoundError, match=r"Flickr8k\.token\.txt. Set data\.root \(--set data\.root=DIR\)"):
        flickr8k_source(root, "train", image_dir=root / "images")


# ---------------------------------------------------------------- open_image


def saved(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


def header(path: Path) -> tuple[str, int]:
    """(mode, frame count) as Pillow reports them, file closed again."""
    with Image.open(path) as img:
        return img.mode, getattr(img, "n_frames", 1)


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> np.ndarray:
    return np.asarray(img, dtype=int)[xy[1], xy[0]]


def test_open_image_modes(tmp_path):
    grey = open_image(saved(Image.new("L", (5, 4), 77), tmp_path / "grey.png"))
    assert grey.mode == "RGB" and grey.size == (5, 4) and pixel(grey).tolist() == [77, 77, 77]

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    rgba.putpixel((1, 1), (0, 0, 0, 0))
    out = open_image(saved(rgba, tmp_path / "rgba.png"))
    assert np.abs(pixel(out) - [255, 127, 127]).max() <= 1  # half-transparent red over white
    assert pixel(out, (1, 1)).tolist() == [255, 255, 255]  # fully transparent -> white, not black

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((2, 2), 1)
    out = open_image(saved(palette, tmp_path / "palette.png"))
    assert pixel(out).tolist() == [255, 0, 0] and pixel(out, (2, 2)).tolist() == [0, 255, 0]
    out = open_image(saved(palette, tmp_path / "palette_transparent.png", transparency=1))
    assert pixel(out).tolist() == [255, 0, 0] and pixel(out, (2, 2)).tolist() == [255, 255, 255]

    cmyk = open_image(saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg"))
    assert np.abs(pixel(cmyk) - [255, 0, 0]).max() <= 8  # Adobe's inverted CMYK JPEG read the right way round


def test_open_image_16_bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    png = saved(Image.fromarray(values), tmp_path / "deep.png")
    assert header(png)[0] == "I;16"
    assert np.asarray(open_image(png))[0, :, 0].tolist() == [0, 100, 255]  # scaled, not clipped at 255
    tiff = saved(Image.fromarray(values.astype(np.int32)), tmp_path / "deep.tiff")
    assert header(tiff)[0] == "I"
    assert np.asarray(open_image(tiff))[0, :, 1].tolist() == [0, 100, 255]
    unit = saved(Image.fromarray(np.array([[0.0, 100 / 255, 1.0]], dtype=np.float32)), tmp_path / "float.tiff")
    assert header(unit)[0] == "F"
    assert np.asarray(open_image(unit))[0, :, 2].tolist() == [0, 100, 255]  # 0..1 scaled, not nearly black


def test_open_image_exif_rotation_and_animation(tmp_path):
    img = Image.new("RGB", (64, 48), "white")
    img.paste((255, 0, 0), (0, 0, 16, 16))  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 degrees clockwise to display
    out = open_image(saved(img, tmp_path / "rotated.jpg", exif=exif.tobytes()))
    assert out.size == (48, 64)
    assert pixel(out, (40, 6))[0] > 200 and pixel(out, (40, 6))[1] < 60  # now at the top-right
    assert pixel(out, (6, 6)).min() > 200  # top-left is white

    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    gif = saved(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert header(gif) == ("P", 2)
    out = open_image(gif)
    assert out.mode == "RGB" and pixel(out).tolist() == [255, 0, 0]


def test_open_image_min_size_decodes_large_jpegs_at_a_smaller_scale(tmp_path, make_jpeg):
    """A JPEG comes out at the smallest 1/2, 1/4 or 1/8 scale with both sides still >= min_size, EXIF rotation
    applied after; other formats and min_size 0 keep the full size. Shrunk to the model's input, the reduced decode
    gives nearly the same pixels as the full one."""
    from captioning.data.datasets import Preprocess

    jpeg = make_jpeg(tmp_path / "photo.jpg", seed=0, size=(1000, 800))
    assert open_image(jpeg).size == (1000, 800)
    assert open_image(jpeg, min_size=224).size == (500, 400)  # 1/4 would give 250x200: under 224
    assert open_image(jpeg, min_size=100).size == (125, 100)  # 1/8
    assert open_image(jpeg, min_size=600).size == (1000, 800)  # 1/2 would give 500x400
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    rotated = saved(Image.open(jpeg), tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert open_image(rotated, min_size=224).size == (400, 500)
    png = saved(Image.open(jpeg), tmp_path / "photo.png")
    assert open_image(png, min_size=224).size == (1000, 800)

    preprocess = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # values in -1..1
    full, reduced = preprocess(open_image(jpeg)), preprocess(open_image(jpeg, min_size=224))
    assert full.shape == reduced.shape == (3, 224, 224)
    assert (full - reduced).abs().mean() < 1e-3  # about 1e-4; a 100x80 decode enlarged to 224 is 2e-3 off


def test_image_loader_decodes_at_the_input_size_unless_it_crops(tmp_path, make_jpeg):
    """Evaluation, the feature cache and validation decode a JPEG at the smallest scale covering the model's input;
    a random crop gets the full image, so that the crop is never enlarged."""
    from captioning.data.datasets import ImageLoader, Preprocess

    class Recording(CaptionSource):
        def load_image(self, i, min_size=0):
            image = super().load_image(i, min_size)
            decoded.append(image.size)
            return image

    decoded = []
    jpeg = make_jpeg(tmp_path / "photo.jpg", seed=0, size=(1000, 800))
    source = Recording([Sample(0, str(jpeg), ["a photo"])])
    preprocess = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    generator = torch.Generator().manual_seed(0)
    assert ImageLoader(source, preprocess)(0, generator).shape == (3, 224, 224)
    assert ImageLoader(source, preprocess, augment=True)(0).shape == (3, 224, 224)  # no generator: no crop
    assert ImageLoader(source, preprocess, augment=True)(0, generator).shape == (3, 224, 224)
    assert decoded == [(500, 400), (500, 400), (1000, 800)]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit RGB but holds only a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(10))) + chunk(b"IEND", b"")


def test_open_image_bad_files(tmp_path, make_jpeg):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(0).bytes(2000))
    big = make_jpeg(tmp_path / "big.jpg", seed=1, size=(256, 256))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(100_000, 100_000))
    for path, reason in [(empty, "empty file"), (noise, "not an image"), (truncated, "truncated"),
                         (huge, "decompression bomb")]:
        with pytest.raises(BadImageError, match=reason) as info:
            open_image(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")


def test_open_image_pixel_limit_is_an_error_not_a_warning(tmp_path, make_jpeg):
    small = make_jpeg(tmp_path / "small.jpg", seed=0)
    with pytest.raises(BadImageError, match=r"decompression bomb: 64x48 pixels exceeds the limit of 1000"):
        open_image(small, max_pixels=1000)
    over_pillow_warning = tmp_path / "over.png"
    over_pillow_warning.write_bytes(png_header(10_000, 10_000))  # between Pillow's warning and error limits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match="10000x10000"):
            open_image(over_pillow_warning)


# ---------------------------------------------------------------- synthetic shapes

COLOUR_MASKS = {  # (H, W, 3) int array -> mask of that colour, antialiased edges with the background excluded
    "red": lambda a: (a[..., 0] > 150) & (a[..., 1] < 90) & (a[..., 2] < 90),
    "green": lambda a: (a[..., 0] < 90) & (a[..., 1] > 120) & (a[..., 2] < 110),
    "blue": lambda a: (a[..., 0] < 90) & (a[..., 1] < 130) & (a[..., 2] > 150),
    "yellow": lambda a: (a[..., 0] > 180) & (a[..., 1] > 150) & (a[..., 2] < 90),
}


def find_shapes(img: Image.Image) -> dict[str, tuple[int, int, int, int, float]]:
    """colour -> (x0, y0, x1, y1, fill ratio of the box) for every colour present."""
    arr = np.asarray(img, dtype=int)
    found = {}
    for colour, mask_of in COLOUR_MASKS.items():
        ys, xs = np.nonzero(mask_of(arr))
        if len(xs):
            box = (xs.min(), ys.min(), xs.max(), ys.max())
            found[colour] = (*box, len(xs) / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)))
    return found


def test_synthetic_is_deterministic_per_split():
    a, b = SyntheticShapes("train", 20, seed=3), SyntheticShapes("train", 20, seed=3)
    assert [s.captions for s in a.samples] == [s.captions for s in b.samples]
    assert all(np.array_equal(np.asarray(a.load_image(i)), np.asarray(b.load_image(i))) for i in range(5))
    assert SyntheticShapes("train", 5, seed=3).samples[4].captions == a.samples[4].captions  # per-image streams
    for other in (SyntheticShapes("val", 20, seed=3), SyntheticShapes("train", 20, seed=4)):
        assert [s.captions for s in other.samples] != [s.captions for s in a.samples]
        assert not np.array_equal(np.asarray(other.load_image(0)), np.asarray(a.load_image(0)))
    assert [s.image_id for s in a.samples] == list(range(20)) and all(s.path is None for s in a.samples)


def test_synthetic_captions():
    source = SyntheticShapes("train", 300)
    assert all(len(set(s.captions)) == 5 for s in source.samples)
    vocabulary = {word for s in source.samples for c in s.captions for word in tokenize(c)}
    assert len(vocabulary) <= 25
    single = sum(scene.relation is None for scene in source.scenes) / len(source)
    assert 0.2 < single < 0.45
    img = source.load_image(0)
    assert img.mode == "RGB" and img.size == (128, 128)


def test_synthetic_captions_describe_the_pixels():
    source = SyntheticShapes("val", 60, seed=1)
    image_size = source.image_size
    fill = {"square": (0.85, 1.01), "circle": (0.65, 0.88), "triangle": (0.35, 0.65)}
    for i, scene in enumerate(source.scenes):
        found = find_shapes(source.load_image(i))
        assert set(found) == {shape.colour for shape in scene.shapes}
        assert all(shape.colour in source.samples[i].captions[0] for shape in scene.shapes)
        for shape in scene.shapes:
            x0, y0, x1, y1, ratio = found[shape.colour]
            side = SIZES[shape.size] * 2 * image_size
            assert 0.8 * side < x1 - x0 + 1 < 1.2 * side, (i, shape)
            assert fill[shape.kind][0] < ratio < fill[shape.kind][1], (i, shape, ratio)
        if scene.relation is not None:
            a, b = (found[shape.colour] for shape in scene.shapes)
            assert source.samples[i].captions[0].split(" a ")[0].endswith(scene.relation)
            ordered = {"left of": a[2] < b[0], "right of": b[2] < a[0], "above": a[3] < b[1], "below": b[3] < a[1]}
            assert ordered[scene.relation], (i, scene.relation, a, b)


def test_synthetic_write_images_and_errors(tmp_path):
    source = SyntheticShapes("test", 4, image_size=64)
    paths = source.write_images(tmp_path / "shapes", 3)
    assert len(paths) == 3 and all(p.suffix == ".png" for p in paths)
    assert np.array_equal(np.asarray(open_image(paths[2])), np.asarray(source.load_image(2)))
    with pytest.raises(ValueError, match="between 0 and 4"):
        source.write_images(tmp_path, 5)
    with pytest.raises(ValueError, match="one of"):
        SyntheticShapes("dev", 4)
    with pytest.raises(ValueError, match="at least 32"):
        SyntheticShapes("train", 4, image_size=16)


# ---------------------------------------------------------------- damaged annotation files


def _latin1_byte_on_line_3(path: Path) -> None:
    """Replace the first letter of path's third line by the Latin-1 'ö' (0xf6), as an editor saving Latin-1 would."""
    data = path.read_bytes()
    start = data.index(b"\n", data.index(b"\n") + 1) + 1
    path.write_bytes(data[:start] + b"\xf6" + data[start + 1:])


@pytest.mark.parametrize("dataset, name", [("flickr8k", "Flickr8k.token.txt"),
                                           ("flickr8k", "Flickr_8k.trainImages.txt"),
                                           ("coco", "captions_val2017.json"), ("karpathy", "dataset_coco.json")])
def test_annotation_file_that_is_not_utf8_is_named_with_its_line(make_flickr8k, make_coco, make_karpathy, tmp_path,
                                                                dataset, name):
    if dataset == "flickr8k":
        root = make_flickr8k(tmp_path)
        path, load = root / name, lambda: flickr8k_source(root, "train")
    elif dataset == "coco":
        root = make_coco(tmp_path)
        path, load = root / "annotations" / name, lambda: coco_source(root, "val")
    else:
        path, image_root = make_karpathy(tmp_path, "coco")
        load = lambda: karpathy_source(path, image_root, "train")  # noqa: E731
    if path.suffix == ".json":  # indented, so that it has lines
        path.write_text(json.dumps(json.loads(path.read_text()), indent=1))
    _latin1_byte_on_line_3(path)
    with pytest.raises(ValueError) as info:
        load()
    assert str(info.value) == f"{path}:3: not UTF-8 text (byte 0xf6); save the file as UTF-8"


def _edited_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["annotations"][1].pop("caption"), r"annotations\[1\] \(id 1\) has no 'caption' \(str expected\)"),
    (lambda d: d["annotations"][2].update(caption=None), r"annotations\[2\] \(id 2\) has None as 'caption'"),
    (lambda d: d["annotations"][2].update(caption=7), r"annotations\[2\] \(id 2\) has 7 as 'caption'"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id \d+\) has no 'file_name' \(str expected\)"),
], ids=["no caption", "null caption", "number caption", "no file_name"])
def test_coco_entry_without_a_key_or_of_the_wrong_type_is_named(make_coco, tmp_path, edit, message):
    root = make_coco(tmp_path, n_images=3)
    path = root / "annotations" / "captions_val2017.json"
    _edited_json(path, edit)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}.*; the file is damaged"):
        coco_source(root, "val")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["images"][1]["sentences"][2].pop("raw"), r"images\[1\]\.sentences\[2\] \(imgid 1\) has no 'raw'"),
    (lambda d: d["images"][1].pop("split"), r"images\[1\] \(imgid 1\) has no 'split'"),
    (lambda d: d["images"][1].pop("filename"), r"images\[1\] \(imgid 1\) has no 'filename'"),
    (lambda d: d["images"][1].pop("sentences"), r"images\[1\] \(imgid 1\) has no 'sentences' \(list expected\)"),
    (lambda d: d["images"][1].pop("imgid"), r"images\[1\] has no 'imgid' \(int expected\)"),
    (lambda d: d["images"][1].update(filename=None), r"images\[1\] \(imgid 1\) has None as 'filename'"),
    (lambda d: d.update(images={"0": d["images"][0]}), r"'images' must be a list, got dict"),
], ids=["no raw", "no split", "no filename", "no sentences", "no imgid", "null filename", "images an object"])
def test_karpathy_entry_without_a_key_or_of_the_wrong_type_is_named(make_karpathy, tmp_path, edit, message):
    path, image_root = make_karpathy(tmp_path, "flickr8k")
    _edited_json(path, edit)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {message}"):
        karpathy_source(path, image_root, "train")


def test_blank_captions_are_left_out_and_counted(make_flickr8k, make_coco, make_karpathy, tmp_path, caplog):
    root = make_flickr8k(tmp_path)
    names = (root / "Flickr_8k.trainImages.txt").read_text().split()
    token = root / "Flickr8k.token.txt"
    lines = token.read_text().split("\n")
    blank = {f"{names[0]}#1", f"{names[0]}#3", *(f"{names[1]}#{k}" for k in range(5))}  # names[1]: blank only
    token.write_text("\n".join(f"{line.split(chr(9))[0]}\t" + " " * (n % 2) if line.split("\t")[0] in blank else line
                               for n, line in enumerate(lines)))
    source = flickr8k_source(root, "train")
    assert source.blank_captions == 7
    assert [s.image_id for s in source.samples] == [names[0], *names[2:]]  # an image of blank captions only is out
    assert len(source.samples[0].captions) == 3 and all(c.strip() for s in source.samples for c in s.captions)
    assert flickr8k_source(root, "val").blank_captions == 0

    caplog.set_level(logging.WARNING, logger="captioning")
    build_source(load_config(None, ["data.dataset=flickr8k", f"data.root={root}"]).data, "train")
    assert "the train split's annotations hold 7 blank captions; they are left out" in caplog.text

    coco_root = make_coco(tmp_path, n_images=2)
    path = coco_root / "annotations" / "captions_val2017.json"
    _edited_json(path, lambda d: [a.update(caption=" \t") for a in d["annotations"]])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: all 11 captions of the val split are blank"):
        coco_source(coco_root, "val")

    json_path, image_root = make_karpathy(tmp_path, dataset="flickr8k")
    _edited_json(json_path, lambda d: d["images"][0]["sentences"][2].update(raw="  "))
    split = json.loads(json_path.read_text())["images"][0]["split"]
    source = karpathy_source(json_path, image_root, split)
    assert source.blank_captions == 1 and len(source.samples[0].captions) == 4
    assert all(c.strip() for s in source.samples for c in s.captions)


def test_check_data_reports_blank_captions_and_fails_a_split_of_blank_captions_only(make_flickr8k, tmp_path, capsys):
    check_data = load_script("scripts/check_data.py")
    root = make_flickr8k(tmp_path)
    token = root / "Flickr8k.token.txt"
    lines = token.read_text().split("\n")
    token.write_text("\n".join([lines[0].split("\t")[0] + "\t", *lines[1:]]))
    args = check_data.get_args_parser().parse_args(["--data-root", str(tmp_path), "--datasets", "flickr8k"])
    assert check_data.main(args) == 0
    assert "flickr8k/train: 4 images, 19 captions\n  blank captions left out: 1\n" in capsys.readouterr().out

    token.write_text("\n".join(line.split("\t")[0] + "\t " if line else line for line in lines))
    assert check_data.main(args) == 1
    out = capsys.readouterr().out
    assert f"flickr8k/train: FAILED to load: {token}: all 20 captions of the train split are blank" in out
    assert out.strip().endswith("-> PROBLEMS")


# ---------------------------------------------------------------- damaged feature cache


def _written_cache(tmp_path: Path, rows: int = 4) -> tuple[Path, dict]:
    """A feature cache of the train split as extract_features leaves it: <split>.npy (rows, N, C) and its record."""
    folder = tmp_path / "features"
    folder.mkdir()
    record = {"encoder": "tiny", "dtype": "float32", "num_images": rows}
    np.save(folder / "train.npy", np.ones((rows, 9, 8), np.float32))
    (folder / "train.json").write_text(json.dumps({**record, "unreadable": []}))
    return folder, record


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "mmap length is greater than file size"),
    (lambda p: p.write_bytes(b""), "an empty file"),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(600)), "not a .npy array"),
    (lambda p: np.save(p, np.ones((2, 9, 8), np.float32)), "2 rows for the 4 images of its record"),  # cp val.npy
    (lambda p: np.save(p, np.ones((4, 72), np.float32)), r"rows of shape \(72,\) and dtype float32, not \(N, C\)"),
    (lambda p: np.save(p, np.ones((4, 9, 8), np.float16)), "rows of shape .* and dtype float16, not .* of float32"),
], ids=["truncated", "empty", "random bytes", "another split", "rows of another shape", "another dtype"])
def test_a_damaged_feature_array_is_refused_at_open_naming_it(tmp_path, damage, problem):
    folder, record = _written_cache(tmp_path)
    assert FeatureLoader(folder, "train", record)(3).shape == (9, 8)
    damage(folder / "train.npy")
    with pytest.raises(ConfigError, match=rf"^feature cache {re.escape(str(folder / 'train.npy'))} is damaged "
                                          rf"\({problem}.*\); delete train\.npy and train\.json in "
                                          rf"{re.escape(str(folder))} \(that split is extracted again\)"):
        FeatureLoader(folder, "train", record)


class _TinyEncoder(torch.nn.Module):
    """images (B, 3, 32, 32) -> grid (B, 4, 3), pooled (B, 3): enough for extract_features."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = images[:, :, ::16, ::16].flatten(2).transpose(1, 2)  # (B, 4, 3)
        return grid, grid.mean(1)


def test_a_full_disk_while_caching_features_is_one_error_naming_the_folder(tmp_path, monkeypatch):
    source = SyntheticShapes("train", 6, image_size=32)
    preprocess = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    record = {"dtype": "float32", "num_images": 6}
    folder = tmp_path / "features"
    cached = extract_features(_TinyEncoder(), source, preprocess, folder, "train", record, torch.device("cpu"), 4, 0)
    assert FeatureLoader(folder, "train", record)(5).shape == (4, 3) and cached.is_file()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ValueError, match=rf"^no space left for the val split's feature cache in "
                                         rf"{re.escape(str(folder))} \(No space left on device\); free space there or "
                                         "set data.feature_cache to a folder on another disk"):
        extract_features(_TinyEncoder(), source, preprocess, folder, "val", record, torch.device("cpu"), 4, 0)
    assert sorted(p.name for p in folder.iterdir()) == ["train.json", "train.npy"]  # no .val.npy.tmp left
