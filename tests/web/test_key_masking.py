"""The dashboard never shows FAL_KEY: not in a stored prompt, not in an error quoting the URL.

Found by a secret-leak audit: a prompt holding a fal-shaped key (stored by a ``submit`` run
without FAL_KEY, which then checked nothing) was shown in full on the batch page (the job row's
``title=``), while exports masked it; and ``GET /batches/<key>`` answered ``no batch '<key>'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from html import unescape
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs.key_forms import forget_keys, remember_key
from tests.web.web_helpers import HTML, JSON, TOKEN, app_for, client, make_batch, new_job, settings_for

SHAPED = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b:0123456789abcdef0123456789abcdef"
#: A key as an operator's FAL_KEY looks (not of fal's shape), known to the process as `serve` knows it.
KEY = "id-1234:sekrit-CANARY-5f3a"
SECRET = KEY.partition(":")[2]
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def known_key() -> Iterator[str]:
    """The key ``wanbatch serve`` remembers at start-up (``cli.install_key_redaction``)."""
    remember_key(KEY)
    yield KEY
    forget_keys()


def test_a_stored_prompt_holding_a_key_is_masked_on_the_batch_page(
    sqlite_engine: Engine, output_dir: Path, known_key: str
) -> None:
    with Session(sqlite_engine) as session:
        shaped, known = new_job(0, endpoint="fal-ai/wan-22"), new_job(1, endpoint="fal-ai/wan-22")
        shaped.input["prompt"] = f"real {SHAPED}"
        known.input["prompt"] = f"debug {SECRET} here"
        batch = make_batch(session, "keyprompt", [shaped, known])
        batch_id = batch.id
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir))
    page = client(app).get(f"/batches/{batch_id}", headers=HTML)
    assert page.status_code == 200
    text = unescape(page.text)
    assert SHAPED not in text
    assert SHAPED.partition(":")[2] not in text
    assert SECRET not in text
    assert 'title="real **"' in text  # masked as the exports mask it
    assert 'title="debug ** here"' in text


@pytest.mark.parametrize("accept", [HTML, JSON, {}])
def test_an_error_quoting_a_reference_holding_the_key_masks_it(
    sqlite_engine: Engine, output_dir: Path, known_key: str, accept: dict[str, str]
) -> None:
    app = app_for(sqlite_engine, settings_for(sqlite_engine, output_dir, token=TOKEN))
    local = client(app)
    for ref in (KEY, SECRET, SHAPED):
        answer = local.get(f"/batches/{quote(ref, safe='')}", headers={**BEARER, **accept})
        assert answer.status_code == 404
        shown = unescape(answer.text)
        assert "no batch" in shown
        assert ref not in shown
        assert SECRET not in shown
        if accept is JSON:
            assert answer.json()["ok"] is False
    action = local.post(f"/batches/{quote(KEY, safe='')}/cancel", headers={**BEARER, **JSON})
    assert action.status_code == 404, action.text
    assert SECRET not in action.text
    assert "no batch" in action.json()["error"]
