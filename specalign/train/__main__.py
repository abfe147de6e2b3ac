"""``python -m specalign.train STEP --config recipe.yaml`` — the entry point ``accelerate launch -m`` uses."""

import sys

from ..errors import SpecError
from .cli import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
