"""Reading and validating params.yaml, and the one-line error every stage prints for input a user can fix."""
from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = Path("params.yaml")
EDIT_HINT = "edit conf/ (or run `dvc exp run -S {key}=...`)"


class UserError(Exception):
    """A problem the user can fix (bad parameter, missing file, wrong folder): printed as one line, exit code 2."""


@dataclass(frozen=True)
class Rule:
    """What a parameter must be, in the words an error message uses, and the test for it."""

    what: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
STRING = Rule("a string", lambda v: isinstance(v, str))
NON_EMPTY_STRING = Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")
POSITIVE_INT = Rule("a positive integer", lambda v: _is_int(v) and v > 0)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Rule("a number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a number >= 0", lambda v: _is_number(v) and v >= 0)
FRACTION = Rule("a number between 0 and 1", lambda v: _is_number(v) and 0 <= v <= 1)
MULTIPLE_OF_8 = Rule("a positive integer divisible by 8", lambda v: _is_int(v) and v > 0 and v % 8 == 0)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(choices), lambda v: v in choices)


def non_empty_list_of(rule: Rule) -> Rule:
    return Rule(f"a non-empty list, each {rule.what}", lambda v: isinstance(v, list) and bool(v) and all(map(rule.ok, v)))


def validate(section: dict, schema: dict[str, Any], prefix: str) -> dict:
    """Check every key of a params section against its schema; nested dicts are schemas of sub-sections."""
    if not isinstance(section, dict):
        raise UserError(f"params.yaml: {prefix} must be a mapping; {EDIT_HINT.format(key=prefix)}")
    for key, check in schema.items():
        name = f"{prefix}.{key}"
        if key not in section:
            raise UserError(f"params.yaml: missing key {name}; add it ({EDIT_HINT.format(key=name)})")
        if isinstance(check, dict):
            validate(section[key], check, name)
        elif not check.ok(section[key]):
            raise UserError(
                f"params.yaml: {name} must be {check.what}, got {section[key]!r}; {EDIT_HINT.format(key=name)}"
            )
    return section


def compose_params(out: Path, root: Path, overrides: list[str]) -> None:
    """Write params.yaml as `dvc exp run -S <overrides>` composes it from root/conf (DVC's Hydra integration)."""
    from dvc.utils.hydra import compose_and_dump

    compose_and_dump(out, str(root / "conf"), None, "config", str(root), overrides)


def load_params(section: str, schema: dict[str, Any], path: Path = PARAMS_FILE) -> dict:
    """Load and validate one section of params.yaml."""
    if not path.is_file():
        raise UserError(f"{path} not found; run from the repository root")
    params = yaml.safe_load(path.read_text()) or {}
    if section not in params:
        raise UserError(f"params.yaml: missing section {section}; {EDIT_HINT.format(key=section)}")
    return validate(params[section], schema, section)


SHARED_SCHEMA = {"seed": NON_NEGATIVE_INT, "profile": NON_EMPTY_STRING}


def load_shared(path: Path = PARAMS_FILE) -> dict:
    """The section every stage reads: the seed and the name of the profile that composed params.yaml."""
    return load_params("shared", SHARED_SCHEMA, path)


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run a stage's main(): a UserError becomes one line on stderr and exit code 2 (SKETCH_DEBUG=1 shows the traceback)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for ours in ("__main__", "stages"):  # libraries' INFO chatter (open_clip logs to root) stays hidden
            logging.getLogger(ours).setLevel(logging.INFO)
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get("SKETCH_DEBUG"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def require_path(path: Path, what: str) -> Path:
    """Fail with one line when an input path that a stage needs does not exist."""
    if not path.exists():
        raise UserError(f"{path} does not exist: {what}")
    return path
