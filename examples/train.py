"""A stock LightningCLI script: nothing here knows about lightning_grng.

    python -m examples.train fit --config examples/configs/fashion_mnist.yaml \
        --optimizer grng.RING --optimizer.lr 0.05 --optimizer.rho 0.1

The optimizer class path resolves by import (``grng.RING``), and the curvature hooks come from
the ``GRNGCallback`` that the installed package registers as a Lightning entry point.
"""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
