"""``python -m wdanalysis …`` (and ``torchrun … -m wdanalysis …``): the ``wdanalysis`` command."""

import sys

from wdanalysis.cli import main

if __name__ == "__main__":
    sys.exit(main())
