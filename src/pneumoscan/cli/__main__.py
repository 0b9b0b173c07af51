"""``python -m pneumoscan.cli``: the pneumoscan command."""

import sys

from pneumoscan.cli.main import main

sys.exit(main())
