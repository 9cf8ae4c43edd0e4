"""Where the source checkout lives: csrc/, build/, tokenizers/ are found from here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
