"""Textual pipelines that round-trip: ``"fold_bn,prune(ratio=0.3),quantize(int4)"``.

Grammar: passes separated by top-level commas; each is ``name`` or ``name(args)``; args are
``key=value`` or positional values (bound to the pass's fields in order). Values are numbers,
``true``/``false``/``none``, bare words, quoted strings, ``[lists]`` or ``{maps: of, key: values}``. Values are type-checked
against the pass's dataclass fields. Named presets expand to their pipelines.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from collections.abc import Iterable, Iterator
from typing import Any

from .contract import Pass
from .options import MAX_DEPTH, coerce
from .registry import get_pass, get_preset, list_passes, list_presets, load_builtin_passes
from .text import PipelineError, format_pass, suggest


class Pipeline:
    """An ordered list of configured passes; ``str()`` gives the canonical, re-parseable text."""

    def __init__(self, passes: Iterable[Pass] = ()) -> None:
        self.passes: list[Pass] = list(passes)
        for p in self.passes:
            if not isinstance(p, Pass):
                raise PipelineError(f"pipeline items must be go.Pass instances, got {type(p).__name__}")

    def __iter__(self) -> Iterator[Pass]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, i: int | slice) -> Any:
        return Pipeline(self.passes[i]) if isinstance(i, slice) else self.passes[i]

    def __str__(self) -> str:
        return ",".join(format_pass(p) for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def as_pipeline(spec: str | Pass | Iterable[Pass | str] | Pipeline) -> Pipeline:
    """Accept a pipeline text, a Pipeline, a Pass, or a list of passes and pass texts."""
    if isinstance(spec, Pipeline):
        return spec
    if isinstance(spec, str):
        return parse_pipeline(spec)
    if isinstance(spec, Pass):
        return Pipeline([spec])
    if isinstance(spec, (bytes, dict)) or not isinstance(spec, Iterable):
        raise PipelineError(f"a pipeline is a text such as 'fold_bn,prune(ratio=0.3)', a go.Pass or a list of "
                            f"those; got {type(spec).__name__}")
    passes: list[Pass] = []
    for item in spec:
        if isinstance(item, str):
            passes.extend(parse_pipeline(item))
        elif isinstance(item, type) and issubclass(item, Pass):
            passes.append(item())
        elif isinstance(item, Pass):
            passes.append(item)
        else:
            raise PipelineError(f"pipeline items are pass texts or go.Pass instances; got {type(item).__name__}")
    return Pipeline(passes)


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text into configured passes; raises :class:`PipelineError` with a hint."""
    if not isinstance(text, str):
        raise PipelineError(f"parse_pipeline takes a text such as 'fold_bn,prune(ratio=0.3)'; got "
                            f"{type(text).__name__}")
    load_builtin_passes()  # built-in passes and presets register on import
    passes: list[Pass] = []
    for item in split_top(text, ","):
        item = item.strip()
        if not item:
            if text.strip():
                raise PipelineError(f"empty pass in pipeline {text!r} (stray comma?)")
            continue
        m = re.fullmatch(r"([A-Za-z_][\w]*)\s*(?:\((.*)\))?", item, re.S)
        if not m:
            raise PipelineError(f"cannot parse {item!r}: expected name or name(option=value, ...)")
        name, args = m.group(1), m.group(2)
        preset = get_preset(name)
        if preset is not None and args is None:
            passes.extend(parse_pipeline(preset))
            continue
        if preset is None:
            try:
                get_pass(name)
            except PipelineError:
                raise PipelineError(f"unknown pass {name!r}{suggest(name, _known_names())}") from None
        elif args is not None:
            raise PipelineError(f"preset {name!r} takes no options; write its passes out: {preset}")
        passes.append(build_pass(name, *_parse_args(name, args or "")))
    return Pipeline(passes)


def _known_names() -> list[str]:
    return list(list_passes()) + list(list_presets())


def build_pass(name: str, positional: list[Any], options: dict[str, Any]) -> Pass:
    """Instantiate pass ``name`` from parsed values, checking option names and types."""
    cls = get_pass(name)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    field_names = [f.name for f in fields]
    if len(positional) > len(fields):
        raise PipelineError(f"{name} takes at most {len(fields)} positional option(s), got {len(positional)}")
    values = dict(zip(field_names, positional))
    for key, value in options.items():
        if key not in field_names and key in cls.renamed:
            raise PipelineError(f"{name} has no option {key!r} any more: {cls.renamed[key]}")
        if key not in field_names:
            hint = suggest(key, field_names) if field_names else "; it takes no options"
            raise PipelineError(f"{name} has no option {key!r}{hint}")
        if key in values:
            raise PipelineError(f"{name}: option {key!r} given twice")
        values[key] = value
    hints = typing.get_type_hints(cls, include_extras=True)
    checked = {k: coerce(f"{name}({k}=...)", v, hints.get(k, Any)) for k, v in values.items()}
    return cls(**checked)  # the pass checks its declared ranges (Pass.__post_init__)


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets and quotes."""
    parts, depth, quote, buf = [], 0, "", []
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')', ']' or '}}' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    if quote or depth:
        raise PipelineError(f"unclosed quote or bracket in {text!r}")
    parts.append("".join(buf))
    return parts


def _partition_top(text: str, sep: str) -> tuple[str, str, str]:
    """``str.partition`` on the first ``sep`` outside brackets and quotes."""
    parts = split_top(text, sep)
    return (parts[0], sep, sep.join(parts[1:])) if len(parts) > 1 else (text, "", "")


def _parse_args(name: str, text: str) -> tuple[list[Any], dict[str, Any]]:
    positional, options = [], {}
    if not text.strip():
        return positional, options
    for arg in split_top(text, ","):
        key, eq, raw = arg.partition("=")
        if eq and re.fullmatch(r"\s*[A-Za-z_]\w*\s*", key):
            if key.strip() in options:
                raise PipelineError(f"{name}: option {key.strip()!r} given twice")
            options[key.strip()] = parse_value(raw.strip())
        else:
            if options:
                raise PipelineError(f"{name}: positional value {arg.strip()!r} after keyword options")
            positional.append(parse_value(arg.strip()))
    return positional, options


def parse_value(raw: str, depth: int = 0) -> Any:
    if not raw:
        raise PipelineError("empty option value")
    if depth > MAX_DEPTH:
        raise PipelineError(f"option value nested more than {MAX_DEPTH} levels deep")
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if raw[0] == "[":
        if raw[-1] != "]":
            raise PipelineError(f"unclosed list {raw!r}")
        return [parse_value(v.strip(), depth + 1) for v in split_top(raw[1:-1], ",") if v.strip()]
    if raw[0] == "{":
        if raw[-1] != "}":
            raise PipelineError(f"unclosed map {raw!r}")
        out: dict[str, Any] = {}
        for item in (v.strip() for v in split_top(raw[1:-1], ",")):
            if not item:
                continue
            key, colon, value = (s.strip() for s in _partition_top(item, ":"))
            if not colon or not key:
                raise PipelineError(f"map entry {item!r} is not key: value")
            key = parse_value(key, depth + 1)
            if not isinstance(key, str):
                raise PipelineError(f"map keys are names or quoted strings, got {key!r} in {raw!r}")
            if key in out:
                raise PipelineError(f"map key {key!r} given twice in {raw!r}")
            out[key] = parse_value(value, depth + 1)
        return out
    if raw[0] in "'\"":
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise PipelineError(f"bad quoted string {raw!r}") from None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        return float(raw)
    except ValueError:
        return raw  # a bare word: a string


