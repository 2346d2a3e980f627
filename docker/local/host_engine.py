"""The Docker engine for the compose test: the one already running, or a private dockerd started here.

A private engine changes as little of the host as dockerd allows, and :class:`HostState` puts back
what it changes anyway:

- its files (images, containers, volumes, build cache) live under one state folder, its socket too;
- ``--iptables=false --ip-forward=false --ip-masq=false``: no firewall rule, no sysctl; containers
  then have no outbound network, which the stack does not need at run time (builds use the host's
  network through ``build.network: host`` in docker-compose.local.yml);
- ``--bridge=none``: no ``docker0``; the stack runs on the bridge network Compose creates and removes.

When it stops, the state is checked against a snapshot taken before it started: mounts left under
the state folder are unmounted, network links it created are deleted, and the IP forwarding switch and
Docker's firewall chains are restored if anything changed them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("compose-test.engine")

DEFAULT_SOCKET = Path("/var/run/docker.sock")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
MOUNTINFO = Path("/proc/self/mountinfo")
# Packages that provide the commands the compose test runs (Debian and Ubuntu names).
ENGINE_PACKAGES = {"dockerd": "docker.io", "docker": "docker.io"}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class EngineUnavailable(Exception):
    """No Docker engine can be used or started on this host; the message says why."""


@dataclass(frozen=True)
class Engine:
    """A Docker engine to talk to: ``DOCKER_HOST`` for the CLI and Compose."""

    docker_host: str
    version: str
    started_here: bool

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DOCKER_HOST"] = self.docker_host
        return env


def engine_version(docker_host: str, timeout_s: float = 10.0) -> str | None:
    """The server version of the engine at ``docker_host``, or None when none answers there."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    env = dict(os.environ, DOCKER_HOST=docker_host)
    try:
        result = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


def find_running_engine() -> Engine | None:
    """The engine named by ``DOCKER_HOST``, else the one on the default socket, if it answers."""
    candidates = [os.environ["DOCKER_HOST"]] if os.environ.get("DOCKER_HOST") else []
    if DEFAULT_SOCKET.exists():
        candidates.append(f"unix://{DEFAULT_SOCKET}")
    for docker_host in candidates:
        version = engine_version(docker_host)
        if version:
            return Engine(docker_host=docker_host, version=version, started_here=False)
    return None


def missing(needs: Iterable[str]) -> list[str]:
    """The commands (names) or files (absolute paths) of ``needs`` that this host lacks."""
    return [n for n in needs if not (Path(n).exists() if n.startswith("/") else shutil.which(n))]


def install_packages(needs_to_packages: Mapping[str, str], what: str) -> None:
    """apt-get install the packages providing what is missing (commands or files); EngineUnavailable if that fails."""
    lacking = missing(needs_to_packages)
    if not lacking:
        return
    packages = sorted({needs_to_packages[n] for n in lacking})
    if os.geteuid() != 0:
        raise EngineUnavailable(
            f"{what} needs {', '.join(lacking)} (Debian packages {', '.join(packages)}); installing them needs root"
        )
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise EngineUnavailable(
            f"{what} needs {', '.join(lacking)}, and this host has no apt-get to install {', '.join(packages)} with"
        )
    log.info("installing %s (for %s)", " ".join(packages), what)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt_get, "install", "--yes", "--no-install-recommends", *packages]
    # A fresh machine may have no package lists yet: update once, then retry.
    for attempt in ([install], [[apt_get, "update"], install]):
        outputs = [subprocess.run(c, env=env, capture_output=True, text=True, check=False) for c in attempt]
        if all(o.returncode == 0 for o in outputs) and not missing(lacking):
            return
    tail = "\n".join((outputs[-1].stdout + outputs[-1].stderr).strip().splitlines()[-5:])
    raise EngineUnavailable(f"apt-get could not install {', '.join(packages)} for {what}:\n{tail}")


# --- host state ----------------------------------------------------------------------------------


