"""The ``segface-jax`` command line: convert release checkpoints and check parity with PyTorch."""

from __future__ import annotations

import argparse
import sys

from segface_jax.variants import VARIANTS, UnknownVariantError, get_variant


def _convert(args: argparse.Namespace) -> int:
    from segface_jax.convert.converter import convert_checkpoint

    report = convert_checkpoint(args.checkpoint, args.out_dir, args.variant, args.overwrite)
    print(report.summary())
    print(f"wrote {args.out_dir} (sha256 of source {report.sha256[:16]}...)")
    return 0


def _convert_backbone(args: argparse.Namespace) -> int:
    from segface_jax.convert.backbone import convert_backbone

    out = args.out or f"{args.arch}-imagenet"
    report = convert_backbone(args.arch, args.checkpoint, out, args.overwrite)
    print(report.summary())
    print(f"wrote {out}")
    return 0


def _parity(args: argparse.Namespace) -> int:
    from segface_jax.convert.parity import run_parity

    run_parity(get_variant(args.variant), args.weights, args.image, args.out)
    return 0


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
    q.add_argument("--variant", required=True, help="released variant name")
    q.add_argument("--weights", help="release model_299.pt (default: the hub, else seeded random)")
    q.add_argument("--image", help="face photo (default: scikit-image's astronaut)")
    q.add_argument("--out", help="overlay PNG path (default: parity_<variant>.png)")
    q.set_defaults(func=_parity)

    v = sub.add_parser("variants", help="list the released variants")
    v.set_defaults(func=_variants)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a sub-command and turn known errors into one-line messages."""
    from segface_jax.checkpoint import CheckpointError
    from segface_jax.preprocess import ImageError

    args = build_parser().parse_args(argv)
    known: tuple[type[Exception], ...] = (CheckpointError, ImageError, UnknownVariantError,
                                          NotImplementedError)
    try:
        from segface_jax.convert.converter import ConversionError
        known += (ConversionError,)
    except ImportError:  # torch not installed: only the torch-free commands can run
        pass
    try:
        return args.func(args)
    except known as e:
        print(f"segface-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name in ("torch", "torchvision", "segment_anything", "skimage"):
            print(f"segface-jax {args.command}: error: needs {e.name}; install the converter "
                  "extra: pip install 'segface-jax[convert]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print(f"segface-jax {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
