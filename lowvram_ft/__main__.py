"""`python -m lowvram_ft` entry point."""
import sys

from .cli import main

sys.exit(main())
