"""MkDocs hook: the `GenerationConfig` fields table, generated at build time.

A page holding the line `<!-- config-fields -->` gets, in its place, one table row per
field of `dataclasses.fields(jaxdecode.GenerationConfig)`, in the class's order and
under its own group comments (`# Length.`, `# Strategy.`, ...): name, type, default,
and from the field's entry in the option table (`jaxdecode.fields.Spec`): whether
transformers has the field (`hf`), whether it takes one value per row (`varies="row"`),
whether a compiled program reads it (`static`), and what it does (`doc`). Everything
is read from the code, never copied; `option()` refuses a field without a `doc`.

`render()` is importable without MkDocs (the doc tests call it).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

MARKER = "<!-- config-fields -->"


def _groups(cls: type) -> dict[str, str]:
    """Field name -> the group comment above it in the class source (`# Length.`)."""
    lines, _ = inspect.getsourcelines(cls)
    group, groups, in_comment = "", {}, False
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            if not in_comment:  # the first line of a comment block names the group
                group = re.split(r"[(:]", text.lstrip("# "))[0].strip().rstrip(".")
            in_comment = True
            continue
        in_comment = False
        match = re.match(r"(\w+)\s*:", text)
        if match:
            groups[match.group(1)] = group
    return groups


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def render() -> str:
    """The Markdown table of every `GenerationConfig` field, with type aliases spelled
    out below it."""
    from jaxdecode import config as config_module
    from jaxdecode.config import GenerationConfig
    from jaxdecode.fields import spec

    fields = dataclasses.fields(GenerationConfig)
    groups = _groups(GenerationConfig)
    rows, aliases, last_group = [], {}, None
    header = "| field | type | default | transformers | per row | static | what it does |"
    rows += [header, "|---|---|---|---|---|---|---|"]
    for f in fields:
        entry = spec(f)
        group = groups.get(f.name, "")
        if group != last_group:
            rows.append(f"| **{group}** | | | | | | |")
            last_group = group
        type_text = str(f.type)
        for word in re.findall(r"[A-Z]\w+", type_text):
            value = getattr(config_module, word, None)
            if value is None or word in aliases or word == "Literal" or isinstance(value, type):
                continue
            text = re.sub(r"\btyping\.|\bcollections\.abc\.", "", str(value))
            aliases[word] = re.sub(r"\bjax(\.\w+)*\.Array\b", "jax.Array", text)
        rows.append(
            f"| `{f.name}` | `{type_text}` | {_cell(_default(f))} | "
            f"{'✓' if entry.hf else '–'} | {'✓' if entry.per_row else '–'} | "
            f"{'✓' if entry.static else '–'} | {_cell(entry.doc)} |"
        )
    legend = [f"- `{name}` = `{text}`" for name, text in sorted(aliases.items())]
    return "\n".join(rows) + "\n\nType names used above:\n\n" + "\n".join(legend) + "\n"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs hook: replace the marker with the generated table."""
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    return markdown
