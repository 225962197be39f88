"""Which setting a failed connection is the fault of: the proxy, or the CA bundle.

httpx says little of either. A proxy that refuses the connection, or whose name does not
resolve, is a :class:`httpx.ConnectError` worded as if fal itself had refused
(``[Errno -2] Name or service not known``); a proxy that answers its ``CONNECT`` with 407 or
502 is a :class:`httpx.ProxyError` saying ``502 Bad Gateway`` and nothing of which proxy; a
certificate that does not verify says nothing of the CA bundle it was checked against. Every
line that reports such a failure (a submit held, a status call retried, the receiver's key
fetch, the doctor's checks) says its cause through :func:`proxy_failure` and
:func:`certificate_words` instead: the proxy by its ``host:port`` and the variable that names
it (never its user or password: httpcore keeps them apart from the origin read here), and the
CA bundle in use (``SSL_CERT_FILE``, ``SSL_CERT_DIR`` or certifi's).

Whether a request went through a proxy is read from the exception's traceback: httpcore's proxy
connections (``TunnelHTTPConnection``, ``ForwardHTTPConnection``, ``Socks5Connection``) keep
the proxy's origin as ``_proxy_origin``, and a failure inside one of them has their frame on its
way up; a failure below their ``connect_tcp`` is the connection to the proxy itself.
``tests/unit/test_proxy_failures.py`` runs these against a real proxy on loopback, so an httpcore
that moves them fails there.
"""

from __future__ import annotations

import os
import re
import ssl
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import httpcore
import httpx

from jobs.http_environment import proxy_variables

