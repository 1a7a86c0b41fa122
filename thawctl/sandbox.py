"""Where one pipeline step runs in the cluster-fidelity runner: a fresh container of the
thaw image (podman or docker), or, for quick tests, this venv under bubblewrap with the
same filesystem isolation (only the step's own staging folders are visible and writable).

Both share the host network, so a step reaches the embedded S3 and MLflow servers on
loopback exactly as a pod reaches them through cluster DNS.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from thaw.errors import ThawError

# podman refuses rlimits above the machine's own: keep them at values every host allows.
PODMAN_RUN_ARGS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# Paths the KFP launcher mounts emptyDirs at (artifact staging) and where the executor
# writes its output metadata.
STAGING_MOUNTS = ("/s3", "/minio", "/gcs", "/tmp/kfp_outputs")
ENGINES = ("podman", "docker", "bwrap")


@dataclass
class StepProcess:
    """A started step: wait for it, or kill it as a node failure would (SIGKILL)."""

    popen: subprocess.Popen[bytes]
    kill_command: list[str] | None = None

    def kill(self) -> None:
        if self.kill_command:
            subprocess.run(self.kill_command, capture_output=True, check=False)
        else:
            os.killpg(self.popen.pid, signal.SIGKILL)

    def wait(self) -> int:
        return self.popen.wait()


@dataclass
class Sandbox:
    """How steps are started. ``engine``: podman, docker or bwrap."""

    engine: str

    @classmethod
    def detect(cls, engine: str | None = None) -> Sandbox:
        """The given engine, or the first container engine found (podman, then docker)."""
        engine = engine or os.environ.get("THAW_CONTAINER_ENGINE") or _first_engine()
        if engine not in ENGINES:
            raise ThawError(f"unknown engine {engine!r}; use one of {ENGINES}")
        if shutil.which(engine) is None:
            raise ThawError(f"{engine} is not installed (apt-get install {engine})")
        return cls(engine=engine)

    def start(self, *, name: str, image: str, command: list[str], env: dict[str, str],
              mounts: dict[str, Path], log: Path) -> StepProcess:
        """Start ``command`` with only ``mounts`` (container path -> host folder) writable."""
        with open(log, "ab") as out:
            if self.engine == "bwrap":
                argv, kill = self._bwrap(command, env, mounts), None
            else:
                argv = self._container(name, image, command, env, mounts)
                kill = [self.engine, "kill", "--signal", "KILL", name]
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=None if self.engine != "bwrap" else env)
        return StepProcess(popen, kill)

    def _container(self, name: str, image: str, command: list[str], env: dict[str, str],
                   mounts: dict[str, Path]) -> list[str]:
        argv = [self.engine, "run", "--rm", "--name", name, "--network", "host",
                "--pull", "never"]
        if self.engine == "podman":
            argv += PODMAN_RUN_ARGS
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        for inside, host in mounts.items():
            argv += ["--volume", f"{host}:{inside}:rw"]
        return argv + ["--entrypoint", command[0], image, *command[1:]]

    def _bwrap(self, command: list[str], env: dict[str, str],
               mounts: dict[str, Path]) -> list[str]:
        argv = ["bwrap", "--die-with-parent", "--unshare-pid", "--dev", "/dev",
                "--proc", "/proc", "--tmpfs", "/tmp"]
        for entry in sorted(Path("/").iterdir()):
            if entry.name in ("proc", "dev", "tmp") or entry.is_symlink():
                if entry.is_symlink():
                    argv += ["--symlink", os.readlink(entry), str(entry)]
                continue
            argv += ["--ro-bind", str(entry), str(entry)]
        for path in _python_roots():  # a venv or checkout under /tmp, hidden by the tmpfs
            if Path("/tmp") in path.parents:
                argv += ["--ro-bind", str(path), str(path)]
        for inside, host in mounts.items():
            argv += ["--bind", str(host), inside]
        return argv + ["--chdir", "/tmp", "--", *command]


def _first_engine() -> str:
    for engine in ("podman", "docker"):
        if shutil.which(engine) and subprocess.run(
                [engine, "info"], capture_output=True, check=False).returncode == 0:
            return engine
    raise ThawError("no container engine answers (podman or docker): install podman "
                    "(apt-get install podman runc) or use --engine bwrap")


def _python_roots() -> set[Path]:
    """Where this interpreter and the code it imports live (an editable install points at
    the checkout)."""
    import thaw

    return {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
            Path(thaw.__file__).resolve().parents[1]}


def venv_env() -> dict[str, str]:
    """Environment for a bwrap step: this interpreter's bin first on PATH, so the step's
    ``python3`` is the one with thaw installed, as it is in the image."""
    bin_dir = str(Path(sys.executable).parent)
    return {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
            "LANG": "C.UTF-8"}
