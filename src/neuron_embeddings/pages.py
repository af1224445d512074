"""What the package's HTML pages share: the Jinja2 environment they render through, a number filter, the base
template and its CSS, and the comparison macros (templates in pages_assets/).

Every page is a template rendered with autoescaping on, so any value a template prints is HTML-escaped unless it
is already markup: corpus text (tokens, contexts), config text and names are always escaped, and nothing here
marks them safe. Numbers and base64 data (PNG data URIs) contain no markup characters, so escaping leaves them as
they are. A page's own templates live in `<module>_assets/` beside the module that renders it (codehash.py counts
them as part of that module); shared ones are named `pages/<name>` there.

Light on purpose: it imports only Jinja2, so a stage that renders a page does not run the package's computing code
because of it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

ASSETS = Path(__file__).resolve().parent / "pages_assets"


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: floats to `digits` decimals, None and NaN as a dash, anything else as its text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


@lru_cache(maxsize=None)
def environment(module_file: str | Path) -> jinja2.Environment:
    """The environment of the module whose file is `module_file`: its own templates by name (from
    `<module>_assets/`), the shared ones as `pages/<name>`. Autoescaping on; an undefined name is an error."""
    path = Path(module_file).resolve()
    loader = jinja2.ChoiceLoader([
        jinja2.FileSystemLoader(path.parent / f"{path.stem}_assets"),
        jinja2.PrefixLoader({"pages": jinja2.FileSystemLoader(ASSETS)}),
    ])
    env = jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["fmt"] = fmt
    return env


def render(module_file: str | Path, template: str, **context: Any) -> str:
    """Render one of the module's templates (see environment)."""
    return environment(module_file).get_template(template).render(**context)
