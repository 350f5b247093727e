"""``python -m seqpe_kernels ...`` is the ``seqpe-kernels`` console command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
