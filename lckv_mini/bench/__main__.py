"""`python -m lckv_mini.bench <name> ...`: see cli.py."""

from .cli import main

main()
