"""Third-party static files vendored into the repository (no CDN): Chart.js 4.6.2 (MIT, LICENSE.md
beside it), `npm pack chart.js` → dist/chart.umd.js. Served by credits (operator dashboard) and the
proxy (portal usage chart)."""

from __future__ import annotations

from pathlib import Path

CHARTJS_DIR = Path(__file__).resolve().parent / "static" / "chartjs"
