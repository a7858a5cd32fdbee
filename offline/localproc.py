"""Local processes for demos, benchmarks and tests: a redis-server on a free loopback port and
``thinkahead serve`` as a real process, started and stopped cleanly."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

# Below Linux's ephemeral range (32768-60999): an outgoing connection (a Redis client, an HTTP
# probe) is never given one of these between the moment a port is chosen and the server's bind.
LISTEN_PORT_RANGE = range(20000, 32000)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# LD_PRELOAD as this process was started: creating a vLLM engine here adds torch's libgomp to
# os.environ for vLLM's own workers, and a service started afterwards must not inherit it
# (it would keep `thinkahead serve` from preloading libiomp5: service.engine.cpu_preload).
LAUNCH_LD_PRELOAD = os.environ.get("LD_PRELOAD")


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with LD_PRELOAD as it was at start, plus ``extra``."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if LAUNCH_LD_PRELOAD is not None:
        env["LD_PRELOAD"] = LAUNCH_LD_PRELOAD
    return {**env, **(extra or {})}


def free_ports(count: int, taken: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``count`` distinct free loopback ports for servers about to start. Distinct by
    construction: binding port 0 twice in a row may return the same port once the first
    socket is closed (CI saw a service's HTTP and gRPC ports collide that way)."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(count * 200):
        if len(chosen) == count:
            break
        port = rng.choice(LISTEN_PORT_RANGE)
        if port not in chosen and port not in taken and port_is_free(port):
            chosen.append(port)
    if len(chosen) < count:
        raise RuntimeError(f"no {count} free loopback ports in {LISTEN_PORT_RANGE}")
    return chosen


def free_port() -> int:
    return free_ports(1)[0]


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server not found: run scripts/setup.sh (installs Debian's redis-server) "
            "or `apt-get install redis-server`"
        )
    return binary


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]
    workdir: Path
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        fresh = start_redis(self.workdir, self.port, self.extra_args)
        self.process = fresh.process


def start_redis(
    workdir: Path, port: int | None = None, extra_args: tuple[str, ...] = ()
) -> RedisProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        *extra_args,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    client.close()
    return RedisProcess(port, proc, workdir, extra_args)


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        return stop_session(self.process, timeout)


def stop_session(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM (the process drains), SIGKILL after ``timeout``; then whatever is left of its
    session: vLLM's engine core is a child process that outlives a killed parent and spins on
    its socket. The process's exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return int(process.returncode)


def pinned_to(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` pinning a child process (and what it starts) to ``cpus``."""
    if cpus is None:
        return None
    chosen = set(cpus)
    return lambda: os.sched_setaffinity(0, chosen)


def cli_command(command: str, model_dir: Path, catalog_dir: Path, redis_url: str) -> list[str]:
    """``thinkahead <command>`` for a model, its catalog and a Redis, run by this interpreter."""
    return [
        sys.executable,
        "-m",
        "offline.cli",
        command,
        "--model",
        str(model_dir),
        "--catalog",
        str(catalog_dir),
        "--redis",
        redis_url,
    ]


def start_service(
    model_dir: Path,
    catalog_dir: Path,
    redis_url: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    timeout: float = 300,
    wait_for: str = "/livez",
    cpus: set[int] | None = None,
    append: bool = False,
) -> ServiceProcess:
    """``thinkahead serve`` as a real process; returns once ``wait_for`` answers 200.
    ``cpus``: pin it (and every process it starts) to these CPUs. Its output goes to
    ``log_path``, added at the end with ``append`` (a log shared with its caller)."""

    http_port, grpc_port = free_ports(2)
    args = [
        *cli_command("serve", model_dir, catalog_dir, redis_url),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *extra_args,
    ]
    full_env = launch_env(env)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # AsyncLLM runs its engine core apart
    log = log_path.open("ab" if append else "wb")
    proc = subprocess.Popen(
        args,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=pinned_to(cpus),
        start_new_session=True,  # its own process group: stop() reaps the engine core too
    )
    service = ServiceProcess(proc, http_port, grpc_port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{service.log()[-4000:]}")
        try:
            if httpx.get(f"{service.base_url}{wait_for}", timeout=1).status_code == 200:
                return service
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    service.stop()
    raise RuntimeError(f"service did not come up in {timeout}s:\n{service.log()[-4000:]}")
