"""The docs a newcomer reads stay true to the code."""

from __future__ import annotations

import re

from shared.config import Settings

from .conftest import REPO


def test_every_setting_is_documented_with_its_variable():
    text = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`((?:CANDLEKEEP_)?[A-Z_]+)`", text))
    for name in Settings.model_fields:
        variable = (
            name.upper()
            if name in ("database_url", "kafka_bootstrap_servers")
            else ("CANDLEKEEP_" + name.upper())
        )
        assert variable in documented, f"{variable} is missing from docs/configuration.md"


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in readme[:8] if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