def mount_points() -> list[str]:
    """Every mount point of this mount namespace (mountinfo field 5, octal escapes decoded)."""
    points = []
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first (the order to unmount them in)."""
    prefix = str(root.resolve())
    inside = [p for p in mount_points() if p == prefix or p.startswith(prefix + "/")]
    return sorted(set(inside), key=lambda p: p.count("/"), reverse=True)


def unmount_under(root: Path) -> list[str]:
    """Unmount (lazily) everything mounted at or below ``root``; returns what was unmounted."""
    done = []
    for point in mounts_under(root):
        result = subprocess.run(["umount", "--lazy", point], capture_output=True, text=True, check=False)
        if result.returncode == 0:
            done.append(point)
        else:
            log.warning("could not unmount %s: %s", point, result.stderr.strip())
    return done


def network_links() -> set[str]:
    """Names of the host's network links (empty when ``ip`` is missing)."""
    ip = shutil.which("ip")
    if ip is None:
        return set()
    result = subprocess.run([ip, "-o", "link", "show"], capture_output=True, text=True, check=False)
    return {m.group(1) for m in re.finditer(r"^\d+: ([^:@\s]+)", result.stdout, flags=re.M)}


def docker_firewall_rules() -> list[str] | None:
    """The lines of ``iptables-save`` that mention Docker, or None where iptables is not usable."""
    save = shutil.which("iptables-save")
    if save is None or os.geteuid() != 0:
        return None
    result = subprocess.run([save], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    return [line for line in result.stdout.splitlines() if "DOCKER" in line]


@dataclass
class HostState:
    """What a private dockerd could change on the host, captured before it starts."""

    links: set[str] = field(default_factory=set)
    ip_forward: str | None = None
    firewall: list[str] | None = None
    firewall_dump: str | None = None

    @classmethod
    def capture(cls) -> HostState:
        firewall = docker_firewall_rules()
        dump = None
        if firewall is not None:
            dump = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
        return cls(
            links=network_links(),
            ip_forward=IP_FORWARD.read_text().strip() if IP_FORWARD.exists() else None,
            firewall=firewall,
            firewall_dump=dump,
        )

    def restore(self, state_dir: Path, engine_links: set[str]) -> list[str]:
        """Undo what a stopped private dockerd left behind; returns one line per repair made.

        ``engine_links``: the links that engine's networks use (``br-<id>``); of the links that appeared
        since the snapshot, only those are deleted (another engine may have made the rest meanwhile).
        """
        repairs = [f"unmounted {p}" for p in unmount_under(state_dir)]
        for link in sorted((network_links() - self.links) & engine_links):
            subprocess.run(["ip", "link", "delete", link], capture_output=True, check=False)
            repairs.append(f"deleted network link {link}")
        if self.ip_forward is not None and IP_FORWARD.exists():
            now = IP_FORWARD.read_text().strip()
            if now != self.ip_forward:
                IP_FORWARD.write_text(self.ip_forward + "\n")
                repairs.append(f"net.ipv4.ip_forward {now} -> {self.ip_forward}")
        if self.firewall is not None and self.firewall_dump is not None:
            now_rules = docker_firewall_rules()
            if now_rules is not None and now_rules != self.firewall:
                subprocess.run(["iptables-restore"], input=self.firewall_dump, text=True, check=False)
                repairs.append("restored the firewall rules (Docker chains had changed)")
        return repairs


# --- a private dockerd ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivateEngineLayout:
    """Where a private dockerd keeps everything: one folder, reused by the next run."""

    state_dir: Path

    @property
    def data_root(self) -> Path:
        return self.state_dir / "docker"

    @property
    def exec_root(self) -> Path:
        return self.state_dir / "run"

    @property
    def socket(self) -> Path:
        return self.state_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "dockerd.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "dockerd.log"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def dockerd_command(self, dockerd: str) -> list[str]:
        return [
            dockerd,
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host={self.docker_host}",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--bridge=none",
        ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _stop_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM, wait, then SIGKILL, for a process that is not our child (init reaps it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    log.warning("dockerd (pid %d) did not stop within %.0f s; killing it", pid, timeout_s)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def processes_using(path: Path) -> list[int]:
    """Processes whose command line names ``path`` (a private containerd or shim left running)."""
    needle = str(path).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def run_process_group(command: list[str], timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group, and end the whole group if we are interrupted.

    subprocess.run kills only its direct child on an exception; a tool such as debootstrap leaves
    grandchildren (dpkg under chroot) that would keep writing into a tree being deleted.
    """
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except BaseException:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.pid, signal.SIGKILL)  # whatever of the group is still there
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (0 for one that is gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class PrivateEngine:
    """A dockerd started here, with its state under ``layout.state_dir``; :meth:`stop` restores the host."""

    def __init__(self, layout: PrivateEngineLayout) -> None:
        self.layout = layout
        self._process: subprocess.Popen | None = None
        self._host_state: HostState | None = None
        # CPU seconds of dockerd and what it reaped (containerd), added to our RUSAGE_CHILDREN when we reap it.
        self.reaped_cpu_s = 0.0

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Engine:
        if os.geteuid() != 0:
            raise EngineUnavailable("no Docker engine is running, and starting dockerd needs root")
        install_packages(ENGINE_PACKAGES, "a Docker engine")
        layout = self.layout
        stale = _read_pid(layout.pidfile)
        if stale is not None and stale in processes_using(layout.data_root):
            log.info("stopping a private dockerd left running by an earlier run (pid %d)", stale)
            _stop_pid(stale, STOP_TIMEOUT_S)
        for folder in (layout.data_root, layout.exec_root):
            folder.mkdir(parents=True, exist_ok=True)
        layout.socket.unlink(missing_ok=True)
        layout.pidfile.unlink(missing_ok=True)
        self._host_state = HostState.capture()
        command = layout.dockerd_command(shutil.which("dockerd") or "dockerd")
        log.info("starting %s", " ".join(command))
        with layout.log_file.open("ab") as log_file:
            # Its own session: a Ctrl-C meant for the test must not kill dockerd before the clean-up.
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineUnavailable(
                    f"dockerd exited with status {self._process.returncode} at start:\n{self.log_tail()}"
                )
            version = engine_version(layout.docker_host, timeout_s=5.0) if layout.socket.exists() else None
            if version:
                log.info("dockerd %s ready on %s", version, layout.docker_host)
                return Engine(docker_host=layout.docker_host, version=version, started_here=True)
            time.sleep(0.5)
        raise EngineUnavailable(f"dockerd did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> list[str]:
        """Stop dockerd (and anything of its still running), then restore the host; returns the repairs."""
        process = self._process
        engine_links = self._bridge_links()
        if process is not None and process.returncode is None:
            process.terminate()
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not self._reap(process) and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.returncode is None:
                log.warning("dockerd (pid %d) did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                while not self._reap(process):
                    time.sleep(0.1)
        for pid in processes_using(self.layout.exec_root):
            log.warning("stopping pid %d left running under %s", pid, self.layout.exec_root)
            _stop_pid(pid, 5.0)
        repairs = self._host_state.restore(self.layout.state_dir, engine_links) if self._host_state else []
        self.layout.socket.unlink(missing_ok=True)
        return repairs

    def _bridge_links(self) -> set[str]:
        """``br-<id>``, the host link of each bridge network of this engine (asked while it still runs)."""
        if self._process is None or self._process.returncode is not None or shutil.which("docker") is None:
            return set()
        try:
            result = subprocess.run(
                ["docker", "network", "ls", "--no-trunc", "--filter", "driver=bridge", "--format", "{{.ID}}"],
                env=dict(os.environ, DOCKER_HOST=self.layout.docker_host),
                capture_output=True,
                text=True,
                timeout=15,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return set()
        return {f"br-{network_id[:12]}" for network_id in result.stdout.split()}

    def _reap(self, process: subprocess.Popen) -> bool:
        """Reap dockerd if it has exited (our child: a signal-0 probe would still see the zombie),
        noting the CPU time its tree used."""
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == 0:
            return False
        process.returncode = os.waitstatus_to_exitcode(status)
        self.reaped_cpu_s = usage.ru_utime + usage.ru_stime
        return True

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.layout.log_file.read_text(errors="replace")
        except OSError:
            return "(no dockerd log)"
        return "\n".join(text.strip().splitlines()[-lines:])


def provide_engine(state_dir: Path, on_started: Callable[[PrivateEngine], None]) -> Engine:
    """The running engine if there is one, else a private dockerd (handed to ``on_started`` to stop later)."""
    running = find_running_engine()
    if running is not None:
        log.info("using the Docker engine %s on %s", running.version, running.docker_host)
        return running
    engine = PrivateEngine(PrivateEngineLayout(state_dir))
    on_started(engine)  # registered first: a dockerd that fails half-way is stopped too
    return engine.start()
