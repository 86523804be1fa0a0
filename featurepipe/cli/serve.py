"""`featurepipe serve`: a run's model on a local web page and a JSON endpoint (deploy.serve).

The model is loaded (and warmed up) before the address is printed, so the first request is as quick
as the others. Binding anything but a loopback address is allowed (a lab's shared machine) but warned
about: the server has no authentication. Needs the `serve` extra (Starlette, uvicorn, python-multipart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from featurepipe.cli.common import Command, resolve_run
from featurepipe.cli.options import ModelChoice, RunCacheDir, Trust

SERVE_EXTRA = "featurepipe serve needs Starlette, uvicorn and python-multipart: pip install 'featurepipe[serve]'"


def serve(
    run_dir: Path = typer.Argument(..., help="A run directory written by `featurepipe evaluate` or `featurepipe run`, or DATA (a dataset folder or manifest) for its latest run."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only; "
                             "another address is warned about, the server has no login)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    max_upload_mb: float = typer.Option(25.0, "--max-upload-mb", min=0.01, metavar="MB",
                                        help="Largest request body accepted (413 above it); the page sends one photo per request."),
    model: str = ModelChoice, cache_dir: Optional[Path] = RunCacheDir, trust: bool = Trust,
) -> None:
    """Serve a prediction page (/) and JSON endpoint (POST /predict) for a run's model on this machine."""
    from featurepipe.cli import render
    from featurepipe.core.errors import FeaturepipeError

    with Command(also=(OSError,)) as command:
        try:
            import uvicorn

            from featurepipe.deploy.serve import build_app, exposure_warning
        except ImportError:
            raise FeaturepipeError(SERVE_EXTRA) from None
        run_dir = resolve_run(run_dir, cache_dir)
        warning = exposure_warning(host)
        if warning:
            render.flag("warning", warning)
        check_address(host, port)      # before the model loads: a port in use is known in a millisecond
        with command.stage() as progress:
            app, notes = build_app(run_dir, cache_dir=cache_dir, model=model, trust=trust,
                                   max_upload_mb=max_upload_mb, progress=progress)
    for note in notes:
        render.flag("note", note)
    shown = f"[{host}]" if ":" in host else host
    render.stdout.print(f"serving {run_dir} at http://{shown}:{port}/ (POST /predict for JSON; Ctrl-C stops)",
                        highlight=False, soft_wrap=True)
    # Access lines would drown the terminal; uvicorn's own warnings and errors (a port in use) still show.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                           lifespan="off"))
    try:
        # uvicorn stops on Ctrl-C, then raises the signal again: the command's usual "interrupted", exit 130.
        with Command(interrupted="the server stopped"):
            server.run()
    except SystemExit:            # uvicorn's way of saying it could not bind, after logging why
        if server.started:
            raise
    if not server.started:
        with Command():
            raise FeaturepipeError(f"could not listen on {host}:{port} (see the line above); pick another --port")


def check_address(host: str, port: int) -> None:
    """A FeaturepipeError (the machine's state, exit 1) when it cannot listen on host:port (in use, or
    not one of its addresses)."""
    import socket

    from featurepipe.core.errors import FeaturepipeError

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(info[0], info[1]) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
            probe.bind(info[4])
    except OSError as error:
        raise FeaturepipeError(f"cannot listen on {host}:{port}: {error.strerror or error}; pick another --port "
                         f"(or --host)") from None
