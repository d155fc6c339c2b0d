"""What the `fetch` tool (`turnrl.tools.web`) may reach and how much of it it reads and shows:
a plain pydantic value that loads, validates and dumps without the HTTP client, which only the
tool imports."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from turnrl.tools.base import CostModel

__all__ = ["WebFetchConfig", "host_matches"]

_HOST_PATTERN = re.compile(r"(\*\.)?[^*\s/]+")
_DEFAULT_TYPES = (
    "text/html",
    "application/xhtml+xml",
    "text/plain",
    "text/markdown",
    "text/csv",
    "text/xml",
    "application/xml",
    "application/json",
    "application/ld+json",
)


class WebFetchConfig(BaseModel):
    """What `fetch` may reach and how much of it it reads and shows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allow_hosts: tuple[str, ...] = ()
    """Host patterns that may be fetched: `example.org` (that host only) or `*.example.org`
    (its subdomains, not itself). Empty: every host not denied."""
    deny_hosts: tuple[str, ...] = ()
    """Host patterns that may never be fetched; a host matched by both lists is denied."""
    block_private: bool = False
    """Resolve each host first and refuse loopback, private, link-local, multicast and reserved
    addresses (a guard for agents running next to internal services)."""
    max_bytes: int = Field(2 * 1024 * 1024, ge=1)
    """Body bytes read at most, counted after decompression (and before it: raw bytes too)."""
    timeout_s: float = Field(15.0, gt=0)
    """Deadline of a whole fetch: resolving, connecting, every redirect hop, the whole body."""
    max_redirects: int = Field(5, ge=0)
    """Redirects followed at most; one more is refused."""
    content_types: tuple[str, ...] = _DEFAULT_TYPES
    """Media types whose body is shown; any other success response is refused."""
    max_output_tokens: int = Field(1024, ge=16)
    """Budget of the observation (header included), in the policy's tokens."""
    user_agent: str = "turnrl-fetch/0.1"
    """The `User-Agent` header sent."""
    trust_env: bool = False
    """Take proxy settings from the environment (off: a fetch goes where its URL says)."""
    cost: CostModel = CostModel(per_call={"calls": 1.0}, per_second={"time_s": 1.0})
    """How a call is priced; the tool adds `bytes` (downloaded) and `tokens` (shown)."""

    @field_validator("allow_hosts", "deny_hosts")
    @classmethod
    def _host_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for p in patterns:
            norm = p.strip().lower().rstrip(".")
            if not _HOST_PATTERN.fullmatch(norm):
                raise ValueError(f"bad host pattern {p!r}: use 'example.org' or '*.example.org'")
            out.append(norm)
        return tuple(out)

    @field_validator("content_types")
    @classmethod
    def _media_types(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t.strip().lower() for t in types)

    def host_allowed(self, host: str) -> bool:
        """Whether `host` may be fetched: not denied, and allowed (or no allow list)."""
        if any(host_matches(host, p) for p in self.deny_hosts):
            return False
        return not self.allow_hosts or any(host_matches(host, p) for p in self.allow_hosts)


def host_matches(host: str, pattern: str) -> bool:
    """`host` is `pattern`, or a subdomain of it when the pattern is `*.domain`. Case and a
    trailing dot are ignored (`Example.ORG.` is `example.org`)."""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern
