"""What a prediction accepts, checked before any decoding (cape/inference/inputs.py), and how an image is decoded."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cape.config import MAX_KEYPOINTS
from cape.inference.inputs import (
    ImageInfo,
    InputError,
    check_predict_inputs,
    inspect_image,
    keypoint_box,
)
from tests.helpers import PNG, encoded, png_claiming

KEYPOINTS = json.dumps([[10, 10], [30, 20], [50, 40]])


def rejected(field: str, match: str, **kwargs) -> InputError:
    args = {"support_image": PNG, "support_keypoints": KEYPOINTS, "query_image": PNG} | kwargs
    with pytest.raises(InputError, match=match) as caught:
        check_predict_inputs(**args)
    assert caught.value.field == field
    return caught.value


def test_valid_inputs_with_defaults():
    inputs = check_predict_inputs(PNG, KEYPOINTS, encoded((100, 80), "JPEG"), skeleton="[[0, 1], [1, 2]]")
    assert (inputs.support, inputs.query) == (ImageInfo("PNG", 64, 48), ImageInfo("JPEG", 100, 80))
    assert inputs.k == 3 and inputs.labelled == (True, True, True)
    assert inputs.skeleton == ((0, 1), (1, 2))
    assert inputs.query_bbox == (0.0, 0.0, 100.0, 80.0)  # the whole query image
    x, y, w, h = inputs.support_bbox  # around the keypoints
    assert (x, y, x + w, y + h) == (10, 10, 50, 40)


def test_keypoint_box_has_a_floor_for_a_single_keypoint():
    box = keypoint_box([(20.0, 30.0)], [True], ImageInfo("PNG", 200, 100))
    assert box == (10.0, 20.0, 20.0, 20.0)  # 10 % of the longer side, centred on the keypoint


def test_unlabelled_keypoints_are_kept_and_may_lie_anywhere():
    inputs = check_predict_inputs(PNG, json.dumps([[10, 10, 2], [-5, 900, 0], [20, 20, 1]]), PNG)
    assert inputs.k == 3 and inputs.labelled == (True, False, True)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "support_image is empty"),
        (b"this is not an image at all", "support_image is not an image: supported formats are JPEG, PNG, WebP"),
        (encoded(fmt="GIF"), "support_image is a GIF image: supported formats are"),
        (encoded(fmt="BMP"), "support_image is a BMP image"),
        (png_claiming(10_000, 10_000), r"10000x10000 pixels \(100.0 MP\): the limit is 50 MP"),
        (
            png_claiming(100_000, 100_000),
            r"10000000000 pixels.*: the limit is 50 MP",
        ),  # Pillow's own bomb error, reworded
        (encoded(fmt="JPEG")[:200], "support_image is a damaged image"),  # cut inside its header
    ],
)
def test_bad_support_images(data, match):
    rejected("support_image", match, support_image=data)


def test_bad_query_image_names_the_query():
    rejected("query_image", "query_image is not an image", query_image=b"GIF89a?")


def test_the_pixel_limit_is_a_parameter():
    with pytest.raises(InputError, match="64x48 pixels .* the limit is 0.001 MP"):
        inspect_image(PNG, "query_image", max_pixels=1000)


@pytest.mark.parametrize(
    "keypoints, match",
    [
        ("[]", r"non-empty list .*K >= 1"),
        ("{}", "non-empty list"),
        ("not json", "support_keypoints is not valid JSON"),
        (
            json.dumps([[1, 1]] * (MAX_KEYPOINTS + 1)),
            f"has {MAX_KEYPOINTS + 1} keypoints: the model predicts at most {MAX_KEYPOINTS}",
        ),
        ("[[10, 10], [70, 10]]", r"support_keypoints\[1\] = \[70, 10\] is outside the support image \(64x48\)"),
        ("[[10, -1]]", "outside the support image"),
        ("[[10, NaN]]", "NaN is not a finite number"),
        ("[[Infinity, 1]]", "Infinity is not a finite number"),
        ("[[1e999, 1]]", "must be a finite number"),
        ('[[10, "5"]]', "must be a finite number"),
        ("[[10, true]]", "must be a finite number"),
        ("[[10, 10, 3]]", "v must be 0 .*, 1 or 2"),
        ("[[10, 10, true]]", "v must be 0"),
        ("[[10]]", r"\[0\] must be \[x, y\] or \[x, y, v\]"),
        ("[[10, 10, 0], [5, 5, 0]]", "no keypoint is labelled"),
    ],
)
def test_bad_keypoints(keypoints, match):
    rejected("support_keypoints", match, support_keypoints=keypoints)


@pytest.mark.parametrize(
    "skeleton, match",
    [
        ("[[0, 3]]", r"skeleton\[0\] = \[0, 3\]: keypoint indices must be 0..2 \(0-based, K = 3\)"),
        ("[[-1, 0]]", "must be 0..2"),
        ("[[0, 1, 2]]", "must be a pair"),
        ("[[0.5, 1]]", "must be a pair"),
        ('"edges"', "must be a list"),
        ("[[0, NaN]]", "NaN is not a finite number"),
    ],
)
def test_bad_skeleton(skeleton, match):
    rejected("skeleton", match, skeleton=skeleton)


@pytest.mark.parametrize("field", ["support_bbox", "query_bbox"])
@pytest.mark.parametrize(
    "box, match",
    [
        ("[0, 0, 0, 10]", "width and height must be positive"),
        ("[100, 100, 10, 10]", "lies outside the image"),
        ("[0, 0, 10]", r"must be \[x, y, w, h\]"),
        ("[0, 0, NaN, 10]", "NaN is not a finite number"),
    ],
)
def test_bad_boxes(field, box, match):
    rejected(field, match, **{field: box})


def test_exif_rotation_swaps_the_shown_size():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown as 48 wide, 64 high
    data = encoded((64, 48), "JPEG", exif=exif.tobytes())
    info = inspect_image(data, "support_image")
    assert (info.width, info.height) == (48, 64)
    from cape.inference.keypoints import (
        decode,  # torch: the decoder must agree with the header's shown size
    )

    assert tuple(decode(data, info, "support_image").shape) == (3, 64, 48)


def test_a_truncated_image_fails_at_decoding_with_the_field_named():
    from cape.inference.keypoints import decode

    data = encoded((64, 48), "PNG")[:-30]  # the header is intact, the pixel data is not
    info = inspect_image(data, "query_image")
    with pytest.raises(InputError, match="query_image could not be decoded as PNG") as caught:
        decode(data, info, "query_image")
    assert caught.value.field == "query_image"


def test_the_predict_cli_refuses_a_device_name_as_train_does(capsys):
    from cape.predict import main

    with pytest.raises(SystemExit) as exit:
        main(["--checkpoint", "c.pt", "--support", "s.png", "--support_keypoints", "k.json", "--query", "q.png",
              "--device", "gpu"])  # fmt: skip
    assert exit.value.code == 2
    assert "argument --device: Input should be auto (CUDA when there is one), cpu, cuda, cuda:N or mps, not 'gpu'" in (
        capsys.readouterr().err
    )
