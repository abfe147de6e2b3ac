"""``python -m specalign.decode ...`` (e.g. under ``accelerate launch``): the same as ``specalign decode``."""

import sys

from ..cli import main

sys.exit(main(["decode", *sys.argv[1:]]))
