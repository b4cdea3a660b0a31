"""Train, validate, test or predict with pointsink: ``python train.py --help``."""

from pointsink.cli import main

if __name__ == "__main__":
    main()
