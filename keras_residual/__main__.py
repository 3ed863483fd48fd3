"""Command line: ``python -m keras_residual demo|bench|info|build``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keras_residual",
        description="Residual networks for Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a Sequential ResNet on the scikit-learn digits, save and reload it",
    )
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--out",
        default=None,
        help="folder for the saved model (default: a new temp folder)",
    )
    demo.add_argument(
        "--min-accuracy",
        type=float,
        default=0.98,
        help="test accuracy below which the demo exits with status 1 (default 0.98)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    bench = commands.add_parser(
        "bench",
        help="time keras.applications, torchvision (torch), composite, native, auto, folded "
        "and the limit side by side",
    )
    from keras_residual import bench as bench_lib

    bench_lib.add_arguments(bench)

    commands.add_parser(
        "info",
        help="print the backend, the device and the status of the native kernels",
    )

    build = commands.add_parser(
        "build",
        help="compile the native libraries ahead of time (for Docker images and clusters)",
        description=(
            "Compile the native libraries now, into the cache that later processes load "
            "from, instead of on first use. Exits with status 1 if a build fails."
        ),
    )
    build.add_argument(
        "--backend",
        choices=["tensorflow", "torch", "jax", "all"],
        default="all",
        help="which adapter to build; 'all' builds every installed one (default all)",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="compile again even if the cache holds a library or a recorded failure",
    )
    cuda = build.add_mutually_exclusive_group()
    cuda.add_argument(
        "--cuda",
        dest="cuda",
        action="store_const",
        const=True,
        default=None,
        help="torch and jax: require the CUDA kernels (fail if they cannot be compiled)",
    )
    cuda.add_argument(
        "--no-cuda",
        dest="cuda",
        action="store_const",
        const=False,
        help="torch and jax: leave the CUDA kernels out (default: compile them when "
        "the framework has CUDA and nvcc is found)",
    )

    args = parser.parse_args(argv)
    if args.command == "build":
        from keras_residual.native import _cli

        return _cli.build(args.backend, force=args.force, cuda=args.cuda)
    if args.command == "bench":
        return bench_lib.run_from_args(args)
    if args.command == "info":
        from keras_residual import native

        native.print_info()
        return 0
    if args.command == "demo":
        from keras_residual import demo as demo_lib

        result = demo_lib.run(
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            out_dir=args.out,
            min_accuracy=args.min_accuracy,
            verbose=0 if args.quiet else 1,
        )
        return 0 if result["passed"] else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
