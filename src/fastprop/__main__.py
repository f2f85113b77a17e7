"""``python -m fastprop``: the same command line as the ``fastprop`` script."""
import sys

from .cli import main

sys.exit(main())
