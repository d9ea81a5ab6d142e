"""``python -m digestd``."""

from .cli import main

main()
