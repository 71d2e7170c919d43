"""``python -m trajinf`` (and ``torchrun -m trajinf``) runs the command line."""

from trajinf import cli_extract  # noqa: F401  (registers the `extract` verb)
from trajinf.cli import main

if __name__ == "__main__":
    main()
