"""User-facing helpers apart from the core: model specs for the CLI, stdlib texts for calibration,
the HF model zoo, and the sentence-embedding quality measure. They sit on top of optimize().
"""
