"""The servers of `opd generate --endpoint` checked at connect: whether each tokenizes like
the local `--tokenizer` (a token-level cache) and, with several (replicas of one teacher),
that they agree: the same models listed, the same tokenizer verdict. A replica that does
not answer at connect is left out of the run (a warning); one that answers otherwise than
the first is refused, naming it: its rows would not be the same teacher's."""

from __future__ import annotations

import asyncio
import logging

from opd.teachers.cache.endpoint_http import EndpointUnavailable, RequestRefused

log = logging.getLogger("opd")


def probe_text(tokenizer) -> str:
    """Text whose tokenization exercises the vocabulary: words, digits, whitespace runs,
    non-Latin script, every special token, and 512 tokens spread over the id range."""
    step = max(1, len(tokenizer) // 512)
    spread = tokenizer.decode(list(range(0, len(tokenizer), step)), skip_special_tokens=True)
    specials = "".join(tokenizer.all_special_tokens)
    return f"Hello, world! 12345 +-*/ \n\t  tabs  Ünïcødé 日本語 ✓ {specials} {spread}"


async def check_server_tokenizer(
    client, model: str, tokenizer, path: str, server: str | None = None
) -> tuple[bool, str]:
    """(token-level, why): whether the server tokenizes like `tokenizer` (vLLM /tokenize)."""
    if tokenizer is None:
        return False, "no --tokenizer given: the server's tokenizer is unknown"
    text = probe_text(tokenizer)
    payload = {"model": model, "prompt": text, "add_special_tokens": False}
    try:
        body, _ = await client.request(
            "POST", "/tokenize", {**payload, "return_token_strs": True}, server=server
        )
    except RequestRefused as err:
        return False, f"the server's /tokenize cannot check the tokenizer ({err})"
    mine = tokenizer(text, add_special_tokens=False).input_ids
    theirs = body.get("tokens") if isinstance(body, dict) else None
    if theirs != mine:
        at = next((i for i, (a, b) in enumerate(zip(mine, theirs or [])) if a != b), None)
        return False, (
            f"the server tokenizes a probe text otherwise than {path} "
            f"({len(theirs or [])} vs {len(mine)} tokens, first difference at {at})"
        )
    strs = body.get("token_strs")
    if strs is not None and strs != tokenizer.convert_ids_to_tokens(mine):
        return False, f"the server's token strings differ from {path}'s on a probe text"
    return True, f"the server's /tokenize agrees with {path} on a {len(mine)}-token probe"


async def listed_models(client, server: str) -> list[str] | None:
    """The model ids `server`'s `/v1/models` lists; None when it has no such list."""
    try:
        body, _ = await client.request("GET", "/v1/models", server=server)
    except RequestRefused:
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return None
    return sorted(str(m.get("id")) for m in data if isinstance(m, dict))


async def check_servers(client, model: str, tokenizer, path: str) -> tuple[bool, str]:
    """(token-level, why) of the run's servers (see the module doc)."""
    if len(client.urls) == 1:
        return await check_server_tokenizer(client, model, tokenizer, path)

    async def one(url):
        return await listed_models(client, url), await check_server_tokenizer(
            client, model, tokenizer, path, url
        )

    outcomes = await asyncio.gather(*(one(u) for u in client.urls), return_exceptions=True)
    answered = {}
    for url, outcome in zip(list(client.urls), outcomes, strict=True):
        if isinstance(outcome, EndpointUnavailable):
            log.warning("endpoint %s did not answer at connect; left out of this run", url)
            client.drop(url)
            if not client.urls:
                raise outcome
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            answered[url] = outcome
    first, (models, (level, why)) = next(iter(answered.items()))
    for url, (their_models, (their_level, their_why)) in answered.items():
        if None not in (models, their_models) and their_models != models:
            raise ValueError(
                f"endpoint {url} serves models {their_models} but {first} serves {models}: "
                "every --endpoint must be a replica of the same teacher"
            )
        if their_level != level:
            raise ValueError(
                f"endpoint {url}: {their_why}; but {first}: {why}: every --endpoint must "
                "tokenize alike"
            )
    return level, f"{why} (each of {len(answered)} servers)"
