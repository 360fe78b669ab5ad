"""The images' HEALTHCHECK: exit 0 when the server's /health answers 200; a 503 (what does not
work is in its body) or no answer exits 1. The standard library only: no curl in the image."""

import os
import sys
import urllib.request

port = os.environ.get("GENADAPTER_PORT", "8000")
try:
    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=8)
except OSError as e:  # urllib's HTTPError (a 503) and URLError are OSErrors
    sys.exit(f"unhealthy: {e}")
