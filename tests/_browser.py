"""Opening a report page in a real headless browser (Chromium from the Debian packages).

:func:`check_page` loads a page twice: once with a probe script injected, whose verdict (images
present, images that failed to decode, script errors) becomes the document title that
``--dump-dom`` prints, and once as written, whose console must stay free of errors.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROBE = (
    "<script>window.errors=[];window.addEventListener('error',e=>window.errors.push(String(e.message||e)));"
    "window.addEventListener('load',()=>{const imgs=[...document.images];"
    "const bad=imgs.filter(i=>!(i.complete&&i.naturalWidth>0)).length;"
    "document.title='PROBE images='+imgs.length+' broken='+bad+' errors='+window.errors.length;});</script>"
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _dump_dom(page: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


def check_page(page: Path, scratch: Path) -> None:
    """Assert that ``page`` loads with every <img> decoded (naturalWidth > 0) and no console error."""
    text = page.read_text()
    n = text.count("<img ")
    probe = scratch / f"probe-{page.name}"
    probe.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    res = _dump_dom(probe)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"<title>PROBE images={n} broken=0 errors=0</title>" in res.stdout, res.stdout[:500] + res.stderr[-1500:]
    res = _dump_dom(page)
    assert res.returncode == 0 and "CONSOLE" not in res.stderr and "Uncaught" not in res.stderr, res.stderr[-2000:]
