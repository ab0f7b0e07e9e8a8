"""``python -m cape.predict``: keypoints on your own query image, from a support image with its keypoints and a
checkpoint file (a run's checkpoint_best.pt, or one downloaded from GET /jobs/{id}/checkpoints/best).

    python -m cape.predict --checkpoint checkpoint_best.pt --support support.jpg --support_keypoints kp.json \\
        [--skeleton edges.json] [--support_bbox X Y W H] --query query.jpg [--query_bbox X Y W H] \\
        --out pred.png --json pred.json

Every input is checked before torch is imported (cape/inference/inputs.py, as the API checks uploads): a mistake
prints one line naming it and exits with code 2. The prediction itself is cape/inference/keypoints.py's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from cape.config import DEVICE_FORMS, DeviceName
from cape.errors import CapeError
from cape.inference.inputs import check_predict_inputs


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CapeError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _json_text(value: str | None, what: str) -> str | None:
    """A JSON argument: the JSON itself when it starts with '[', else the file that holds it."""
    if value is None or value.lstrip().startswith("["):
        return value
    return _read(value, what).decode("utf-8", "replace")


def _device(value: str) -> str:
    """The same device names as TrainConfig.device; argparse turns the ValueError into a usage error at --device."""
    try:
        return TypeAdapter(DeviceName).validate_python(value)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.errors()[0]["msg"]) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cape.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint file of a run")
    p.add_argument("--support", required=True, help="support image (JPEG, PNG or WebP)")
    p.add_argument(
        "--support_keypoints",
        required=True,
        help="JSON file (or inline JSON) [[x, y], ...] or [[x, y, v], ...] in support-image pixels",
    )
    p.add_argument("--skeleton", help="JSON file (or inline JSON) [[a, b], ...] of 0-based keypoint pairs")
    p.add_argument(
        "--support_bbox",
        nargs=4,
        type=float,
        metavar=("X", "Y", "W", "H"),
        help="the object's box in the support image; default: around its keypoints",
    )
    p.add_argument("--query", required=True, help="query image (JPEG, PNG or WebP)")
    p.add_argument(
        "--query_bbox",
        nargs=4,
        type=float,
        metavar=("X", "Y", "W", "H"),
        help="the object's box in the query image; default: the whole image",
    )
    p.add_argument("--out", help="write the query image with the predicted keypoints drawn (PNG)")
    p.add_argument("--json", dest="json_path", help="write the prediction as JSON")
    p.add_argument("--device", default="auto", type=_device, help=DEVICE_FORMS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        if not Path(args.checkpoint).is_file():
            raise CapeError(f"checkpoint not found: {args.checkpoint}")
        support, query = _read(args.support, "support image"), _read(args.query, "query image")
        inputs = check_predict_inputs(
            support,
            _json_text(args.support_keypoints, "support keypoints file"),
            query,
            skeleton=_json_text(args.skeleton, "skeleton file"),
            support_bbox=json.dumps(args.support_bbox) if args.support_bbox else None,
            query_bbox=json.dumps(args.query_bbox) if args.query_bbox else None,
        )
        import torch  # loads here, after every input was found valid

        from cape.inference.keypoints import decode, predict_keypoints
        from cape.model.checkpoint import load_trained
        from cape.model.device import resolve_device
        from cape.training.pictures import draw_prediction

        trained = load_trained(args.checkpoint, resolve_device(args.device))
        query_image = decode(query, inputs.query, "query_image")
        result = predict_keypoints(trained, decode(support, inputs.support, "support_image"), query_image, inputs)
    except CapeError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    answer = {
        "checkpoint": {"path": str(args.checkpoint), "epoch": trained.epoch, "val_pck": trained.val_pck},
        "k": inputs.k,
        "keypoints": result.keypoints.tolist(),
        "confidence": result.confidence.tolist(),
        "skeleton": [list(e) for e in inputs.skeleton],
        "support_bbox": list(inputs.support_bbox),
        "query_bbox": list(inputs.query_bbox),
        "query_size": [inputs.query.width, inputs.query.height],
    }
    val = "n/a" if trained.val_pck is None else f"{100 * trained.val_pck:.2f}%"
    print(
        f"{args.checkpoint}: epoch {trained.epoch}, Val PCK@0.2 {val}; {inputs.k} keypoints in {args.query} "
        f"({result.inference_ms:.0f} ms)"
    )
    for i, ((x, y), c) in enumerate(zip(answer["keypoints"], answer["confidence"])):
        print(f"{i:>4}  x {x:9.2f}  y {y:9.2f}  confidence {c:.3f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(answer, indent=2))
    if args.out:
        Path(args.out).write_bytes(draw_prediction(query_image, torch.from_numpy(result.keypoints), inputs.skeleton))
    return 0


if __name__ == "__main__":
    sys.exit(main())
