"""Corpus stages: the built-in sample, download, translate, pretokenize, and reading shards."""
