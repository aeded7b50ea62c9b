"""``python -m continual``: the command-line interface (see ``continual.cli``)."""

import sys

from .cli import main

sys.exit(main())
