"""One launcher: only stack/servers.py builds a gunicorn or TF Serving stand-in command line.

``make serve``, ``make demo``, the benchmarks and the tests start the PyTorch REST server (gunicorn) and the
stand-in (``python -m serving.tfs_standin``) through ``stack.servers``; a module that builds its own argv
also builds its own environment and readiness wait, which drift apart from the launcher's. The one
exception is the REST image's entry point, serving/torch_server/front.py, which starts gunicorn (and
nginx) inside the container. (The stand-in's ``__main__`` is the server itself: it builds no command line.)

The scan reads each module's syntax tree, so prose (docstrings, comments, help texts) that shows the
commands is not flagged; what is flagged is an argv being built:

- a list or tuple holding ``"-m"`` followed by ``"gunicorn"`` or ``"serving.tfs_standin"``;
- a list or tuple holding ``"gunicorn"`` followed by ``"-c"``, or a WSGI app spec (``"...:create_app()"``),
  which only gunicorn's command line takes;
- a shell string naming gunicorn or the stand-in given to subprocess, os.system or shlex.split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stack.config import REPO_ROOT

LAUNCHER = "stack/servers.py"
ENTRY_POINTS = ("serving/torch_server/front.py",)
SERVER_MODULES = ("gunicorn", "serving.tfs_standin")
# Folders that hold no project source: virtual environments, build output, caches, run data.
SKIPPED_FOLDERS = {"build", "dist", "node_modules", "__pycache__", "models", "runs", "reports", "logs"}
SHELL_CALLS = {"run", "Popen", "call", "check_call", "check_output", "system", "split", "getoutput"}


def _strings(node: ast.List | ast.Tuple) -> list[str | None]:
    """The literal string elements of an argv-like literal; None for anything else (sys.executable...)."""
    return [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in node.elts]


def _argv_problem(node: ast.List | ast.Tuple) -> str | None:
    items = _strings(node)
    for first, second in zip(items, items[1:]):
        if first == "-m" and second in SERVER_MODULES:
            return f"an argv running `-m {second}`"
        if first == "gunicorn" and second == "-c":
            return "an argv running gunicorn"
    if any(item and item.endswith(":create_app()") for item in items):
        return "an argv giving gunicorn the app (…:create_app())"
    return None


def _shell_text(node: ast.expr) -> str:
    """The literal text of a str or f-string argument (the formatted parts left out)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return ""


def launches_found(source: str) -> list[str]:
    """Where ``source`` builds a gunicorn or stand-in command line: ``line N: what`` per place."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple)) and (problem := _argv_problem(node)):
            found.append(f"line {node.lineno}: {problem}")
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            text = _shell_text(node.args[0])
            if name in SHELL_CALLS and any(f"{module} " in f"{text} " for module in SERVER_MODULES):
                found.append(f"line {node.lineno}: a shell command line for {name}()")
    return found


def project_modules() -> list[Path]:
    def skipped(path: Path) -> bool:
        parts = path.relative_to(REPO_ROOT).parts[:-1]
        return any(p.startswith(".") or p in SKIPPED_FOLDERS or p.endswith(".egg-info") for p in parts)

    return sorted(path for path in REPO_ROOT.rglob("*.py") if not skipped(path))


def test_no_module_but_the_launcher_builds_a_server_command_line() -> None:
    allowed = {REPO_ROOT / LAUNCHER, *(REPO_ROOT / p for p in ENTRY_POINTS)}
    modules = project_modules()
    assert REPO_ROOT / LAUNCHER in modules and REPO_ROOT / "tests" / "test_one_launcher.py" in modules
    offenders = {
        str(path.relative_to(REPO_ROOT)): found
        for path in modules
        if path not in allowed and (found := launches_found(path.read_text(encoding="utf-8")))
    }
    assert not offenders, (
        f"start gunicorn and the stand-in through {LAUNCHER} (running_server, rest_process, grpc_process), "
        f"not with a command line of your own: {offenders}"
    )


def test_the_launcher_and_entry_points_are_what_the_scan_finds() -> None:
    """The scan recognises the real launch code (so an empty result above means something)."""
    for path in (LAUNCHER, *ENTRY_POINTS):
        assert launches_found((REPO_ROOT / path).read_text(encoding="utf-8")), path


# The ways earlier versions of this repository's tests and benchmarks started the servers themselves.
OLD_WAYS = {
    "gunicorn via python -m": """
process = subprocess.Popen(
    [sys.executable, "-m", "gunicorn", "-c", str(CONF), "serving.torch_server.app:create_app()"],
    cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT)
""",
    "gunicorn's script": """
gunicorn = Path(sys.executable).with_name("gunicorn")
command = [str(gunicorn) if gunicorn.exists() else "gunicorn", "-c", str(REPO_ROOT / "serving/torch_server/gunicorn_conf.py"),
           "serving.torch_server.app:create_app()"]
""",
    "gunicorn's argv, one item a line": """
argv = [
    sys.executable,
    "-m",
    "gunicorn",
    "-c",
    str(REPO / "serving/torch_server/gunicorn_conf.py"),
    "serving.torch_server.app:create_app()",
]
""",
    "the stand-in": """
command = [
    sys.executable, "-m", "serving.tfs_standin", f"--port={port}", "--standin_host=127.0.0.1",
    f"--model_name={contract.MODEL_NAME}", f"--model_base_path={tf_model_copy}",
]
""",
    "the stand-in from a shell": """
subprocess.run(f"python -m serving.tfs_standin --port={port} --model_base_path={base}", shell=True)
""",
}


@pytest.mark.parametrize("name", sorted(OLD_WAYS))
def test_the_scan_flags_each_old_way_of_starting_a_server(name: str) -> None:
    assert launches_found(OLD_WAYS[name])


def test_the_scan_leaves_prose_and_other_uses_alone() -> None:
    source = '''
"""Run it as ``python -m serving.tfs_standin --port=8500`` or ``gunicorn -c gunicorn_conf.py app:create_app()``."""
USAGE = "usage: python -m serving.tfs_standin [--flag=value ...]"
settings = runpy.run_path(str(GUNICORN_CONF))
required = ["gunicorn"]
log = logging.getLogger("serving.tfs_standin.server")
subprocess.run([sys.executable, "-m", "serving.torch_server.proxy"])
'''
    assert launches_found(source) == []
