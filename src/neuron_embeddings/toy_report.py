"""The toy validation's one-page HTML report (toy_report_assets/toy_report.html.j2): the chosen clustering, the
recovery table, the plots. Apart from toy.py, so that editing the page reruns the report and not the training."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from .pages import render
from .storage import atomic_path


def write_toy_report(choice_path: str | os.PathLike, png_path: str | os.PathLike, out_path: str | os.PathLike,
                     settings: dict[str, Any]) -> dict[str, Any]:
    """`choice_path` and `png_path`: toy.summarize_toys' JSON and plot; `settings`: the toy config shown."""
    page = render(
        __file__,
        "toy_report.html.j2",
        data=json.loads(Path(choice_path).read_text()),
        png=base64.b64encode(Path(png_path).read_bytes()).decode(),
        model=json.dumps(settings.get("model", {})),
        probe=json.dumps(settings.get("probe", {})),
        input_dims=settings.get("input_dims"),
        sparsities=settings.get("sparsities"),
        seeds=settings.get("seeds"),
    )
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return {"bytes": len(page)}
