"""The one YAML reader of brainseg: every YAML file it reads goes through :func:`parse_yaml`.

Configs, split files, ``cv.yaml`` and ``--set`` values are data, never code: ``yaml.safe_load``
semantics, plus limits checked on the event stream *before* any object is built, so a hostile
file fails in milliseconds with one line instead of exhausting memory or the stack: the text
size, the nesting depth (PyYAML's composer recursed), and the values *after alias expansion*
(an alias counts as the whole value its anchor names, so a "billion laughs" file is refused:
anything that walks it, such as ``dataclasses.asdict``, expands it). The brainseg files are
far below these limits (a 110-patient 5-fold split has ~700 values).
"""

from __future__ import annotations

from typing import Any

from brainseg.errors import BrainsegError, first_line

MAX_YAML_BYTES = 8 * 1024 * 1024
MAX_YAML_DEPTH = 64
#: Most values (scalars, lists, mappings), aliases expanded.
MAX_YAML_NODES = 200_000


def _loader() -> tuple[Any, Any]:
    import yaml

    return yaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_yaml_limits(text: str, what: str, hint: str) -> None:
    """Raise BrainsegError when ``text`` exceeds a limit (see the module docstring)."""
    yaml, loader = _loader()
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise BrainsegError(
            f"{what} is too large ({size} bytes; the limit is {MAX_YAML_BYTES})", hint=hint
        )
    stack: list[list[Any]] = []  # [expanded size so far, anchor] per open collection
    anchors: dict[str, int] = {}
    total = 0

    def add(n: int, parent: int) -> None:
        nonlocal total
        total += n
        if stack:
            stack[-1][0] += parent
        if total > MAX_YAML_NODES:
            raise BrainsegError(
                f"{what} holds more than {MAX_YAML_NODES} values (aliases expanded)", hint=hint
            )

    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([0, event.anchor])
            if len(stack) > MAX_YAML_DEPTH:
                raise BrainsegError(
                    f"{what} is nested more than {MAX_YAML_DEPTH} levels deep", hint=hint
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            inner, anchor = stack.pop()
            if anchor is not None:
                anchors[anchor] = inner + 1
            add(1, inner + 1)  # the children were counted as they came
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                anchors[event.anchor] = 1
            add(1, 1)
        elif isinstance(event, yaml.AliasEvent):
            if any(event.anchor == a for _, a in stack):
                raise BrainsegError(
                    f"{what}: alias *{event.anchor} refers to a value that contains it "
                    "(a recursive structure)",
                    hint=hint,
                )
            n = anchors.get(event.anchor, 1)
            add(n, n)


def parse_yaml(text: str, what: str, hint: str) -> Any:
    """``yaml.safe_load(text)`` within the limits; else a BrainsegError naming ``what``."""
    yaml, loader = _loader()
    try:
        check_yaml_limits(text, what, hint)
        reader = loader(text)  # what yaml.safe_load does, with the C parser when there is one
        try:
            return reader.get_single_data()
        finally:
            reader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc)
        raise BrainsegError(f"{what} is not valid YAML{at}: {problem}", hint=hint) from exc
    except RecursionError as exc:  # not expected after the depth check; never a traceback
        raise BrainsegError(f"{what} is nested too deeply", hint=hint) from exc
