import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsr1 import __version__, clidoc, settings
from dsr1.cli import COMMANDS
from dsr1.errors import EXIT_CODES, UsageError

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "accelerate", "bitsandbytes")


def dsr1(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsr1", *args], capture_output=True, text=True, env=e, timeout=120)


def test_help_lists_every_command_in_the_table():
    res = dsr1("--help")
    assert res.returncode == 0
    for name in COMMANDS:
        assert name in res.stdout


def test_version():
    res = dsr1("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"dsr1 {__version__}"


def test_bad_flag_is_usage_error_exit_2():
    res = dsr1("doctor", "--no-such-flag")
    assert res.returncode == 2 and "No such option" in res.stderr


def test_unknown_profile_exit_4_with_fix():
    res = dsr1("doctor", "--profile", "platinum")
    assert res.returncode == 4
    assert "unknown profile 'platinum'" in res.stderr and "fix:" in res.stderr and "DSR1_DEBUG=1" in res.stderr
    assert "Traceback" not in res.stderr


def test_debug_shows_traceback_without_locals(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('name = "p"\nsecret_token = "hf_abcdef"\n')
    res = dsr1("doctor", "--profile", str(bad), env={"DSR1_DEBUG": "1"})
    assert res.returncode == 3  # ConfigError
    assert "Traceback" in res.stderr and "secret_token" in res.stderr  # the message names the bad key
    assert "hf_abcdef" not in res.stderr  # ...but values held in locals never print


def test_exit_codes_documented_and_in_docs():
    codes = [c for c, _ in EXIT_CODES]
    assert len(codes) == len(set(codes))
    doc = (REPO / "docs/cli.md").read_text()
    for code, meaning in EXIT_CODES:
        assert f"| {code} | {meaning} |" in doc


def test_docs_cli_md_is_generated_from_help():
    assert (REPO / "docs/cli.md").read_text() == clidoc.render(), "run: python -m dsr1.clidoc > docs/cli.md"


@pytest.mark.parametrize("argv", [["--help"], ["doctor", "--json"], ["models", "--json"]])
def test_light_commands_import_no_torch(argv):
    code = (
        "import sys\n"
        "from dsr1.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', bad, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "HEAVY []" in res.stderr, res.stderr[-2000:]


def test_precedence_flag_env_profile_default():
    env = {"DSR1_MAX_CONCURRENT": "12"}
    assert settings.resolve("max_concurrent", flag=4, profile=16, default=8, environ=env) == settings.Resolved("max_concurrent", 4, "flag")
    assert settings.resolve("max_concurrent", profile=16, default=8, environ=env) == settings.Resolved("max_concurrent", 12, "env")
    assert settings.resolve("max_concurrent", profile=16, default=8, environ={}).source == "profile"
    assert settings.resolve("max_concurrent", default=8, environ={}).value == 8
    with pytest.raises(UsageError, match="DSR1_MAX_CONCURRENT"):
        settings.resolve("max_concurrent", profile=16, environ={"DSR1_MAX_CONCURRENT": "many"})


def test_home_and_hf_variables_respected(tmp_path):
    assert settings.home({"DSR1_HOME": str(tmp_path)}) == tmp_path
    assert settings.home({"XDG_CACHE_HOME": "/x"}) == Path("/x/dsr1")
    assert settings.hf_hub_cache({"HF_HOME": "/h"}) == Path("/h/hub")
    assert settings.hf_endpoint({"HF_ENDPOINT": "https://mirror.example/"}) == "https://mirror.example"
    assert settings.hf_token({"HF_TOKEN": " hf_x \n"}) == "hf_x"


def test_running_a_command_imports_only_its_module():
    code = ("import sys\nfrom dsr1.cli import main\ntry:\n    main(['doctor', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('OTHERS', sorted(m for m in sys.modules if m.startswith('dsr1.commands.') and m not in "
            "('dsr1.commands.doctor', 'dsr1.commands.options')), file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert "OTHERS []" in res.stderr, res.stderr[-2000:]
