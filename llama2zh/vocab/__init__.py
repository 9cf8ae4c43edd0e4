"""Tokenizer vocabularies: train, extend, export (tokenizer.bin) and stats."""
