"""The ``segface-jax`` command line: parse faces, convert and export checkpoints, check parity."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from segface_jax.datasets import DATASETS
from segface_jax.variants import VARIANTS, UnknownVariantError, Variant, get_variant


def _convert(args: argparse.Namespace) -> int:
    from segface_jax.convert import convert_checkpoint
    from segface_jax.files import ensure_writable

    ensure_writable(Path(args.out_dir).absolute().parent, "the folder of out_dir")
    report = convert_checkpoint(args.checkpoint, args.out_dir, args.variant, args.overwrite)
    print(report.summary())
    print(f"wrote {args.out_dir} (sha256 of source {report.sha256[:16]}...)")
    return 0


def _convert_backbone(args: argparse.Namespace) -> int:
    from segface_jax.convert import convert_backbone

    out = args.out or f"{args.arch}-imagenet"
    report = convert_backbone(args.arch, args.checkpoint, out, args.overwrite)
    print(report.summary())
    print(f"wrote {out}")
    return 0


def _parity(args: argparse.Namespace) -> int:
    misuse = ("pass --variant NAME, or --all for every variant whose weights are available"
              if bool(args.variant) == bool(args.all) else
              "--image and --images exclude each other" if args.image and args.images else None)
    if misuse:
        print(f"segface-jax parity: error: {misuse}", file=sys.stderr)
        return 2
    if args.golden:  # no torch: the stored reference decides
        return _parity_golden(args)
    from segface_jax.convert import ParityError, parity_inputs, run_parity, run_parity_all

    options = dict(referee=args.referee, matmul_precision=args.matmul_precision,
                   save_golden=args.save_golden)
    if args.all:
        if args.weights or args.image:
            raise ParityError("--all takes --weights-dir (DIR/<variant>/model_299.pt) and "
                              "--images DIR, not --weights or --image")
        from segface_jax.hub import cached_release

        runs = run_parity_all(list(VARIANTS.values()), args.out or "parity-report",
                              weights_dir=args.weights_dir, images=args.images,
                              allow_random_weights=args.allow_random_weights,
                              cached=cached_release, **options)
        return 0 if all(run.verdict.passed for run in runs) else 1
    variant = get_variant(args.variant)
    inputs = parity_inputs(variant, args.image, args.images)  # a bad image fails first

    def fetch(variant: Variant) -> Path | None:  # the hub, or None (said) when unreachable
        from segface_jax.hub import WeightsUnavailableError, download_release

        try:
            return download_release(variant)
        except WeightsUnavailableError as e:
            print(f"Hugging Face hub unreachable ({e.reason}); using a seeded release-format "
                  "checkpoint with RANDOM weights instead")
        return None

    run = run_parity(variant, args.weights, inputs, args.out, fetch, **options)
    return 0 if run.verdict.passed else 1


def _parity_golden(args: argparse.Namespace) -> int:
    """``parity --golden DIR``: one variant, or with ``--all`` every variant saved in DIR."""
    from segface_jax.convert import GoldenError, check_golden

    if args.image or args.images or args.save_golden or args.referee:
        raise GoldenError("--golden re-checks the stored input and reference: it takes no "
                          "--image, --images, --save-golden or --referee")
    if args.all:
        variants = [v for v in VARIANTS.values() if (Path(args.golden) / f"{v.name}.json")
                    .is_file()]
        if not variants:
            raise GoldenError(f"no golden files in {args.golden} (<variant>.json and .npz, "
                              "written by parity --save-golden)")
        if args.weights:
            raise GoldenError("--golden DIR --all finds each variant's weights in the cache; "
                              "check one variant at a time to pass --weights")
    else:
        variants = [get_variant(args.variant)]
    passed = 0
    for variant in variants:
        weights = functools.partial(_golden_weights, args.weights, variant)
        passed += check_golden(variant, args.golden, weights, args.matmul_precision).passed
    if len(variants) > 1:
        print(f"{passed} of {len(variants)} variants PASS")
    return 0 if passed == len(variants) else 1


def _golden_weights(weights: str | None, variant: Variant, sha256: str) -> Path:
    """The converted checkpoint to re-check golden files made from the release file ``sha256``:
    ``--weights`` (a converted directory, or that very ``.pt``), else the cache's conversion."""
    from segface_jax import hub
    from segface_jax.convert import GoldenError
    from segface_jax.files import sha256_file

    if weights is None:
        cached = hub.cached_conversion(sha256, variant)
        if cached is None:
            raise GoldenError(
                f"the golden files were made from a release file with sha256 "
                f"{sha256[:12]}..., whose conversion is not in the cache "
                f"({hub.cache_dir() / 'converted'}); pass --weights: a directory "
                "written by `segface-jax convert`, or the model_299.pt")
        return cached
    path = Path(weights)
    if not path.is_file():
        return path  # a converted directory (checked), or refused as not one
    if (got := sha256_file(path)) != sha256:
        raise GoldenError(f"{path} has sha256 {got[:12]}..., but the golden files "
                          f"were made from {sha256[:12]}...")
    return hub.converted_checkpoint(path, variant)  # once; needs torch


