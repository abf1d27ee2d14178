"""Property-based run against the served OpenAPI spec (schemathesis, a fixed example
budget, derandomized): whatever it sends, the server answers without a 5xx. The worker
is paused (``workers=0``), so no real training starts."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import TINY, Server

EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def server(db_url, tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("openapi"), db_url, workers=0).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def token(server):
    tok = server.token("fuzzer")
    with server.client(tok) as c:  # something to find: jobs 1 and 2
        for _ in range(2):
            assert c.post("/jobs", json={"recipe": TINY}).status_code == 201
    return tok


def test_no_server_errors(server, token):
    """Each operation of the spec, with and without the token, EXAMPLES cases each."""
    spec = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in spec.get_all_operations()]
    assert len(ops) >= 14
    calls = 0
    for op in ops:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                  suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
        def check(case):
            nonlocal calls
            for headers in ({"Authorization": f"Bearer {token}"}, {}):
                response = case.call(headers=headers, timeout=30)
                calls += 1
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}\n{server.log()[-1500:]}"
                )

        check()
    assert calls >= 2 * len(ops) * 5  # the budget was spent, not skipped
