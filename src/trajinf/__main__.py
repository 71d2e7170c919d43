"""``python -m trajinf`` (and ``torchrun -m trajinf``) runs the command line."""

from trajinf.cli.main import main

if __name__ == "__main__":
    main()
