"""`python -m demo.screenshot`: clear failures before any browser starts, no password in argv."""

from __future__ import annotations

import json
import sys

import pytest

from demo import screenshot


def test_without_selenium_it_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "selenium", None)  # `import selenium` raises ImportError
    code = screenshot.main(["--url", "http://ls", "--project", "1", "--task", "2",
                            "--out", str(tmp_path / "x.png")])
    assert code == 2 and "pip install -e '.[docs]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_login_comes_from_the_credentials_file(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"username": "demo@localhost", "password": "-pw", "token": "t"}))
    assert screenshot.read_login(path) == ("demo@localhost", "-pw")
    with pytest.raises(ValueError, match="run `make demo` first"):
        screenshot.read_login(tmp_path / "missing.json")
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a demo credentials file"):
        screenshot.read_login(path)


def test_there_is_no_password_option_and_no_default_output(capsys):
    with pytest.raises(SystemExit):
        screenshot.main(["--url", "http://ls", "--project", "1", "--task", "2",
                         "--password", "secret", "--out", "x.png"])
    with pytest.raises(SystemExit):
        screenshot.main(["--url", "http://ls", "--project", "1", "--task", "2"])
    assert "--out" in capsys.readouterr().err
