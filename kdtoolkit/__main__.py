"""``python -m kdtoolkit`` is ``kdt``."""

import sys

from .cli import main

sys.exit(main())
