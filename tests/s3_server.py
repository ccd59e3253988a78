"""A real S3-compatible server for the tests: moto's standalone server as a process on loopback,
behind a small HTTP proxy that counts the bytes it serves and can refuse (503 SlowDown) or cut
requests on demand. Nothing here is mocked: s3fs/botocore talk HTTP to the proxy, the proxy
to moto, and moto stores the objects.

moto keeps its objects in memory; :class:`MotoServer` with ``record=True`` also records every
request (moto's recorder) so that a killed server can be started again and its objects
replayed: the state a real server would have kept on its disks.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1:``port``; ``auth`` enforces credentials (an IAM user
    made at start: :attr:`key`, :attr:`secret`)."""

    def __init__(self, workdir, *, auth: bool = True, record: bool = False):
        self.port = free_port()
        self.workdir = str(workdir)
        self.auth = auth
        self.record = record
        self.recording = os.path.join(self.workdir, f"moto-{self.port}.jsonl")
        self.proc = None
        self.key = self.secret = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, replay: bool = False) -> None:
        env = {**os.environ, "MOTO_PORT": str(self.port)}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the IAM user below; every later request is checked
        if self.record:
            env.update(MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=self.recording)
        self.log = open(os.path.join(self.workdir, f"moto-{self.port}.log"), "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start (see {self.log.name})")
                time.sleep(0.1)
        if replay:
            self._trim_recording()
            urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/recorder/replay-recording",
                                                          method="POST"), timeout=120).read()
        elif self.auth and self.key is None:
            self._make_user()

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="slide-clip-test")
        iam.put_user_policy(UserName="slide-clip-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        k = iam.create_access_key(UserName="slide-clip-test")["AccessKey"]
        self.key, self.secret = k["AccessKeyId"], k["SecretAccessKey"]

    def _trim_recording(self) -> None:
        """Drop a last request line the kill cut in half (it was never answered)."""
        if not os.path.exists(self.recording):
            return
        with open(self.recording, "rb") as f:
            data = f.read()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.recording, "wb") as f:
                f.write(data)

    def kill(self) -> None:
        """``kill -9``: no shutdown, connections dropped as they are."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill()
        if getattr(self, "log", None):
            self.log.close()


class FaultProxy:
    """An HTTP proxy to ``upstream`` (a port on 127.0.0.1) that counts what it serves and injects faults.

    ``throttle``: answer the next N requests 503 SlowDown (``-1``: every request);
    ``cut``: close the next N connections without an answer (``-1``: all: the server is gone);
    ``cut_body``: answer the next N GETs with half their body, then close (a cut mid-read).
    :attr:`served` lists ``(method, path, range header, response body bytes)`` per request.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.throttle = 0
        self.cut = 0
        self.cut_body = 0
        self.served: list[tuple[str, str, str | None, int]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        line = self.rfile.readline()
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        parts.append(line + chunk + b"\r\n")
                        if size == 0:
                            # trailers until an empty line
                            while True:
                                t = self.rfile.readline()
                                parts.append(t)
                                if t in (b"\r\n", b"\n", b""):
                                    break
                            break
                    return b"".join(parts)
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _take(self, name) -> bool:
                with proxy._lock:
                    v = getattr(proxy, name)
                    if v == 0:
                        return False
                    if v > 0:
                        setattr(proxy, name, v - 1)
                    return True

            def _handle(self):
                body = self._body()
                if self._take("cut"):
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self._take("throttle"):
                    msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                           b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        conn.putheader(k, v)
                    conn.endheaders()
                    if body:
                        conn.send(body)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the server is gone (killed): the client sees a cut connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                finally:
                    conn.close()
                half = self.command == "GET" and resp.status in (200, 206) and len(data) > 1 and self._take("cut_body")
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if half else data)
                with proxy._lock:
                    proxy.served.append((self.command, self.path, self.headers.get("Range"),
                                         len(data) if self.command != "HEAD" else 0))
                if half:
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.throttle = self.cut = self.cut_body = 0
            self.served.clear()

    def bytes_served(self, method: str = "GET", contains: str | None = None) -> int:
        with self._lock:
            return sum(n for m, p, _, n in self.served if m == method and (contains is None or contains in p))

    def requests(self, method: str | None = None) -> list:
        with self._lock:
            return [r for r in self.served if method is None or r[0] == method]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class S3:
    """The tests' S3: a moto server behind a :class:`FaultProxy`, and its credentials."""

    def __init__(self, workdir, *, auth: bool = True, record: bool = False):
        self.moto = MotoServer(workdir, auth=auth, record=record)
        self.moto.start()
        self.proxy = FaultProxy(self.moto.port)
        self._n = 0

    @property
    def endpoint(self) -> str:
        return self.proxy.url

    def credentials(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.moto.key or "testing", "AWS_SECRET_ACCESS_KEY": self.moto.secret or "testing"}

    def client(self):
        import boto3

        c = self.credentials()
        return boto3.client("s3", endpoint_url=self.moto.url, region_name="us-east-1",
                            aws_access_key_id=c["AWS_ACCESS_KEY_ID"], aws_secret_access_key=c["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self, prefix: str = "bkt") -> str:
        self._n += 1
        name = f"{prefix}-{os.getpid()}-{self._n}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, key: str, path) -> str:
        self.client().upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()
