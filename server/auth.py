"""Who is calling, and may they? Authentication and the policy file (config/policy.toml).

    >>> policy = load_policy()
    >>> metro = policy.caller("metro_gateway")
    >>> metro.may_call("EligibilityService/Check"), metro.may_decide("medical_pay_later")
    (True, False)

Three modes (ServerConfig.security):

* ``mtls`` (production): the identity is the verified client certificate's name
  (server/tls.py); a call without one never gets past the TLS handshake.
* ``token`` (development): ``authorization: Bearer <token>`` metadata, tokens mapped to
  identities by a TOML file (``<token> = "<identity>"``) that lives outside the repo.
* ``insecure``: nobody is authenticated and everything is allowed, as ``insecure-dev``. Only
  on a loopback address, and the server says so loudly at start.

UNAUTHENTICATED (no valid identity) and PERMISSION_DENIED (an identity the policy does not
allow) are distinct, and both are decided before any person is looked up, so neither tells
whether a person exists.
"""

from __future__ import annotations

import contextvars
import hmac
import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import PermissionDenied, Unauthenticated

DEFAULT_POLICY_PATH = Path(__file__).resolve().parent.parent / "config" / "policy.toml"

#: Always reachable without an identity: load balancers and tooling need them, and they
#: disclose nothing about a person.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

INSECURE_IDENTITY = "insecure-dev"


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Caller:
    identity: str
    methods: frozenset[str] = frozenset()
    scenarios: frozenset[str] = frozenset()
    variables: frozenset[str] = frozenset()
    unrestricted: bool = False  # the insecure development mode only

    def may_call(self, method: str) -> bool:
        """``method`` is "Service/Method" without the package."""
        if self.unrestricted:
            return True
        service = method.split("/", 1)[0]
        return method in self.methods or f"{service}/*" in self.methods

    def may_decide(self, scenario: str) -> bool:
        return self.unrestricted or scenario in self.scenarios

    def may_write(self, variable: str) -> bool:
        return self.unrestricted or variable in self.variables

    def check_scenario(self, scenario: str) -> None:
        if not self.may_decide(scenario):
            raise PermissionDenied(f"{self.identity} may not decide scenario {scenario!r}")

    def check_variable(self, variable: str) -> None:
        if not self.may_write(variable):
            raise PermissionDenied(f"{self.identity} may not write {variable!r} records")


INSECURE_CALLER = Caller(INSECURE_IDENTITY, unrestricted=True)


@dataclass
class Policy:
    callers: dict[str, Caller] = field(default_factory=dict)

    def caller(self, identity: str) -> Caller:
        """The identity's grants; an identity the policy does not know may do nothing."""
        return self.callers.get(identity) or Caller(identity)


def load_policy(path: str | Path | None = None) -> Policy:
    path = Path(path) if path else DEFAULT_POLICY_PATH
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    callers = {}
    extra = set(doc) - {"callers"}
    if extra:
        raise PolicyError(f"{path.name}: unknown top-level key {sorted(extra)[0]!r}")
    for identity, grants in doc.get("callers", {}).items():
        where = f"{path.name}: callers.{identity}"
        if not isinstance(grants, dict):
            raise PolicyError(f"{where}: expected a table")
        unknown = set(grants) - {"methods", "scenarios", "variables", "description"}
        if unknown:
            raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown key")
        lists = {}
        for key in ("methods", "scenarios", "variables"):
            value = grants.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise PolicyError(f"{where}.{key}: expected a list of names")
            lists[key] = frozenset(value)
        for m in lists["methods"]:
            if "/" not in m:
                raise PolicyError(f"{where}.methods: {m!r} is not 'Service/Method' or 'Service/*'")
        callers[identity] = Caller(identity, lists["methods"], lists["scenarios"], lists["variables"])
    return Policy(callers)


def load_tokens(path: str | Path) -> dict[str, str]:
    """Development bearer tokens: a TOML file of ``"<token>" = "<identity>"``."""
    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    tokens = {}
    for token, identity in doc.items():
        if not isinstance(identity, str) or len(token) < 16:
            raise PolicyError(f"{path}: each entry is '<token of 16+ characters>' = '<identity>'")
        tokens[token] = identity
    return tokens


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("qianjiang_caller", default=INSECURE_CALLER)


def current_caller() -> Caller:
    """The authenticated caller of the call being handled (set by the interceptor)."""
    return _current.get()


def set_current_caller(caller: Caller) -> None:
    _current.set(caller)


class Authenticator:
    """Turns a call's credentials into a Caller with its grants."""

    def __init__(self, mode: str, policy: Policy, tokens: dict[str, str] | None = None, identity_of=None):
        if mode not in ("insecure", "token", "mtls"):
            raise ValueError(f"security mode {mode!r}: expected insecure, token or mtls")
        if mode == "token" and not tokens:
            raise ValueError("token mode needs a tokens file")
        self.mode, self.policy, self.tokens = mode, policy, tokens or {}
        self._identity_of = identity_of  # mtls: context -> identity (server/tls.py)

    def authenticate(self, context) -> Caller:
        if self.mode == "insecure":
            return INSECURE_CALLER
        if self.mode == "mtls":
            identity = self._identity_of(context) if self._identity_of else None
            if identity:
                return self.policy.caller(identity)
            raise Unauthenticated("no verified client certificate")
        for key, value in context.invocation_metadata():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise Unauthenticated("authorization must be 'Bearer <token>'")
                for known, identity in self.tokens.items():
                    if hmac.compare_digest(known.encode(), token.encode()):
                        return self.policy.caller(identity)
                raise Unauthenticated("unknown bearer token")
        raise Unauthenticated("no bearer token")
