"""digestd: a daily digest of trending research papers, by email."""

__version__ = "0.1.0"
