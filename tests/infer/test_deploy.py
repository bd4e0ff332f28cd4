"""Deployment as documented: the systemd unit of a private server (experiments/deploy/) runs as
written, and every `python -m infer serve|sample` and `python -m sharding.plan serve` line in the
README's bash blocks (the cloud VM commands among them) parses and passes the checks the command
makes before loading anything (a public address needs a key; a mesh must split the model).

The unit is run without systemd: its ExecStart, expanded the way systemd expands `${VAR}` from its
Environment= lines and EnvironmentFile, with the interpreter, working directory, run directory and
port replaced by the test's; the server is real, on a free loopback port.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.infer.server_helpers import save_tiny_run, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "experiments" / "deploy"
KEY = "deploy-test-key-0123456789abcdef"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: {section: {key: [values, in order]}} (keys may repeat; `\\` continues a line)."""
    text = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def parse_env_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile: KEY=VALUE lines, # comments."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def expand_exec(command: str, env: dict[str, str]) -> list[str]:
    """ExecStart's words with `${VAR}` replaced (one word) and a lone `$VAR` word split at whitespace."""
    words = []
    for word in shlex.split(command):
        if re.fullmatch(r"\$[A-Za-z_]\w*", word):
            words += env.get(word[1:], "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return words


@pytest.fixture(scope="module")
def unit():
    return parse_unit((DEPLOY / "jaxlm-serve.service").read_text())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A random 1-layer byte-level checkpoint with a 16-token context (two prefill buckets to compile)."""
    cfg = dict(vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=16)
    return save_tiny_run(tmp_path_factory.mktemp("deploy") / "tiny", cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_command(unit, overrides: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """ExecStart as argv and the environment systemd would give it (the example EnvironmentFile with
    `overrides`); the unit's interpreter becomes this one."""
    service = unit["Service"]
    env_file = parse_env_file((DEPLOY / "jaxlm-serve.env").read_text())
    assert service["EnvironmentFile"] == ["/etc/jaxlm/serve.env"] and set(env_file) >= {"JAXLM_API_KEY", "JAXLM_RUN"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
    for assignment in service.get("Environment", []):
        key, _, value = assignment.partition("=")
        env[key] = value
    env.update(env_file)
    env.update(overrides)
    argv = expand_exec(service["ExecStart"][0], env)
    assert argv[0] == "/opt/jaxlm/.venv/bin/python" and argv[1:4] == ["-m", "infer", "serve"]
    assert service["WorkingDirectory"] == ["/opt/jaxlm"]
    return [sys.executable, *argv[1:]], env


def test_unit_restarts_on_failure_and_stops_by_draining(unit):
    service = unit["Service"]
    assert service["Restart"] == ["on-failure"] and service["RestartPreventExitStatus"] == ["2"]
    assert service.get("KillSignal", ["SIGTERM"]) == ["SIGTERM"] and service["KillMode"] == ["mixed"]
    drain = float(re.search(r"--drain-timeout (\S+)", service["ExecStart"][0]).group(1))
    assert float(service["TimeoutStopSec"][0]) > drain + 5  # uvicorn's own 5 s after the drain
    assert "API_KEY" not in service["ExecStart"][0] and "--api-key" not in service["ExecStart"][0]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_reads_the_unit_without_a_complaint(tmp_path):
    """`systemd-analyze verify` (systemd's own parser) on the unit, its interpreter made this one:
    an unknown key or a value it cannot parse would be printed (and ignored by systemd at boot)."""
    import shutil

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    unit_file = tmp_path / "jaxlm-serve.service"
    unit_file.write_text((DEPLOY / "jaxlm-serve.service").read_text().replace("/opt/jaxlm/.venv/bin/python",
                                                                                  sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit_file)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and (r.stdout + r.stderr).strip() == "", r.stdout + r.stderr


def test_the_example_environment_file_refuses_to_serve_the_network_without_a_key(unit, small_run):
    """Installed as shipped (empty key, JAXLM_HOST=0.0.0.0) the server binds nothing and exits 2,
    which RestartPreventExitStatus keeps systemd from retrying."""
    argv, env = _service_command(unit, {"JAXLM_RUN": str(small_run), "JAXLM_PORT": str(_free_port())})
    assert env["JAXLM_HOST"] == "0.0.0.0" and env["JAXLM_API_KEY"] == ""
    r = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "Traceback" not in r.stderr


def test_unit_execstart_serves_with_the_key_and_sigterm_exits_0(unit, small_run):
    port = _free_port()
    argv, env = _service_command(unit, {"JAXLM_RUN": str(small_run), "JAXLM_HOST": "127.0.0.1",
                                        "JAXLM_PORT": str(port), "JAXLM_API_KEY": KEY})
    assert KEY not in argv  # the key reaches the server through its environment only
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc=proc)  # /health is public
        assert httpx.get(base + "/v1/models", timeout=30).status_code == 401
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(base + "/v1/models", headers=auth, timeout=30)
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["tiny"]
        r = httpx.post(base + "/v1/completions", headers=auth, timeout=120,
                       json={"model": "tiny", "prompt": "ab", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends (KillMode=mixed: the main process)
        assert proc.wait(timeout=float(unit["Service"]["TimeoutStopSec"][0])) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the cloud commands of the README ------------------------------------------------------------

def documented_commands(markdown: str) -> list[tuple[list[str], dict[str, str]]]:
    """(argv after `python -m`, environment) of every `python -m infer serve|sample` and
    `python -m sharding.plan serve` line in the bash blocks of `markdown`; `export NAME=...` lines
    and `NAME=... python` prefixes set the environment (a `$(...)` value stands for a secret)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        env: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\$\([^)]*\)", "secret-0123456789abcdef", line)
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not a shell line we check (an unbalanced quote in prose)
                continue
            for sep in ("&", "&&", "|", ";"):
                if sep in words:
                    words = words[:words.index(sep)]
            if words[:1] == ["export"]:
                env.update(w.split("=", 1) for w in words[1:] if "=" in w)
                continue
            line_env = dict(env)
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                line_env[key] = value
            if words[:3] in (["python", "-m", "infer"], ["python", "-m", "sharding.plan"]) and \
                    words[3:4] in (["serve"], ["sample"]) and not (words[2] == "sharding.plan" and words[3] != "serve"):
                found.append((words[2:], line_env))
    return found


def _check_command(argv: list[str], env: dict[str, str], capsys, monkeypatch) -> None:
    from infer.cli import build_parser
    from infer.server.cli import check_serve_args, parse_runs
    from infer.sharded import serving_layout
    from model.config import PRESETS, preset
    from sharding import plan

    if argv[0] == "sharding.plan":
        assert plan.main(argv[1:]) == 0, capsys.readouterr().err
        assert "per device" in capsys.readouterr().out
        return
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"python -m {' '.join(argv)} does not parse: {capsys.readouterr().err}") from None
    if args.command == "serve":
        monkeypatch.delenv("JAXLM_API_KEY", raising=False)
        if "JAXLM_API_KEY" in env:
            monkeypatch.setenv("JAXLM_API_KEY", env["JAXLM_API_KEY"])
        check_serve_args(args)  # numbers in range; a non-loopback --host has a key
        runs = parse_runs(args.run).values()
    else:
        runs = [args.run]
    if args.mesh:  # a run named after a preset: the mesh must split that model (8 simulated devices)
        for run in runs:
            for name in (n for n in PRESETS if n in Path(run).name):
                serving_layout(preset(name), args.mesh, args.rules, getattr(args, "slots", None))


def test_every_serve_and_plan_command_in_the_readme_parses(capsys, monkeypatch):
    commands = documented_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 5 and any(argv[0] == "sharding.plan" for argv, _ in commands)
    for argv, env in commands:
        _check_command(argv, env, capsys, monkeypatch)


def test_the_command_check_catches_what_would_fail(capsys, monkeypatch):
    """A public bind without a key, a mesh that cannot split the model and a bad flag all fail."""
    from infer.cli import UserError
    from sharding.rules import ShardingError

    cases = [("python -m infer serve --run runs/x --host 0.0.0.0", UserError),
             ("python -m infer serve --run runs/llama3-8b --mesh tensor=16 --slots 8", ShardingError),
             ("python -m infer serve --run runs/x --threads 8", AssertionError)]
    for line, error in cases:
        [(argv, env)] = documented_commands(f"```bash\n{line}\n```")
        with pytest.raises(error):
            _check_command(argv, env, capsys, monkeypatch)
    [(argv, env)] = documented_commands("```bash\nexport JAXLM_API_KEY=$(openssl rand -hex 32)\n"
                                        "python -m infer serve --run runs/x --host 0.0.0.0 \\\n  --port 8000 &\n```")
    assert argv[-2:] == ["--port", "8000"] and env["JAXLM_API_KEY"].startswith("secret")
    _check_command(argv, env, capsys, monkeypatch)
