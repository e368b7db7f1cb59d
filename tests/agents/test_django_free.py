"""The agent never imports Django or the registry (it runs on hosts without them)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.servers import ROOT


def test_the_agent_entry_modules_import_neither_django_nor_the_registry():
    code = (
        "import sys, json\n"
        "import agents.cli, agents.agent, agents.http_api, agents.sidecars, agents.checks\n"
        "import meshproto.registration.decode, meshproto.registration.rules\n"
        "import meshproto.registration.shapes, meshproto.durations, meshproto.servicedefs\n"
        "import meshweb.cli\n"
        "meshweb.cli.build_parser()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'registry'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == []
