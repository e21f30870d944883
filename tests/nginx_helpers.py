"""Debian's nginx as a process of a test's own (tests/test_nginx.py, tests/test_websocket_page.py):
its own prefix and temp folders, on free ports, never the system's service."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def need_nginx() -> None:
    if not os.path.exists(NGINX):
        pytest.fail("nginx is not installed (apt-get install nginx); .ci/run installs it")


def nginx_command(conf: Path, prefix: Path, *extra: str) -> list[str]:
    main = f"pid {prefix}/nginx.pid; error_log {prefix}/error.log;" + (" user root;" if os.geteuid() == 0 else "")
    return [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf), "-g", main, *extra]


def plain_proxy_conf(prefix: Path, listen_port: int, upstream: str) -> str:
    """nginx as a plain reverse proxy to `upstream` (host:port), WebSocket upgrades passed on: what a
    hosting platform's HTTP(S) proxy is, with no UDP path behind it."""
    temp = "".join(f"    {name}_temp_path {prefix}/{name};\n" for name in TEMP_PATHS)
    return f"""worker_processes 1;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
{temp}    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""
