"""``ibmd-restore``: restore corrupted images (a folder of them, or one image) with a distilled student.

    ibmd-restore MODEL INPUT OUTPUT_DIR [--batch-size 16] [--device auto] [--nfe M] [--seed 0]
                 [--no-recursive] [--overwrite] [--resize fit|error] [--quiet]

(or ``python -m ibmd_pipeline.commands.restore ...``). MODEL is a student checkpoint (the distill
pipeline's ``student.pt``) or its TorchScript export (the export pipeline's
``student_torchscript.pt``): the file, or its catalog entry's folder such as
``data/06_models/student.pt/``, whose latest version is used. INPUT is a folder of images (read
recursively) or one image file. See :mod:`ibmd_pipeline.deploy.restore` for how images are read,
resized, masked (inpainting) and seeded. Exit status: 0 on success, 2 for unusable arguments,
inputs or model files (the message says why; nothing is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ibmd_pipeline.deploy.export import ExportError
from ibmd_pipeline.deploy.restore import RestoreError, restore_images
from ibmd_pipeline.engine.checkpoint import CheckpointError

__all__ = ["build_parser", "main"]

PROG = "ibmd-restore"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of :func:`~ibmd_pipeline.deploy.restore.restore_images`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Restore every image under INPUT (a folder, or one image) with a distilled IBMD "
        "student and write PNGs under OUTPUT_DIR at the same relative paths.",
    )
    parser.add_argument(
        "model",
        help="student checkpoint (.pt) or its TorchScript export, or its catalog folder "
        "(e.g. data/06_models/student.pt/: the latest version)",
    )
    parser.add_argument("input", help="folder of corrupted images (read recursively), or one image")
    parser.add_argument("output_dir", help="where the restored PNGs go (outside INPUT)")
    parser.add_argument(
        "--batch-size", type=_positive, default=16, help="images per forward pass (default 16)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument(
        "--nfe",
        type=_positive,
        default=None,
        help="generator steps, 1..N (default: the N the student was trained with)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same images")
    parser.add_argument(
        "--no-recursive",
        dest="recursive",
        action="store_false",
        help="read only the files directly inside INPUT",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing files in OUTPUT_DIR")
    parser.add_argument(
        "--resize",
        choices=("fit", "error"),
        default="fit",
        help="images of another size than the model's: resize and centre-crop them (fit, "
        "default) or stop with an error",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        report = restore_images(
            args.model,
            args.input,
            args.output_dir,
            batch_size=args.batch_size,
            device=args.device,
            nfe=args.nfe,
            seed=args.seed,
            recursive=args.recursive,
            overwrite=args.overwrite,
            resize=args.resize,
            progress=not args.quiet,
        )
    except (RestoreError, CheckpointError, ExportError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        meta = report.metadata
        print(
            f"restored {len(report.written)} images into '{args.output_dir}' with the {report.source} "
            f"student '{report.model_file}' (task {meta.task_kind}, {meta.image_size}x{meta.image_size}, "
            f"NFE {report.nfe} of {meta.nfe}, seed {args.seed}, {report.device})"
            + (f"; skipped {len(report.skipped)} unreadable files" if report.skipped else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
