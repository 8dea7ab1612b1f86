"""``python -m ebbtide_operator``."""

import sys

from ebbtide_operator import _main

sys.exit(_main.main())
