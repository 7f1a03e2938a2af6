"""`python -m vidsynth ...`: the same as the `vidsynth` command."""
import sys

from .cli import main

sys.exit(main())
