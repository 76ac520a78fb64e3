"""``python -m kdtoolkit`` is ``kdt``."""

import sys

from kdtoolkit.cli.commands import main

sys.exit(main())
