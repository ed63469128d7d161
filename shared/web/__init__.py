"""What fednano's two web screens share: charts drawn by the server, the stylesheet, and access control.

The clinician's page (``fednano serve``, :mod:`client.service`) runs in a hospital; the coordinator's dashboard
(``fednano dashboard``, :mod:`server.dashboard`) runs at the coordinator. Neither may fetch anything from the
network (hospitals run offline), so every asset is in this package: :data:`STATIC_DIR` holds the stylesheet,
:mod:`shared.web.svg` draws charts as inline SVG on the server, and :mod:`shared.web.access` keeps a screen bound
to 127.0.0.1 unless it has an access token and TLS.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
"""Mount at ``/static`` (``fastapi.staticfiles.StaticFiles(directory=STATIC_DIR)``)."""
