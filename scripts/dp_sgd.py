"""The TF Privacy DP-SGD tutorial, centrally: ``uv run python scripts/dp_sgd.py``.

Defaults are the tutorial's (l2_norm_clip 1.5, noise_multiplier 1.3, one
example per microbatch, learning rate 0.25, batch 250, 3 epochs, delta 1e-5),
with Poisson-sampled batches (``--batch-sampling poisson``, the batches TF
Privacy's epsilon assumes; ``shuffle``: fixed-size batches from a shuffle, as
the tutorial's Keras pipeline, with a bound without amplification). With
``--mnist PATH`` it trains the tutorial's CNN on a local Keras ``mnist.npz``
(never downloaded); without it, a fedsim model (``--model``, default mlp) on
the bundled 8x8 digits. Prints test accuracy and epsilon in one line; bad
values exit 2 with one line. The epsilon accounts for exactly the steps run.
The work is :func:`fedsim.client.dp_sgd.train_central`.

Any row of TF Privacy's published MNIST table can be rerun, e.g.::

    uv run python scripts/dp_sgd.py --mnist mnist.npz --batch-size 256 \
        --learning-rate 0.15 --noise-multiplier 1.1 --l2-norm-clip 1.0 --epochs 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _number(kind: type, low: float, low_open: bool, allowed: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: allowed is {allowed}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low)):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed is {allowed}")
        return value
    return parse


def _delta(text: str) -> float:
    value = _number(float, 0.0, True, "a number in (0, 1)")(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: allowed is a number in (0, 1)")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad value prints one line (no usage block) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="dp_sgd.py", description="TF Privacy's DP-SGD tutorial, centrally, with fedsim.")
    positive = _number(float, 0.0, True, "a finite number > 0")
    p.add_argument("--l2-norm-clip", type=positive, default=1.5,
                   help="L2 clip of each microbatch gradient (default 1.5)")
    p.add_argument("--noise-multiplier", type=_number(float, 0.0, False, "a finite number >= 0"),
                   default=1.3, help="noise std / l2_norm_clip on the summed gradients (1.3)")
    p.add_argument("--batch-sampling", choices=("poisson", "shuffle"), default="poisson",
                   help="poisson: each example joins each step with probability "
                        "batch/n; shuffle: fixed-size batches of a shuffle (poisson)")
    p.add_argument("--num-microbatches", type=_number(int, 1, False, "an integer >= 1"),
                   default=None, help="microbatches per batch, a divisor of --batch-size "
                                      "(default: one per example, as the tutorial's 250 of "
                                      "250); with poisson only --batch-size")
    p.add_argument("--learning-rate", type=positive, default=0.25, help="SGD step size (0.25)")
    p.add_argument("--batch-size", type=_number(int, 1, False, "an integer >= 1"), default=250,
                   help="examples per step (250)")
    p.add_argument("--epochs", type=_number(int, 1, False, "an integer >= 1"), default=3,
                   help="passes over the training set (3)")
    p.add_argument("--delta", type=_delta, default=1e-5, help="delta for epsilon (1e-5)")
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                   help="dp-accounting accountant (rdp)")
    p.add_argument("--seed", type=_number(int, 0, False, "an integer >= 0"), default=0,
                   help="seed of the model, the data split, the shuffles and the noise (0)")
    p.add_argument("--mnist", metavar="PATH", default=None,
                   help="local Keras mnist.npz: train the tutorial CNN on MNIST")
    p.add_argument("--model", choices=("logreg", "mlp", "cnn"), default="mlp",
                   help="fedsim model for the bundled digits (mlp); ignored with --mnist")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    micro = args.num_microbatches
    if micro is not None and args.batch_sampling == "poisson" and micro != args.batch_size:
        p.error(f"argument --num-microbatches: {micro}: allowed is --batch-size="
                f"{args.batch_size} (one example per microbatch) with --batch-sampling "
                "poisson, or a divisor of --batch-size with --batch-sampling shuffle")
    if micro is not None and (micro > args.batch_size or args.batch_size % micro):
        p.error(f"argument --num-microbatches: {micro}: allowed is a divisor "
                f"of --batch-size={args.batch_size}")
    if micro == args.batch_size:
        micro = None  # one example per microbatch
    if args.mnist is not None and not Path(args.mnist).expanduser().is_file():
        p.error(f"argument --mnist: {args.mnist}: allowed is a local Keras mnist.npz file "
                "(not found; nothing is downloaded)")

    from fedsim.client.dp_sgd import load_central, train_central, tutorial_cnn
    from fedsim.config import ClientConfig, ModelConfig
    from fedsim.errors import FedsimError

    try:
        data = load_central(args.mnist, args.seed)
        cfg = ClientConfig(optimizer="dp_sgd", learning_rate=args.learning_rate,
                           l2_norm_clip=args.l2_norm_clip,
                           noise_multiplier=args.noise_multiplier,
                           num_microbatches=micro, batch_sampling=args.batch_sampling,
                           delta=args.delta)
        model = tutorial_cnn if args.mnist else None  # built by train_central, seeded
        result = train_central(
            data, cfg, args.batch_size, args.epochs, model=model,
            model_cfg=ModelConfig(name=args.model), accountant=args.accountant, seed=args.seed,
            on_epoch=lambda e, acc: print(f"epoch {e}/{args.epochs}: test accuracy {acc:.4f}",
                                          file=sys.stderr, flush=True))
    except FedsimError as err:
        message = str(err).replace("data.path:", "--mnist:", 1)  # fedsim's loader names its option
        print(f"dp_sgd.py: error: {message}", file=sys.stderr)
        return 2
    model_name = "tutorial_cnn" if args.mnist else args.model
    print(f"dp_sgd: {data.name} ({result.num_train} train / {result.num_test} test), "
          f"{model_name}, {result.epochs} epochs ({result.steps} steps): test accuracy "
          f"{result.accuracy:.4f}, epsilon {result.epsilon:.3f} at delta {result.delta:g} "
          f"({result.accountant}; {result.assumption}), {result.seconds:.1f} s")
    if args.json:
        out = {**vars(args), "dataset": data.name, "model": model_name,
               "accuracy": result.accuracy, "epsilon": result.epsilon,
               "history": result.history, "num_train": result.num_train,
               "num_test": result.num_test, "steps": result.steps,
               "assumption": result.assumption,
               "seconds": result.seconds}
        if math.isinf(out["epsilon"]):
            out["epsilon"] = "inf"
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
