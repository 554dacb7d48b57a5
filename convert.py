"""python convert.py --hf-path SRC --mlx-path DST [-q] ...: the same as python -m mlxgemma.convert."""

import sys

from mlxgemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
