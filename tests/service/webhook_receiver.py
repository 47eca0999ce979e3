"""A real webhook receiver for the tests: ``python -m tests.service.webhook_receiver PORT
SECRETS_JSON LOG``. It verifies each POST as the Standard Webhooks spec tells a receiver to
(written from the spec, sharing no code with app/services/webhooks.py), answers 204 when the
signature is valid and 401 when not, and appends one JSON line per request to LOG.

SECRETS_JSON maps a request path to the endpoint's secret (``whsec_`` + base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOLERANCE_S = 300  # the spec's suggested replay window


def verify(secret: str, headers: dict[str, str], body: bytes) -> str | None:
    """None when valid, else why not."""
    msg_id, ts, sigs = (headers.get("webhook-id"), headers.get("webhook-timestamp"),
                        headers.get("webhook-signature"))
    if not (msg_id and ts and sigs):
        return "missing webhook-id / webhook-timestamp / webhook-signature"
    if abs(time.time() - int(ts)) > TOLERANCE_S:
        return f"timestamp {ts} outside the tolerance"
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = msg_id.encode() + b"." + ts.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for sig in sigs.split(" "):
        version, _, value = sig.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return None
    return "no matching v1 signature"


def main() -> None:
    port, secrets, log = int(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            secret = secrets.get(self.path)
            error = "unknown path" if secret is None else verify(secret, headers, body)
            with log.open("a") as f:
                f.write(json.dumps({"path": self.path, "headers": headers,
                                    "body": body.decode(), "error": error,
                                    "at": time.time()}) + "\n")
            self.send_response(204 if error is None else 401)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
