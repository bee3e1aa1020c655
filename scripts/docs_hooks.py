"""mkdocs hook (mkdocs.yml `hooks:`): the settings page's tables, written at build time from
the settings' one declaration (controlplane.settingsdoc), so the docs cannot drift from the code.

A page asks for them with a line `<!-- settings: controlplane -->` or `<!-- settings: agent -->`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane import settingsdoc

MARKER = re.compile(r"^<!-- settings: (controlplane|agent) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda match: settingsdoc.markdown(match.group(1)), markdown)
