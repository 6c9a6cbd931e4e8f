"""``python -m stable_diffusion.cli``: the ``sd`` command (torchrun uses this form)."""

import sys

from . import main

sys.exit(main())
