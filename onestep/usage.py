"""The `--help` of train/distill.py, written from the code it describes: every Config key and method option with its
default and the comment beside its declaration (one source for both)."""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize

WIDTH = 118


def _declared(klass) -> list[tuple[str, str, str]]:
    """(section, field, comment) for each field in the class's own source, in order: the comment beside the field and
    on the indented comment-only lines under it; the section is the last `# ---- title ----` rule above it. Empty
    without installed source."""
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):
        return []
    comments = {tok.start[0]: tok.string.lstrip("#").strip() for tok in
                tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names, out, section, open_ = {f.name for f in dataclasses.fields(klass)}, [], "keys", False
    for n, line in enumerate(source.splitlines(), 1):
        body = line.strip()
        if body.startswith("# ----"):
            section = body.strip("# -")
        elif body.split(":")[0].strip() in names and len(line) - len(body) == 4:  # a field's own line
            out.append([section, body.split(":")[0].strip(), comments.get(n, "")])
            open_ = True
            continue
        elif open_ and body.startswith("#") and len(line) - len(body) > 8:  # its comment, continued
            out[-1][2] = f"{out[-1][2]} {comments[n]}".strip()
            continue
        open_ = False  # anything else ends a field's comment
    return [tuple(d) for d in out]


def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass, by field name; inherited fields carry their base class's comment
    (a redeclared default without one keeps it)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update({name: comment or out.get(name, "") for _, name, comment in _declared(klass)})
    return out


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _show(v) -> str:
    if isinstance(v, list):  # as a YAML file takes it too (quote it in a shell if it holds spaces)
        return f"[{', '.join(map(str, v))}]" if v else "'[]'"
    return '""' if v == "" else str(v)


def _entry(name: str, value: str, comment: str, indent: int = 2) -> list[str]:
    head = " " * indent + f"--{name} {value}"
    return textwrap.wrap(f"{head}  {comment}" if comment else head, WIDTH, subsequent_indent=" " * (indent + 6),
                         break_on_hyphens=False)


def _sections(cls, names: list[str]) -> list[tuple[str, list[str]]]:
    """The fields under each `# ---- title ----` rule of the class's source, in order (one section without it)."""
    out: dict[str, list[str]] = {}
    for section, name, _ in _declared(cls):
        if name in names:
            out.setdefault(section, []).append(name)
    return list(out.items()) or [("keys", names)]


def _para(text: str) -> list[str]:
    return ["", *textwrap.wrap(text, WIDTH, break_on_hyphens=False)]


def distill_help(doc: str) -> str:
    """train/distill.py's --help: its docstring, the syntax, every Config key, the presets and every method option."""
    from .config import PRESETS, Config
    from .methods import METHODS, method_options

    notes = field_comments(Config)
    digits = PRESETS["digits"]
    lines = [doc.strip()]
    lines += _para("Syntax: --key value or --key=value; booleans --key (true) or --key false; lists a,b,c (or a YAML "
                   "list '[\"a, b\", 3]'; '[]' for none); --config FILE.yaml sets keys from a file (a run's config.yaml "
                   "works); --preset NAME starts from a preset; later wins: Config defaults, preset, --config file, "
                   "command line. An option this run would not use (e.g. a GAN option with the GAN off) is refused, "
                   "so nothing given is silently ignored.")
    lines += _para("Config keys: --key DEFAULT  what it is. DEFAULT is the Config default; [digits: V] is the digits "
                   "preset's value, which the default run uses (every other preset sets its own values over the Config "
                   "defaults, not over these).")
    fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "method_args"}
    for title, names in _sections(Config, list(fields)):
        lines.append(f" {title}:")
        for name in names:
            value = _show(_default(fields[name])) + (f" [digits: {_show(digits[name])}]" if name in digits else "")
            lines += _entry(name, value, notes.get(name, ""))
    lines += _para(f"Presets (--preset NAME): {', '.join(PRESETS)}; the README lists what each sets.")
    lines += _para("Methods (--method NAME) and their options, given as --key value like the Config keys (or under "
                   "method_args: in a --config file). A preset's method options apply to its own method only.")
    for m, cls in METHODS.items():
        opts = {k: f for k, f in method_options(m).items() if k not in getattr(cls, "refused_options", set)()}
        base = next((n for n, c in METHODS.items() if c is not cls and c in cls.__mro__[1:2]), None)
        inherited = set(method_options(base)) if base else set()
        preset_args = digits.get("method_args", {}) if m == Config.method else {}
        shown = {k: f for k, f in opts.items()
                 if k not in inherited or k in preset_args or _default(f) != _default(method_options(base)[k])}
        doc_line = (inspect.getdoc(cls) or "").splitlines()[0]
        head = f" {m}: {doc_line}"
        if getattr(cls, "preferred_config", None):
            head += " Sets " + ", ".join(f"{k} {v}" for k, v in cls.preferred_config.items()) + \
                    " unless a preset, file or the command line sets it."
        if base:
            refused = sorted(inherited - set(opts))
            head += f" Takes {base}'s options" + (f" except {', '.join(refused)}" if refused else "") + \
                "; its own, changed defaults" + (" and the digits preset's values:" if preset_args else ":")
        lines += textwrap.wrap(head, WIDTH, subsequent_indent="   ")
        comments, required = field_comments(cls), getattr(cls, "required_options", ())
        for k, f in shown.items():
            value = "(required)" if k in required else _show(_default(f))
            if k in preset_args:
                value += f" [digits: {_show(preset_args[k])}]"
            lines += _entry(k, value, comments.get(k, ""), indent=3)
    return "\n".join(lines)


def print_help(text: str) -> None:
    """Print a help text and exit 0, also when its reader stops early (`| head`)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    sys.exit(0)
