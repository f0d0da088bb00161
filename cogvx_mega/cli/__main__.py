"""`python -m cogvx_mega.cli` (how torchrun starts the command on every rank)."""
import sys

from cogvx_mega.cli.main import main

sys.exit(main())
