"""Text and chat data: sources, tokenisation and packing, mixtures, the teacher top-k cache."""

from .sources import DataSource
from .text import TextDataModule

__all__ = ["DataSource", "TextDataModule"]
