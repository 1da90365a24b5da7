"""`chat --seed` and `serve --port` values the tools cannot use: one `error:` line naming the flag, exit 1,
before the model is loaded (OUT here does not exist: an error about OUT would mean the check came too late)."""

from __future__ import annotations

import pytest
from support.hostile import run_cli

TOO_BIG = 2**70


@pytest.mark.parametrize(
    "args, words",
    [
        (["chat", "OUT", "--seed", str(TOO_BIG)], f"--seed {TOO_BIG}: a sampling seed is a whole number from"),
        (["chat", "OUT", "--seed", str(-(2**63) - 1)], f"--seed {-(2**63) - 1}: a sampling seed"),
        (["serve", "OUT", "--port", "99999"], "--port 99999: a TCP port is a number from 1 to 65535"),
        (["serve", "OUT", "--port", "-1"], "--port -1: a TCP port is a number from 1 to 65535"),
        (["serve", "OUT", "--port", "0"], "--port 0: a TCP port is a number from 1 to 65535"),
    ],
)
def test_out_of_range_seed_or_port_is_one_line_before_loading(tmp_path, args, words):
    result = run_cli(*[str(tmp_path / "missing") if a == "OUT" else a for a in args], "--device", "cpu")
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "missing" not in lines[0]
