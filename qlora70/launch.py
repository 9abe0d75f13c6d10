"""Launching N local processes under torchrun (`torch.distributed.run`, torchrun's own code) and the `--nproc` flag.

Import-light (nothing of torch.distributed is loaded until `launch` runs), so `qlora70 train --nproc N` re-launches
before anything heavy is imported.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("qlora70.distributed")


def launch(nproc: int, argv: list[str] | None = None, module: str = "qlora70.cli", script: str | None = None,
           port: int | None = None) -> int:
    """Re-run `python -m <module> <argv>` (or `python <script> <argv>`) as `nproc` processes on this host through
    `torch.distributed.run` (torchrun's own code), rendezvous on 127.0.0.1:<free port>. Returns 0, or 1 when a rank
    failed (its error is logged). Pass the argv WITHOUT `--nproc` (see `strip_nproc`); the children see torchrun's
    RANK / WORLD_SIZE / LOCAL_RANK env (so they do not re-launch)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    if script is not None and not os.path.isfile(script):
        raise FileNotFoundError(f"launch: script {script} not found")
    from torch.distributed.run import get_args_parser, run

    if port is None:
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    argv = list(sys.argv[1:] if argv is None else argv)
    target = [script] if script is not None else ["--module", module]
    args = get_args_parser().parse_args(["--nnodes=1", "--node_rank=0", f"--nproc_per_node={nproc}",
                                         "--master_addr=127.0.0.1", f"--master_port={port}", *target, *argv])
    import signal
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        run(args)
    except Exception as e:  # torchrun's ChildFailedError names the failing rank and its traceback
        log.error("torchrun: %s", e)
        return 1
    finally:  # torchrun installs its own handlers; give the caller (e.g. a Trainer's Ctrl-C handling) its own back
        for sig, h in saved.items():
            signal.signal(sig, h)
    return 0


def strip_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """Remove `--nproc N` / `--nproc=N` from argv; returns (N or None, the rest)."""
    out, n, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            n, i = argv[i + 1], i + 2
            continue
        if a.startswith("--nproc="):
            n, i = a.split("=", 1)[1], i + 1
            continue
        out.append(a)
        i += 1
    if n is not None:
        try:
            n = int(n)
        except ValueError:
            raise ValueError(f"--nproc must be an integer, got {n!r}") from None
    return n, out
