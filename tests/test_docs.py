"""The reference in docs/ stays true to the code: every setting is in the configuration page,
every metric in the metrics page, every error code edge answers with in the errors page, and
every page the README links to exists. (`make check` builds the site with `--strict`, so a
broken link between pages or a page left out of the navigation fails there.)"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from edge import errors
from edge.settings import SECTIONS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


@pytest.mark.parametrize(
    "setting", [f"{s}.{n}" for s, model in SECTIONS.items() for n in model.model_fields]
)
def test_every_setting_is_documented(setting: str) -> None:
    assert f"`{setting}`" in page("configuration.md"), f"{setting} is undocumented"


def test_every_metric_is_documented() -> None:
    source = (REPO / "edge" / "metrics" / "registry.py").read_text()
    names = set(re.findall(r'"(edge_[a-z_]+)"', source))
    text = page("metrics.md")
    missing = sorted(n for n in names if f"`{n}" not in text)
    assert names and missing == []


def test_every_error_code_is_documented() -> None:
    # EdgeError's and BadRequest's own codes are never sent: a 500 is documented by status,
    # and every BadRequest is raised with its specific code.
    generic = {errors.EdgeError, errors.BadRequest}
    codes = {
        cls.code
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.EdgeError) and cls.code and cls not in generic
    }
    source = "\n".join(p.read_text() for p in (REPO / "edge").rglob("*.py"))
    codes |= set(re.findall(r'code="([a-z_]+)"', source))
    text = page("errors.md")
    missing = sorted(code for code in codes if f"`{code}`" not in text)
    assert missing == []


def test_the_readmes_links_lead_somewhere() -> None:
    readme = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)\)", readme)
    assert targets
    assert [t for t in targets if not (REPO / t).exists()] == []
