"""Property-based fuzzing of every operation in the code browser's OpenAPI schema
(schemathesis against the ASGI app, the model loaded so steering runs too): with valid
and with invalid parameters, no answer is a server error."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from codebook_lens.web import create_app  # noqa: E402

EXAMPLES = 40  # per operation and mode: enough to reach the bounds, quick on two cores


@pytest.fixture(scope="module")
def web_schema(tiny_code_cache):
    model_dir, cache_dir = tiny_code_cache
    app = create_app(cache_dir, model_dir, regex_time_budget=2.0)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def fuzz(operation, mode: GenerationMode, **fixed) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case) -> None:
        case.call_and_validate(checks=[not_a_server_error])

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_operation_answers_with_a_server_error(web_schema, mode):
    operations = [result.ok() for result in web_schema.get_all_operations()]
    assert len(operations) >= 12  # the API and the pages
    failures = []
    runs = [(operation, {}) for operation in operations]
    # random strings rarely name a code: fuzz the code pages' other parameters on real ones
    runs += [
        (operation, {"path_parameters": {"code": code}})
        for operation in operations
        if "{code}" in operation.path
        for code in ("layer0_mlp:3", "layer1_attn_heads/2:1")
    ]
    for operation, fixed in runs:
        try:
            fuzz(operation, mode, **fixed)
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # no parameter to make invalid
        except Exception as err:  # collect every operation's failure, then report them all
            failures.append(f"{operation.method.upper()} {operation.path} {fixed}: {err}")
    assert not failures, "\n\n".join(failures)
