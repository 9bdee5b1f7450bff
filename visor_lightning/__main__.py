"""``python -m visor_lightning`` is the ``visor`` command."""

import sys

from .cli import main

sys.exit(main())
