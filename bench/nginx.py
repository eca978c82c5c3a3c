"""nginx configurations: the fast upstream and the ``proxy_pass`` baseline.

Each nginx runs as its own instance with ``-p DIR -c FILE``: ``daemon off``
(so the PID we started is the master), one worker, every path it writes
(pid, error log, temp dirs) inside DIR. When the harness runs as root the
master stays root and the worker drops to nginx's default unprivileged user.
"""

from __future__ import annotations

from pathlib import Path

from bench.procs import binary

UPSTREAM_BODY = '{"service":"bench-upstream","ok":true}\n'

_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
{body}}}
"""

_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{payload}';
        }}
    }}
"""

_PROXY = """\
    upstream origin {{
        server {origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def _write(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # a worker that dropped root must still reach its temp dirs
    conf = directory / "nginx.conf"
    conf.write_text(_COMMON.format(dir=directory, body=body))
    return conf


def upstream_conf(directory: Path, port: int) -> Path:
    payload = UPSTREAM_BODY.replace("\n", "\\n")
    return _write(directory, _UPSTREAM.format(port=port, payload=payload))


def proxy_conf(directory: Path, port: int, origin: str) -> Path:
    """``origin`` is ``host:port`` of the upstream."""
    return _write(directory, _PROXY.format(port=port, origin=origin))


def command(conf: Path) -> list[str]:
    return [binary("nginx"), "-p", str(conf.parent), "-c", str(conf)]
