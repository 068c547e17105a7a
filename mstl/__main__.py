"""`python -m mstl doctor [--profile cpu|paper] [--data_root DIR]`: is this machine ready to run?"""

import sys

COMMANDS = ("doctor",)

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.exit(f"usage: python -m mstl {{{','.join(COMMANDS)}}} [--help]")
# imported here, after the usage check: TensorFlow takes seconds to load (a TensorFlow-free path)
from mstl.stages.doctor import main  # noqa: E402

main(sys.argv[2:])
