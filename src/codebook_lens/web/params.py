"""Request parameters of the code browser, with the bounds that keep every answer small."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from codebook_lens.analysis.search import MAX_PATTERN_CHARS
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.steering.intervene import MODES

MAX_CODE_CHARS = 120
MAX_PER_PAGE = 100
MAX_OFFSET = 1_000_000_000
MAX_PAGE = 1_000_000
MAX_WINDOW = 64
MAX_RESULTS = 200
MAX_TEXT_CHARS = 4000
MAX_PROMPT_CHARS = 2000
MAX_STEER_CODES = 16
MAX_SAMPLES = 8
MAX_NEW_TOKENS = 64
MAX_SEED = 2**31 - 1
MAX_STRENGTH = 100.0  # factor of a forced code, either sign

Order = Literal["rank", "corpus"]
Sort = Literal["precision", "recall", "f1", "count"]
Mode = Literal["replace_last", "replace_all", "append"]
if set(get_args(Mode)) != set(MODES):
    raise ImportError(f"the browser's steering modes {get_args(Mode)} differ from {MODES}")

CodePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_CODE_CHARS,
        description="a code: CODEBOOK:CODE (layer12_mlp:345) or CODEBOOK/HEAD:CODE "
        "(layer2_attn_heads/3:17)",
    ),
]
CodeQuery = Annotated[str, Query(min_length=1, max_length=MAX_CODE_CHARS, description="a code")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="contexts to skip")]
Limit = Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="contexts to return")]
Page = Annotated[int, Query(ge=1, le=MAX_PAGE, description="page of contexts, from 1")]
PerPage = Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="contexts per page")]
Window = Annotated[int, Query(ge=0, le=MAX_WINDOW, description="tokens of context each side")]
OrderQuery = Annotated[
    Order, Query(description="rank: best-match occurrences first; corpus: corpus order")
]
Top = Annotated[int, Query(ge=1, le=20, description="promoted and suppressed tokens to list")]
Similar = Annotated[int, Query(ge=1, le=50, description="similar codes to list")]
Fraction = Annotated[float, Query(ge=0.0, le=1.0, allow_inf_nan=False)]
Pattern = Annotated[
    str, Query(min_length=1, max_length=MAX_PATTERN_CHARS, description="an RE2 pattern")
]
OptionalPattern = Annotated[
    str | None, Query(max_length=MAX_PATTERN_CHARS, description="an RE2 pattern")
]
MinCount = Annotated[int, Query(ge=1, le=MAX_OFFSET, description="fewest tokens a code fires on")]
Results = Annotated[int, Query(ge=1, le=MAX_RESULTS, description="codes to return")]
CodebookQuery = Annotated[
    str | None, Query(max_length=MAX_CODE_CHARS, description="one codebook, e.g. layer12_mlp")
]
MinFraction = Annotated[
    float,
    Query(gt=0.0, le=1.0, allow_inf_nan=False, description="least share of the text covered"),
]
MaxFrequency = Annotated[
    float,
    Query(gt=0.0, le=1.0, allow_inf_nan=False, description="most share of the corpus fired on"),
]
OptionalText = Annotated[str | None, Query(max_length=MAX_TEXT_CHARS)]


def check_unicode(text: str, name: str) -> str:
    """``text`` unless it holds characters that cannot be encoded (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CodebookLensError(f"the {name} holds characters that are not valid Unicode") from None
    return text


class TopicRequest(BaseModel):
    """Text whose covering codes are wanted."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    min_fraction: float = Field(0.5, gt=0.0, le=1.0, allow_inf_nan=False)
    max_frequency: float = Field(0.01, gt=0.0, le=1.0, allow_inf_nan=False)
    limit: int = Field(50, ge=1, le=MAX_RESULTS)

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        return check_unicode(value, "text")


class SteerRequest(BaseModel):
    """A prompt, the codes to force on or disable, and how to sample."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    force: list[Annotated[str, Field(max_length=MAX_CODE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STEER_CODES
    )
    disable: list[Annotated[str, Field(max_length=MAX_CODE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STEER_CODES
    )
    mode: Mode = "replace_last"
    samples: int = Field(2, ge=1, le=MAX_SAMPLES)
    max_new_tokens: int = Field(24, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    strength: float = Field(1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    from_position: int | None = Field(None, ge=0, le=MAX_OFFSET)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return check_unicode(value, "prompt")


def split_codes(text: str | None) -> list[str]:
    """Codes typed in one field, separated by spaces or commas."""
    return [c for c in (text or "").replace(",", " ").split() if c]
