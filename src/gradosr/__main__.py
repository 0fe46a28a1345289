"""``python -m gradosr`` runs the command line (also under torchrun)."""

import sys

from gradosr.cli import main

sys.exit(main())