#: SOCKS replies that say the proxy could not reach the target (RFC 1928 §6): an outage, as an
#: HTTP proxy's 502 is (httpcore: ``Proxy Server could not connect: <reply>.``).
_SOCKS_UNREACHED = re.compile(
    r"could not connect: (General SOCKS server failure|Network unreachable|Host unreachable|"
    r"Connection refused|TTL expired)",
    re.IGNORECASE,
)
#: httpcore's SOCKS words for credentials refused or wanted.
_SOCKS_AUTH = re.compile(r"username/password|Requested .* from proxy server", re.IGNORECASE)
#: An HTTP proxy's answer to CONNECT, as httpcore words it: ``407 Proxy Authentication Required``.
_CONNECT_ANSWER = re.compile(r"^(\d{3})\b\s*(.*)$")
#: What a name that does not resolve says (glibc's, and :func:`worker.fal.http.resolve`'s).
_UNRESOLVED = re.compile(
    r"Name or service not known|nodename nor servname|Temporary failure in name resolution|"
    r"No address associated|name lookup of .* (failed|answered no address)|getaddrinfo failed",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class ProxyFailure:
    """A request that failed at, or because of, the proxy it went through.

    ``address``: the proxy's ``host:port``; ``variable``: the variable that names it
    (``HTTPS_PROXY``…), ``""`` when none matches; ``stage``: ``"connect"`` (the proxy itself
    could not be reached), ``"answer"`` (it answered the tunnel with ``status``) or ``"socks"``
    (a SOCKS proxy's refusal); ``status``: the HTTP status it answered (0 for none);
    ``words``: the rest of what was said (a reason phrase, the error)."""

    address: str
    variable: str
    stage: str
    status: int
    words: str

    @property
    def named(self) -> str:
        """``the proxy 127.0.0.1:3128 (HTTPS_PROXY)``: which proxy, never its credentials."""
        via = f" ({self.variable})" if self.variable else ""
        return f"the proxy {self.address}{via}"

    @property
    def auth(self) -> bool:
        """The proxy wants credentials, or refused those given (HTTP 407, SOCKS auth)."""
        return self.status == 407 or (self.stage == "socks" and bool(_SOCKS_AUTH.search(self.words)))

    @property
    def outage(self) -> bool:
        """What waiting may clear: the proxy cannot be reached, or says it cannot reach the target
        (5xx, a SOCKS "host unreachable"). Not its refusal (407, 403: a setting or a policy)."""
        if self.stage == "connect":
            return True
        if self.stage == "socks":
            return bool(_SOCKS_UNREACHED.search(self.words))
        return self.status >= 500

    def describe(self, target: str = "fal") -> str:
        """One line (short: a hold's record keeps 200 characters): which proxy, what it did,
        and, for a refusal, what to set."""
        if self.stage == "connect":
            text = self.words.partition(": ")[2] or self.words
            if _UNRESOLVED.search(self.words):
                return f"{self.named}: its name does not resolve ({text})"
            if "refused" in self.words.lower():
                return f"{self.named} refused the connection ({text})"
            if self.words.startswith("ConnectTimeout"):
                return f"{self.named} did not answer the connection in time ({text})"
            return f"{self.named} could not be reached ({self.words})"
        if self.auth:
            said = f"answered {self.status} {self.words}".rstrip() if self.status else f"said {self.words!r}"
            return f"{self.named} {said}: set its user:password in {self.variable or 'the proxy variable'}"
        if self.stage == "socks":
            return f"{self.named} could not open the way to {target}: {self.words}"
        answered = f"answered {self.status} {self.words}".rstrip()
        if self.status >= 500:
            return f"{self.named} {answered}: it could not reach {target}"
        return f"{self.named} {answered} to the tunnel to {target}: its policy refuses it"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and contexts, each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _proxy_frames(exc: BaseException) -> tuple[httpcore.Origin | None, bool]:
    """The proxy origin of the proxy connection whose frame ``exc`` (or a cause) went up
    through, and whether it failed within that connection's ``connect_tcp`` (to the proxy)."""
    for link in _chain(exc):
        origin: httpcore.Origin | None = None
        connecting = False
        for frame, _line in traceback.walk_tb(link.__traceback__):
            if origin is None:
                found = getattr(frame.f_locals.get("self"), "_proxy_origin", None)
                if isinstance(found, httpcore.Origin):
                    origin = found
            elif frame.f_code.co_name == "connect_tcp":
                connecting = True
        if origin is not None:
            return origin, connecting
    return None, False


def _address(origin: httpcore.Origin) -> str:
    host = origin.host.decode("ascii", "replace")
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{origin.port}"


def _variable(origin: httpcore.Origin, target_scheme: str, environ: Mapping[str, str]) -> str:
    """The variable that names this proxy for a ``target_scheme`` URL, as httpx mounts them
    (the scheme's own, else ``ALL_PROXY``), when its host and port are the origin's."""
    found = proxy_variables(environ)
    for kind in (target_scheme, "all"):
        if kind not in found:
            continue
        name, value = found[kind]
        try:
            url = httpx.URL(value if "://" in value else f"http://{value}")
        except Exception:  # the settings refuse such a value; a message names no variable then
            return ""
        port = url.port or {"http": 80, "https": 443, "socks5": 1080, "socks5h": 1080}.get(url.scheme)
        if url.host.encode("ascii", "replace") == origin.host and port == origin.port:
            return name
        return ""
    return ""


def _target(exc: BaseException) -> httpx.URL | None:
    for link in _chain(exc):
        if isinstance(link, httpx.RequestError):
            try:
                return link.request.url
            except RuntimeError:  # no request attached
                continue
    return None


def proxy_failure(exc: BaseException, environ: Mapping[str, str] | None = None) -> ProxyFailure | None:
    """The proxy at fault in ``exc`` (an httpx transport error), or None when the request went
    through no proxy, or failed beyond it (fal's own TLS through the tunnel, a reset after)."""
    origin, connecting = _proxy_frames(exc)
    if origin is None:
        return None
    target = _target(exc)
    env = os.environ if environ is None else environ
    variable = _variable(origin, target.scheme if target is not None else "https", env)
    address = _address(origin)
    text = " ".join(str(exc).split())
    if isinstance(exc, httpx.ProxyError):
        answer = _CONNECT_ANSWER.match(text)
        if answer is not None:
            return ProxyFailure(address, variable, "answer", int(answer[1]), answer[2][:120])
        return ProxyFailure(address, variable, "socks", 0, text[:200])
    if connecting and isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return ProxyFailure(address, variable, "connect", 0, said[:200])
    return None


def target_of(exc: BaseException) -> str:
    """``host:port`` of the URL ``exc`` failed on (for "it could not reach …"), else ``fal``."""
    url = _target(exc)
    if url is None:
        return "fal"
    port = url.port or {"http": 80, "https": 443}.get(url.scheme)
    return f"{url.host}:{port}" if port else url.host


# ------------------------------------------------------------------ certificates


def certificate_refused(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure in ``exc``'s causes, if that is what it is."""
    for link in _chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError):
            return link
    return None


def ca_bundle(environ: Mapping[str, str] | None = None) -> str:
    """The CA certificates TLS trusts here, as the clients are built
    (:func:`worker.fal.http._build_ssl_context`): ``SSL_CERT_FILE (/path)``, else
    ``SSL_CERT_DIR (/path)``, else certifi's bundle."""
    env = os.environ if environ is None else environ
    if env.get("SSL_CERT_FILE"):
        return f"SSL_CERT_FILE ({env['SSL_CERT_FILE']})"
    if env.get("SSL_CERT_DIR"):
        return f"SSL_CERT_DIR ({env['SSL_CERT_DIR']})"
    try:
        import certifi

        return f"certifi's CA bundle ({certifi.where()}; SSL_CERT_FILE unset)"
    except ImportError:  # pragma: no cover - httpx depends on certifi
        return "the default CA bundle (SSL_CERT_FILE unset)"


def certificate_words(exc: BaseException, environ: Mapping[str, str] | None = None) -> str | None:
    """One line for a certificate that did not verify, naming the CA bundle it was checked
    against and what to set; None when ``exc`` is no such failure."""
    refused = certificate_refused(exc)
    if refused is None:
        return None
    reason = (
        getattr(refused, "verify_message", None)
        or getattr(refused, "reason", None)
        or "certificate verify failed"
    )
    env = os.environ if environ is None else environ
    proxied = bool(proxy_variables(env))
    hint = (
        "a proxy that re-signs TLS needs its CA certificate there: point SSL_CERT_FILE at a "
        "PEM bundle that holds it"
        if proxied
        else "point SSL_CERT_FILE at a PEM bundle that holds the CA which signed it"
    )
    return f"certificate verification failed ({reason}) against {ca_bundle(env)}: {hint}"


#: The words every line above starts its cause with (:meth:`ProxyFailure.describe`,
#: :func:`certificate_words`): :func:`setting_fix` finds the setting at fault by them in a line
#: kept as text (the receiver's last fetch error, a check's detail).
PROXY_WORDS = "the proxy "
CERTIFICATE_WORDS = "certificate verification failed"


def setting_fix(error: str, what: str = "the request") -> str | None:
    """What to fix when ``error`` (a line made with :func:`proxy_failure` or
    :func:`certificate_words`) blames a setting other than the URL: the proxy or the CA bundle;
    None otherwise (the URL, the network, the server are as likely). ``what``: what went
    through it (``fal's queue``, ``the key fetch``)."""
    if CERTIFICATE_WORDS in error:
        return (
            f"point SSL_CERT_FILE at a PEM bundle holding the CA that signed the certificate of "
            f"{what} (a proxy that re-signs TLS: its CA), on every host that reaches it"
        )
    at = error.find(PROXY_WORDS)
    if at < 0:
        return None
    if "user:password" in error[at:]:
        return f"set the proxy's user:password in the variable named above ({what} goes through it)"
    return (
        f"fix the proxy named above, or the variable naming it, not the URL ({what} goes through "
        "it); a host to reach without a proxy goes in NO_PROXY"
    )
