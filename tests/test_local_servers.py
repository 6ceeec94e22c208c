"""How the demo and the tests start Label Studio: secrets stay out of argv, no telemetry."""

from __future__ import annotations

from pathlib import Path

from demo.local_servers import label_studio_command, label_studio_env


def test_the_login_and_token_go_through_the_environment_not_argv(tmp_path):
    env = label_studio_env({"PATH": "/usr/bin"}, tmp_path / "data", tmp_path / "docs",
                           username="u@localhost", password="-secret-pw", token="t0ken" * 8)
    argv = label_studio_command(Path("/bin/label-studio"), 8080, tmp_path / "data")
    assert not any("secret" in a or "t0ken" in a or "u@localhost" in a for a in argv)
    assert (env["LABEL_STUDIO_USERNAME"], env["LABEL_STUDIO_PASSWORD"],
            env["LABEL_STUDIO_USER_TOKEN"]) == ("u@localhost", "-secret-pw", "t0ken" * 8)
    assert env["COLLECT_ANALYTICS"] == "false" and env["PATH"] == "/usr/bin"
