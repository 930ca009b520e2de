"""``--version`` of lazyd and lazyctl: lazyd's version, the llfuse build, and no heavy imports."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import llfuse
import pytest

from lazyd.cli.version import describe_llfuse

# Modules a --version or --help must not load: they cost start-up time.
HEAVY = ("lazyd.api.client", "lazyd.api.messages", "lazyd.containerd.client", "lazyd.registry", "lazyd.estargz",
         "lazyd.fetcher.daemon", "aiohttp", "grpc", "msgpack", "tqdm", "diskcache")


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("tool", ["lazyd", "lazyctl"])
def test_version_prints_lazyd_and_the_llfuse_build(tool: str) -> None:
    proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{tool} {importlib.metadata.version('lazyd')}",
                                        f"llfuse {describe_llfuse(llfuse.__version__)}"]
    assert llfuse.__version__ in proc.stdout


@pytest.mark.parametrize("tool", ["lazyd", "lazyctl"])
def test_version_without_llfuse(tool: str) -> None:
    """With llfuse unimportable (sys.modules entry None makes `import llfuse` raise ImportError)."""
    proc = _run(f"import sys; sys.modules['llfuse'] = None\n"
                f"from lazyd.cli.{tool} import main\nsys.exit(main(['--version']))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == "llfuse not installed"


def test_lazyctl_works_without_llfuse() -> None:
    proc = _run("import sys; sys.modules['llfuse'] = None\n"
                "from lazyd.cli.lazyctl import main\nsys.exit(main(['layer', 'inspect', '/nonexistent.esgz']))")
    assert proc.returncode == 1
    assert "layer inspect /nonexistent.esgz" in proc.stderr and "No such file" in proc.stderr


@pytest.mark.parametrize("tool", ["lazyd", "lazyctl"])
@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_stay_cheap(tool: str, flag: str) -> None:
    heavy = HEAVY if tool == "lazyctl" else tuple(m for m in HEAVY if m != "lazyd.registry")  # lazyd.config uses it
    proc = _run(f"import sys\nfrom lazyd.cli.{tool} import main\n"
                f"try:\n    main([{flag!r}])\nexcept SystemExit:\n    pass\n"
                f"print('LOADED', sorted(m for m in {heavy!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "LOADED []"


def test_describe_llfuse() -> None:
    assert describe_llfuse("1.5.2+lazyd.readino") == "1.5.2+lazyd.readino (lazyd's patched build: kernel no_open)"
    assert describe_llfuse("1.5.2") == "1.5.2 (stock build: every open reaches the worker)"
    assert describe_llfuse(None) == "not installed"
