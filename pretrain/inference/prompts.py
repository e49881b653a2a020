"""Prompts from code the model never trained on: the held-out split of the standard-library corpus.

The split is the one `mtp prepare --source stdlib` holds out with its
default settings (the same hash of each stdlib file's name with the default
seed and validation fraction), recomputed here so that a benchmark or a demo
needs only the model file, not the prepared data.
"""

import ast

import numpy as np

from pretrain.errors import UserError

MIN_BODY_LINES = 3  # functions with shorter bodies make dull demos


def heldout_documents() -> list[str]:
    """Texts of the held-out stdlib documents, in file order."""
    from data_pipeline.assign import Assigner
    from data_pipeline.prepare import PrepareConfig
    from data_pipeline.sources import STDLIB, iter_files, read_whole

    defaults = PrepareConfig(out="")
    assigner = Assigner(defaults.seed, defaults.val_fraction)
    files = (f for f in iter_files([STDLIB], None) if assigner.split_of(f.identity) == "val")
    return [text for text, _ in filter(None, (read_whole(f.path) for f in files))]


def benchmark_prompts(tokenizer, count: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """`count` windows of `prompt_tokens` tokens, cycling over the held-out documents long enough to hold one.

    Window i starts at a position drawn by a generator seeded with (seed, i),
    so the prompts are the same on every run and machine with the same stdlib.
    """
    encoded = [tokenizer.encode(text) for text in heldout_documents()]
    long_enough = [ids for ids in encoded if len(ids) >= prompt_tokens]
    if not long_enough:
        raise UserError(f"no held-out stdlib file has {prompt_tokens} tokens; lower --prompt-tokens")
    prompts = []
    for i in range(count):
        ids = long_enough[i % len(long_enough)]
        start = int(np.random.default_rng([seed, i]).integers(0, len(ids) - prompt_tokens + 1))
        prompts.append(ids[start : start + prompt_tokens])
    return prompts


def heldout_functions() -> list[tuple[str, str]]:
    """(text up to and including the signature and docstring, the body) of every held-out function."""
    found = []
    for text in heldout_documents():
        try:
            tree = ast.parse(text)
        except SyntaxError:  # the stdlib ships a few deliberately broken test files
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                split = _body_start(node, lines)
                if split is not None and node.end_lineno - split >= MIN_BODY_LINES:
                    found.append(("".join(lines[:split]), "".join(lines[split : node.end_lineno])))
    return found


def _body_start(node, lines: list[str]) -> int | None:
    """0-based line where the body proper starts (after the signature and any docstring; comments
    before the first statement belong to the body), None for one-line functions."""
    body = node.body
    if isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
        if len(body) == 1:
            return None
        return body[0].end_lineno  # the line after the docstring
    if body[0].lineno <= node.lineno:
        return None
    colon = max((i for i in range(node.lineno - 1, body[0].lineno - 1) if lines[i].split("#")[0].rstrip().endswith(":")),
                default=body[0].lineno - 2)
    return colon + 1


def heldout_function_prompt(index: int, tokenizer, max_tokens: int) -> str:
    """The text before held-out function `index`'s body, cut to its last `max_tokens` tokens."""
    functions = heldout_functions()
    if not 0 <= index < len(functions):
        raise UserError(f"--heldout-function {index}: choose 0..{len(functions) - 1}")
    ids = tokenizer.encode(functions[index][0])
    return tokenizer.decode(ids[-max_tokens:])
