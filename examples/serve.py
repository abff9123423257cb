"""A small HTTP prediction service on the Python standard library, serving a saved model.

    python3 -m fastnorm train --save digits.safetensors     # or any checkpoint it wrote
    python3 examples/serve.py digits.safetensors --port 8000

    curl -s localhost:8000/predict -d '{"inputs": [[[0, 0, 5, 13, 9, 1, 0, 0], ...]]]}'
    -> {"predictions": [0], "probabilities": [[0.98, ...]]}

The checkpoint's metadata holds the model configuration (``fastnorm train --save``
writes it), so the service rebuilds the model, loads the weights, folds the BatchNorms
(``fastnorm.fuse(model, relu=True)``) and answers from a ``ThreadingHTTPServer``: one
thread per connection, all sharing the one model (a fused model keeps no state between
calls and its kernels release the GIL, so no lock is needed).  PyTorch is not needed.

Endpoints:

- ``POST /predict`` with a JSON object ``{"inputs": x}``, ``x`` one image ``(C, H, W)``
  or a batch ``(N, C, H, W)`` of numbers, channels first whatever the model's layout
  (the stored data's order), as nested lists.  Answers ``{"predictions": [class, ...],
  "probabilities": [[p, ...], ...]}`` (one row per image; softmax of the logits).
- ``GET /health``: ``{"status": "ok", "model": {...configuration...}}``.

A request the service cannot use is answered 400 with ``{"error": "..."}`` saying what
was wrong (malformed JSON, no ``inputs``, not a rectangular array of finite numbers, a
shape other than the model's, too many images); an unknown path is 404, another method
405, a body over ``--max-bytes`` 413.
"""
import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import fastnorm as fn
from fastnorm import train

MAX_BATCH = 1024
MAX_BYTES = 16 << 20


class BadRequest(ValueError):
    """A request the model cannot answer; the message goes back to the client."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Predictor:
    """The model of a checkpoint, with the checks and conversions of one request.

    ``predict(inputs)`` takes the decoded JSON value of ``inputs`` and returns the answer
    dict, or raises ``BadRequest``.  Thread-safe: nothing is written after construction.
    """

    def __init__(self, path, fuse=True, max_batch=MAX_BATCH):
        model, config = train.model_from_metadata(fn.load_metadata(path))
        fn.load_into(model, path)
        model.eval()
        self.model = fn.fuse(model, relu=True) if fuse else model
        self.config = config
        self.layout = config.get("layout", "NCHW")
        self.in_shape = tuple(config["in_shape"])
        self.max_batch = max_batch

    def to_batch(self, inputs):
        """The request's ``inputs`` as a float32 (N, C, H, W) array, or BadRequest."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, int, float)):
            raise BadRequest(f"inputs: expected a nested list of numbers of shape "
                             f"{_shape_text(self.in_shape)} or (N, "
                             f"{', '.join(map(str, self.in_shape))}), got "
                             f"{type(inputs).__name__}")
        try:
            x = np.array(inputs, dtype=np.float32)
        except (ValueError, TypeError):
            raise BadRequest("inputs: expected a rectangular nested list of numbers (rows "
                             "of equal length, no strings or nulls)") from None
        if x.shape == self.in_shape:
            x = x[None]
        if x.ndim != 4 or x.shape[1:] != self.in_shape:
            raise BadRequest(f"inputs: expected shape {_shape_text(self.in_shape)} (one image) "
                             f"or (N, {', '.join(map(str, self.in_shape))}) (a batch), got "
                             f"{_shape_text(x.shape)}")
        if not 1 <= len(x) <= self.max_batch:
            raise BadRequest(f"inputs: expected 1 to {self.max_batch} images, got {len(x)}")
        if not np.isfinite(x).all():
            raise BadRequest("inputs: expected finite numbers (no NaN or infinity)")
        return train.to_layout(x, self.layout)

    def logits(self, x):
        with fn.inference_mode():
            return self.model(x).data

    def predict(self, inputs):
        logits = self.logits(self.to_batch(inputs)).astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        return {"predictions": logits.argmax(axis=1).tolist(), "probabilities": p.tolist()}


def _shape_text(shape):
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


class Handler(BaseHTTPRequestHandler):
    """``POST /predict`` and ``GET /health``; the server's ``predictor`` answers."""
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    timeout = 30  # seconds a connection may stall mid-request
    server_version = "fastnorm-serve/0.1"

    def _send(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status, message):
        self._send(status, {"error": message})

    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok", "model": self.server.predictor.config})
        elif self.path == "/predict":
            self._error(405, "use POST for /predict")
        else:
            self._error(404, f"no such path {self.path!r}: POST /predict or GET /health")

    def do_POST(self):
        if self.path != "/predict":
            self._error(404, f"no such path {self.path!r}: POST /predict or GET /health")
            return
        length = self.headers.get("Content-Length")
        try:
            length = int(length)
        except (TypeError, ValueError):
            self.close_connection = True
            self._error(411, "a Content-Length header is required")
            return
        if length < 0 or length > self.server.max_bytes:
            self.close_connection = True  # the body is not read
            self._error(413, f"request body of {length} bytes; at most "
                             f"{self.server.max_bytes} are accepted")
            return
        raw = self.rfile.read(length)
        try:
            try:
                request = json.loads(raw)
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                raise BadRequest(f"malformed JSON: {e}") from None
            if not isinstance(request, dict) or "inputs" not in request:
                raise BadRequest('expected a JSON object with an "inputs" array, e.g. '
                                 '{"inputs": [[[...]]]}')
            answer = self.server.predictor.predict(request["inputs"])
        except BadRequest as e:
            self._error(e.status, str(e))
            return
        except Exception as e:  # a bug, not the client's fault: say so, keep serving
            self.log_error("error answering a request: %r", e)
            self._error(500, f"internal error: {type(e).__name__}")
            return
        self._send(200, answer)

    def log_message(self, format, *args):
        if self.server.verbose:
            super().log_message(format, *args)


class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True  # do not wait for open keep-alive connections on shutdown

    def __init__(self, address, predictor, max_bytes=MAX_BYTES, verbose=False):
        super().__init__(address, Handler)
        self.predictor = predictor
        self.max_bytes = max_bytes
        self.verbose = verbose


def make_server(model_path, host="127.0.0.1", port=8000, fuse=True, verbose=False,
                max_batch=MAX_BATCH, max_bytes=MAX_BYTES):
    """A ``PredictionServer`` for the checkpoint at ``model_path`` (port 0: any free
    port; ``server.server_address`` has it); call ``serve_forever()``."""
    return PredictionServer((host, port), Predictor(model_path, fuse, max_batch),
                            max_bytes, verbose)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a .safetensors or .npz checkpoint from 'fastnorm train --save'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--no-fuse", action="store_true", help="serve the model unfused")
    p.add_argument("--threads", type=int, help="fastnorm kernel threads (default: all cores)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH)
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if args.threads:
        fn.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        server = make_server(args.model, args.host, args.port, not args.no_fuse,
                             args.verbose, args.max_batch, args.max_bytes)
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {args.model} ({server.predictor.config.get('model')}, "
          f"{'fused' if not args.no_fuse else 'unfused'}, backend {fn.get_backend()}) on "
          f"http://{host}:{port} (ready in {time.perf_counter() - t0:.2f} s)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
