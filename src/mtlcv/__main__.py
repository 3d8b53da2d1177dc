"""``python -m mtlcv`` is the ``mtlcv`` command."""

import sys

from .cli import main

sys.exit(main())
