"""A Ray cluster for hierui's jobs (`hierui batch --ray`, `hierui kld --ray`): Ray imported lazily, the cluster
joined or started (`--ray auto`: the one on this machine, else a local one), workers planned and placed on it (per
`gpus` GPUs, several of them one placement-group bundle on one node, or per `cpus` CPUs), and released at the end."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from engine.errors import HieruiError
from engine.sweep.ray_options import RayOptions
from engine.sweep.sweeps import Sweep

INSTALL = "pip install 'hierui[ray]'"
MAX_ATTEMPTS = 3  # an item (a batch of runs, a spec) is tried at most this often before it is reported failed
MAX_RESTARTS = 2  # Ray restarts a dead worker this often
# the driver's environment the workers get (a cluster started elsewhere does not have it)
ENV_PREFIXES = ("HIERUI_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def import_ray():
    """The ray module, or one HieruiError saying how to install it."""
    _token_auth()  # read by Ray when it is imported
    try:
        import ray
    except ImportError:
        raise HieruiError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def worker_env() -> dict:
    """The driver's HIERUI_*/HF_*/… variables, for the workers (a cluster started elsewhere lacks them)."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def connect(ray, address: str, say) -> bool:
    """Join the cluster at `address` ("auto": the one on this machine, else a new local one), with the driver's
    HIERUI_*/HF_* variables for every worker of the job; True when this call started Ray here (the caller stops
    it). A Ray already initialized in this process (a test's, a script's) is used as it is. An address where
    nothing answers is refused at once (Ray itself would keep retrying)."""
    import logging

    if ray.is_initialized():
        return False
    common = dict(log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": worker_env()})
    if address == "auto":
        found = _bootstrap_address("auto")
        if found is not None and _answers(found):
            ray.init(address="auto", **common)  # "auto": Ray also reads that cluster's settings (token auth)
            say(f"Ray: joined the cluster running on this machine ({found})")
            return False
        say("Ray: no cluster running here, starting a local one")
        ray.init(include_dashboard=False, **common)
        return True
    check_address(address)
    try:
        ray.init(address=address, **common)
    except Exception as e:  # a refused connection, a version mismatch: one line
        from engine.errors import one_line

        raise HieruiError(f"cannot join the Ray cluster at {address}: {one_line(e)}") from None
    say(f"Ray: joined the cluster at {address}")
    return False


def _token_auth() -> None:
    """Ray 2.60 clusters use token authentication by default, and a driver joining one by its address sends its
    token only in token mode: turn it on where a token is at hand (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]) and
    the mode is not set (a cluster without authentication accepts such a driver too)."""
    import sys

    if os.environ.get("RAY_AUTH_MODE") or sys.modules.get("ray") is not None:  # set, or too late to matter
        return
    if (
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    ):
        os.environ["RAY_AUTH_MODE"] = "token"


def check_address(address: str) -> None:
    """Refuse, before anything starts, an address that is malformed or where nothing answers ("auto" always
    does: it starts a local Ray when none runs here)."""
    if address.strip() == "auto":
        return
    target = _bootstrap_address(address)
    if target is None or not _answers(target):
        raise HieruiError(
            f"cannot join the Ray cluster at {address}: nothing answers there (start one with `ray start --head`, "
            f"or use --ray auto)"
        )


def _bootstrap_address(address: str) -> str | None:
    """host:port of the cluster `address` names ("auto": the one `ray start` recorded on this machine; None when
    there is none); a malformed address is one HieruiError."""
    text = address.strip()
    if text.startswith("ray://"):  # Ray Client: its server's host:port
        text = text.removeprefix("ray://").split("/", 1)[0]
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise HieruiError(f"--ray {address}: use host:port or ray://host:port")
        return text
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(text)
    except Exception:
        if text == "auto":
            return None
        raise HieruiError(f"--ray {address}: use auto, host:port or ray://host:port") from None


def _answers(host_port: str, timeout: float = 3.0) -> bool:
    """Whether something accepts a TCP connection at host:port within `timeout` seconds."""
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def plan_workers(ray, sweep: Sweep, opts: RayOptions) -> tuple[int, dict, bool]:
    """(how many workers, the resources of each, whether they use GPUs) for the cluster as it is now: per live
    node, as many workers as its GPUs (or CPUs) hold whole (a pair's GPUs are on one node)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = sum(int(r.get("GPU", 0)) for r in nodes)
    cpus = sum(int(r.get("CPU", 0)) for r in nodes)
    use_gpu = gpus > 0 and not str(sweep.device).startswith("cpu")
    if use_gpu:
        n, each = sum(int(r.get("GPU", 0)) // opts.gpus for r in nodes), {"num_gpus": opts.gpus, "num_cpus": 1}
    else:
        if str(sweep.device).startswith("cuda"):
            raise HieruiError(f"--device {sweep.device}: the Ray cluster has no GPU")
        n, each = sum(int(r.get("CPU", 0)) // opts.cpus for r in nodes), {"num_cpus": opts.cpus}
    if n < 1:
        need = f"{opts.gpus} GPUs" if use_gpu else f"{opts.cpus} CPUs"
        raise HieruiError(f"the Ray cluster has {cpus} CPUs and {gpus} GPUs: no node has the {need} of one pair worker")
    return min(n, opts.workers or n), each, use_gpu


def actor_options(ray, each: dict, use_gpu: bool, opts: RayOptions, groups: list) -> dict:
    """A worker's Ray options: its resources (several GPUs: one bundle of a placement group, appended to
    `groups`, so they are reserved together on one node) and restarts."""
    options = dict(max_restarts=MAX_RESTARTS, max_task_retries=0)  # the environment: the job's (connect)
    if use_gpu and opts.gpus > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"GPU": opts.gpus, "CPU": 1}], strategy="STRICT_PACK")
        groups.append(group)
        try:
            ray.get(group.ready(), timeout=120)
        except Exception:
            raise HieruiError(f"the Ray cluster has no node with {opts.gpus} free GPUs for one more pair") from None
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        options.update(num_gpus=opts.gpus, num_cpus=1)
    else:
        options.update(each)
    return options


def release(ray, actors: list, groups: list, started_here: bool) -> None:
    """The end of a Ray job, whatever happened: its actors killed (no restart), its placement groups removed, and
    the Ray instance stopped where this process started it."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
    for group in groups:
        try:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)
        except Exception:
            pass
    if started_here:
        ray.shutdown()


def error_text(e: BaseException) -> str:
    from engine.errors import one_line

    cause = getattr(e, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else e)
