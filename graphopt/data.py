"""Stable import path of the texts in :mod:`graphopt.helpers.texts` (as the README uses it)."""

from .helpers.texts import CorpusError, file_texts, load_texts, stdlib_texts, text_batches

__all__ = ["CorpusError", "file_texts", "load_texts", "stdlib_texts", "text_batches"]