def _predict(args: argparse.Namespace) -> int:
    from segface_jax.predict import run_predict

    return run_predict(args)


def _export(args: argparse.Namespace) -> int:
    from segface_jax.export import run_export

    return run_export(args)


def _data_check(args: argparse.Namespace) -> int:
    from segface_jax.train.check import run_check

    return run_check(args)


def _data_build(args: argparse.Namespace) -> int:
    from segface_jax.train.tfds_builders import build

    b = build(args.dataset, args.root, args.data_dir)
    sizes = ", ".join(f"{name} {info.num_examples}" for name, info in b.info.splits.items())
    print(f"built {b.data_dir} (array_record): {sizes}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from segface_jax.train.evaluate import run_eval

    return run_eval(args)


def _train(args: argparse.Namespace) -> int:
    from segface_jax.train.trainer import run_train

    return run_train(args)


def _variants(args: argparse.Namespace) -> int:
    print(f"{'variant':26} {'backbone':20} {'dataset':14} {'res':>4} {'classes':>7} {'mean F1':>8}")
    for v in VARIANTS.values():
        f1 = f"{v.mean_f1:.2f}" if v.mean_f1 is not None else "-"
        print(f"{v.name:26} {v.backbone:20} {v.dataset:14} {v.resolution:4d} "
              f"{v.num_classes:7d} {f1:>8}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for every sub-command."""
    p = argparse.ArgumentParser(prog="segface-jax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a release model_299.pt to an Orbax checkpoint")
    c.add_argument("checkpoint", help="release file (torch.save dict with state_dict_backbone)")
    c.add_argument("out_dir", help="output directory (created atomically)")
    c.add_argument("--variant", help="released variant name; required when the file is ambiguous")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    c.set_defaults(func=_convert)

    b = sub.add_parser("convert-backbone",
                       help="convert torchvision ImageNet weights into encoder parameters")
    b.add_argument("checkpoint", nargs="?",
                   help="torchvision .pth (default: torchvision's cache, downloading if possible)")
    b.add_argument("--arch", required=True, help="swin_b, swin_v2_b, convnext_base, "
                   "mobilenet_v3_large, efficientnet_v2_m or resnet101")
    b.add_argument("--out", help="output directory (default: <arch>-imagenet)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output")
    b.set_defaults(func=_convert_backbone)

    q = sub.add_parser("parity", help="compare the JAX model with the PyTorch reference")
    q.add_argument("--variant", help="released variant name")
    q.add_argument("--all", action="store_true", help="every variant whose release file is "
                   "available locally (--weights-dir, the hub cache): overlays, parity.md and "
                   "parity.json in --out (default: parity-report/)")
    q.add_argument("--weights", help="release model_299.pt (default: the hub, else seeded random)")
    q.add_argument("--weights-dir", metavar="DIR", help="--all: release files as "
                   "DIR/<variant>/model_299.pt (the hub's layout) or DIR/<variant>.pt")
    q.add_argument("--allow-random-weights", action="store_true", help="--all: check the "
                   "variants without weights on seeded random release-format files")
    q.add_argument("--image", help="one face picture, taken as an aligned crop")
    q.add_argument("--images", metavar="DIR", help="every picture in DIR, taken as aligned "
                   "crops (default: the astronaut, its mirror image and a rotated crop)")
    q.add_argument("--out", help="overlay PNG path (default: parity_<variant>.png); with --all, "
                   "the report folder")
    q.add_argument("--referee", choices=("float32", "float64"),
                   help="what decides the verdict: torch float32, or a float64 run of it that "
                   "both are compared with (default: float64 for LaPa, float32 otherwise)")
    q.add_argument("--matmul-precision", choices=("highest", "default", "tf32"),
                   default="highest", help="JAX matmul precision (GPU/TPU: 'default' and "
                   "'tf32' trade accuracy for speed; CPU is always full float32)")
    q.add_argument("--save-golden", metavar="DIR", help="also store the input and the "
                   "reference's logits and stage outputs in DIR, to re-check without torch")
    q.add_argument("--golden", metavar="DIR", help="re-check against golden files saved with "
                   "--save-golden (no torch needed); --weights: the converted checkpoint, "
                   "default the cache's conversion of the file they were made from")
    q.set_defaults(func=_parity)

    r = sub.add_parser("predict", help="parse faces in images, folders or globs",
                       description="Parse faces with a released SegFace model. Weights are "
                       "downloaded from the Hugging Face hub once, converted once and cached "
                       "(see README, 'Parsing your images').")
    r.add_argument("inputs", nargs="*", help="image files, folders (recursive) or glob patterns")
    r.add_argument("--variant", help="released variant (see `segface-jax variants`); "
                   "optional with --weights")
    r.add_argument("--weights", help="release model_299.pt or a `segface-jax convert` directory "
                   "(default: download the variant's release file)")
    r.add_argument("--out", default="segface-out", help="output folder (default: segface-out)")
    r.add_argument("--landmarks", help="JSON {image: [[x, y], ...]} (5, 68 or 106 points), a "
                   "folder of <stem>.txt files, or one .txt for a single image")
    r.add_argument("--faces", choices=["all", "largest", "none"], default="all",
                   help="find faces (MTCNN, facenet-pytorch 2.6.0's weights) and parse each, "
                   "aligned as the model's training faces were, or only the largest; none: "
                   "parse the whole image as given (default: all)")
    r.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="flip: average each face's probabilities with its mirror image's (left "
                   "and right classes swapped back); twice the compute (default: none)")
    r.add_argument("--detect-landmarks", action="store_true",
                   help="find faces with MediaPipe instead (one face per image); with --faces "
                   "none, LaPa's 5 points (pip install 'segface-jax[detect]')")
    r.add_argument("--batch-size", type=int, default=None, help="images per forward pass, "
                   "compiled once per power of two up to it (default: 1 on CPU, 8 on GPU/TPU)")
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (parameters stay float32)")
    r.add_argument("--save", default=None,
                   help="outputs: any of labels,instances,overlay,probs,json (default "
                   "labels,instances,overlay,json; instances only with --faces all|largest)")
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    r.add_argument("--skip-existing", action="store_true",
                   help="leave inputs whose outputs all exist (resume an interrupted run)")
    r.add_argument("--revision", help="hub revision (branch, tag or commit) of the weights")
    r.add_argument("--example", action="store_true",
                   help="also parse scikit-image's astronaut photo (written as astronaut_*)")
    r.add_argument("--allow-random-weights", action="store_true",
                   help="when the hub is unreachable, run a seeded random-weight checkpoint "
                   "(labelled as such) instead of failing: for smoke tests only")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_predict)

    e = sub.add_parser("export", help="export a variant as StableHLO (jax.export) or ONNX")
    e.add_argument("--variant", help="released variant name (optional with --weights)")
    e.add_argument("--weights", help="release model_299.pt or converted directory "
                   "(default: download the variant's release file)")
    e.add_argument("--format", choices=["stablehlo", "onnx"], required=True)
    e.add_argument("--out", help="output file (default: <variant>.<stablehlo|onnx>)")
    e.add_argument("--batch-size", type=int, default=None, help="fixed batch size (default: "
                   "any batch for StableHLO, 1 for ONNX)")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    e.add_argument("--overwrite", action="store_true", help="replace an existing output")
    e.add_argument("--revision", help="hub revision of the weights")
    e.set_defaults(func=_export)

    datasets = [*DATASETS, "folder"]  # folder: the generic layout (images/, masks/, ...)
    d = sub.add_parser("data", help="check a dataset folder or build its TFDS files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="report missing images, masks and landmark files")
    dc.add_argument("--dataset", required=True, choices=datasets)
    dc.add_argument("--root", required=True, help="the dataset folder in its release layout")
    dc.add_argument("--split", default="all", help="train, val, test or all (default)")
    dc.add_argument("--decode", action="store_true", help="also open every file")
    dc.set_defaults(func=_data_check)
    db = dsub.add_parser("build", help="TFDS array_record files from the release layout")
    db.add_argument("--dataset", required=True, choices=datasets)
    db.add_argument("--root", required=True, help="the dataset folder (TFDS manual_dir)")
    db.add_argument("--data-dir", required=True, help="TFDS data directory to write")
    db.set_defaults(func=_data_build)

    ev = sub.add_parser("eval", help="upstream's test metrics for a model on a dataset")
    ev.add_argument("--variant", help="released variant name (optional with --weights)")
    ev.add_argument("--weights", help="release model_299.pt, converted directory or a trained "
                    "model (WORKDIR/model); default: download the variant's release file")
    ev.add_argument("--dataset", required=True, choices=datasets)
    ev.add_argument("--mapping", metavar="JSON", help="score through a label mapping when the "
                    "model's classes are not the labels' (segface_jax/labels.py)")
    ev.add_argument("--root", help="dataset folder in its release layout")
    ev.add_argument("--data-dir", help="read the TFDS build in this directory instead")
    ev.add_argument("--split", default="test")
    ev.add_argument("--batch-size", type=int, default=8,
                    help="global batch, rounded up to a multiple of the device count")
    ev.add_argument("--workers", type=int, default=0, help="grain decoding processes")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ev.add_argument("--revision", help="hub revision of the weights")
    ev.add_argument("--out", help="report folder (default: eval-<variant>-<split>)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)

    t = sub.add_parser("train", help="train a SegFace recipe (configs/segface.py:VARIANT)")
    t.add_argument("--config", required=True,
                   help="a config file, FILE.py or FILE.py:ARG (get_config(ARG)), e.g. "
                   "configs/segface.py:swinb_celeba_512")
    t.add_argument("--workdir", help="checkpoints and logs: a path, or a URL such as "
                   "gs://BUCKET/RUN (default: runs/<variant>)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data_root=/data/LaPa (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="write a jax.profiler trace of STEPS steps (after the first) to "
                        "WORKDIR/profile")
    t.add_argument("--peak-tflops", type=float, default=None,
                   help="one device's peak TFLOP/s at the config's dtype, for model FLOPs "
                        "utilisation (default: a table of known GPUs and TPUs)")
    t.add_argument("--num-processes", type=int, default=None,
                   help="multi-host: number of processes (calls jax.distributed.initialize)")
    t.add_argument("--process-id", type=int, default=None, help="multi-host: this process")
    t.add_argument("--coordinator", help="multi-host: host:port of process 0")
    t.set_defaults(func=_train)

    v = sub.add_parser("variants", help="list the released variants")
    v.set_defaults(func=_variants)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command and turn known errors into one-line messages."""
    from segface_jax.checkpoint import CheckpointError
    from segface_jax.files import OutputError
    from segface_jax.labels import LabelError
    from segface_jax.landmarks import LandmarkError
    from segface_jax.predict import InputError
    from segface_jax.preprocess import ImageError

    args = build_parser().parse_args(argv)
    known: tuple[type[Exception], ...] = (CheckpointError, ImageError, UnknownVariantError,
                                          NotImplementedError, LandmarkError, InputError,
                                          OutputError, LabelError)
    try:
        from segface_jax.train.data import DataError
        from segface_jax.train.trainer import TrainingError
        known += (DataError, TrainingError)
    except ImportError:  # the train extra is not installed
        pass
    try:
        from segface_jax.convert import ConversionError, GoldenError, ParityError
        known += (ConversionError, GoldenError, ParityError)
    except ImportError:  # torch not installed: only the torch-free commands can run
        pass
    try:
        return args.func(args)
    except known as e:
        print(f"segface-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("grain", "tensorflow_datasets", "array_record"):
            print(f"segface-jax {args.command}: error: needs {e.name}; install the train "
                  "extra: pip install 'segface-jax[train]'", file=sys.stderr)
            return 2
        if e.name in ("torch", "torchvision", "segment_anything", "skimage"):
            print(f"segface-jax {args.command}: error: needs {e.name}; install the converter "
                  "extra: pip install 'segface-jax[convert]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"segface-jax {args.command}: interrupted; no partial output was left behind",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
