"""Evaluation of MTP models: per-head loss, draft acceptance of self-speculative decoding, HumanEval pass@k.

`mtp eval` (`cli.py`, `command.py`) runs the suites; generated code runs only
in the bubblewrap sandbox (`sandbox.py`). See docs/evaluation.md.
"""
