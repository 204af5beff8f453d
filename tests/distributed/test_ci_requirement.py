"""Issue 6 §3: without a server the PostgreSQL tests skip, saying why; with AMCT_OPT_REQUIRE_POSTGRES=1
(as ``.ci/run`` sets) they fail instead.  Runs pytest on a one-test file against a closed port."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KIT = Path(__file__).parent
PROBE = '''
from distributed_kit import postgres_url  # noqa: F401 - the fixture


def test_needs_postgres(postgres_url):
    assert postgres_url
'''


def run_probe(tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "AMCT_OPT_REQUIRE_POSTGRES"}
    env.update(PYTHONPATH=os.pathsep.join([str(KIT), env.get("PYTHONPATH", "")]),
               AMCT_OPT_TEST_POSTGRES="postgresql+psycopg://postgres@127.0.0.1:1/test", **extra)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(("require", "outcome"), [(None, "1 skipped"), ("0", "1 skipped"), ("1", "1 error")])
def test_no_server_skips_with_a_reason_unless_required(tmp_path: Path, require: str | None, outcome: str) -> None:
    done = run_probe(tmp_path, **({} if require is None else {"AMCT_OPT_REQUIRE_POSTGRES": require}))
    assert outcome in done.stdout, done.stdout[-3000:]
    assert "PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:1/test is unreachable" in done.stdout
    if require == "1":
        assert done.returncode != 0 and "AMCT_OPT_REQUIRE_POSTGRES=1 says it must run here" in done.stdout
    else:
        assert done.returncode == 0 and "start it, or set AMCT_OPT_TEST_POSTGRES" in done.stdout
