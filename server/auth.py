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

Roles. Every caller of the policy has a ``role``: ``citizen_app`` (a citizen's own score,
reasons, consent and audit), ``partner`` (eligibility decisions for its scenarios: never a
score), ``source`` (records of the variables whose spec source is the caller itself) or
``operator`` (a deliberate exception, with a ``description`` saying why). A grant of a method
that discloses scores or the audit log (:data:`DISCLOSING`) to anyone but a citizen app or an
operator is refused when the policy loads, and so is a method, scenario or variable that does
not exist, or a variable granted to another caller than its spec source (:func:`check_policy`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import hmac
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.config_files import DEFAULT_CONFIG_DIR, read_toml
from server.errors import DeadlineExceeded, PermissionDenied, Unauthenticated

DEFAULT_POLICY_PATH = DEFAULT_CONFIG_DIR / "policy.toml"

#: Always reachable without an identity: load balancers and tooling need them, and they
#: disclose nothing about a person.
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

INSECURE_IDENTITY = "insecure-dev"


class PolicyError(ValueError):
    pass


ROLES = ("citizen_app", "partner", "source", "operator")

#: Methods that disclose a person's score or who checked them: only a citizen app (for the
#: citizen it serves) or an operator marked as such may be granted them.
DISCLOSING = frozenset({
    "ScoreService/GetScore", "ScoreService/ExplainScore", "ScoreService/BatchGetScores",
    "ScoreService/SimulateScore", "AuditService/ListChecks", "AuditService/ReplayDecision",
})


def _known_methods() -> dict[str, frozenset[str]]:
    """Every service of the contract and its methods, from the generated descriptors."""
    from qianjiang.v1 import audit_pb2, eligibility_pb2, gate_pb2, records_pb2, rights_pb2, score_pb2

    out = {}
    for module in (score_pb2, eligibility_pb2, records_pb2, audit_pb2, rights_pb2, gate_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out[service.name] = frozenset(m.name for m in service.methods)
    return out


@dataclass(frozen=True)
class Caller:
    identity: str
    methods: frozenset[str] = frozenset()
    scenarios: frozenset[str] = frozenset()
    variables: frozenset[str] = frozenset()
    unrestricted: bool = False  # the insecure development mode only
    role: str = "partner"
    #: The end user a citizen app's call is bound to (server/end_user.py); None: not bound.
    citizen: str | None = None

    @property
    def audit_name(self) -> str:
        """Who asked, as the audit log keeps it: the caller, and ``+citizen`` when the call
        was bound to its end user, who is then the entry's subject (convert.check_entry)."""
        return f"{self.identity}{BY_THE_CITIZEN}" if self.citizen is not None else self.identity

    def check_citizen(self, citizen_id: str) -> None:
        """A citizen app reads and changes only the citizen its call is bound to."""
        if self.role == "citizen_app" and not self.unrestricted and self.citizen != citizen_id:
            raise PermissionDenied(f"{self.identity}'s call is bound to another citizen than the one it names")

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

#: The audit log's mark of a call a citizen app made bound to its end user (Caller.audit_name).
BY_THE_CITIZEN = "+citizen"

#: What a citizen app may call without naming its end user: nothing about a person.
UNBOUND_METHODS = frozenset({"EligibilityService/ListScenarios"})


@dataclass
class Policy:
    callers: dict[str, Caller] = field(default_factory=dict)

    def caller(self, identity: str) -> Caller:
        """The identity's grants; an identity the policy does not know may do nothing."""
        return self.callers.get(identity) or Caller(identity)


def load_policy(path: str | Path | None = None) -> Policy:
    path, doc = read_toml(path, DEFAULT_POLICY_PATH, PolicyError)
    callers = {}
    extra = set(doc) - {"callers"}
    if extra:
        raise PolicyError(f"{path.name}: unknown top-level key {sorted(extra)[0]!r}")
    for identity, grants in doc.get("callers", {}).items():
        where = f"{path.name}: callers.{identity}"
        if not isinstance(grants, dict):
            raise PolicyError(f"{where}: expected a table")
        unknown = set(grants) - {"role", "methods", "scenarios", "variables", "description"}
        if unknown:
            raise PolicyError(f"{where}.{sorted(unknown)[0]}: unknown key")
        role = grants.get("role")
        if role not in ROLES:
            raise PolicyError(f"{where}.role: expected one of {', '.join(ROLES)}, got {role!r}")
        if role == "operator" and not str(grants.get("description", "")).strip():
            raise PolicyError(f"{where}.description: an operator role is an exception: say why it is granted")
        lists = {}
        for key in ("methods", "scenarios", "variables"):
            value = grants.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise PolicyError(f"{where}.{key}: expected a list of names")
            lists[key] = frozenset(value)
        known = _known_methods()
        for m in sorted(lists["methods"]):
            service, _, method = m.partition("/")
            if service not in known or (method != "*" and method not in known[service]):
                raise PolicyError(f"{where}.methods: {m!r} is not a method of the contract ('Service/Method' or 'Service/*')")
            disclosing = sorted(d for d in DISCLOSING if d == m or (method == "*" and d.startswith(f"{service}/")))
            if disclosing and role not in ("citizen_app", "operator"):
                raise PolicyError(
                    f"{where}.methods: {m!r} discloses scores or the audit log ({', '.join(disclosing)}); a {role} "
                    "gets decisions only (grant it to a citizen app, or mark an operator role on purpose)"
                )
        callers[identity] = Caller(identity, lists["methods"], lists["scenarios"], lists["variables"], role=role)
    return Policy(callers)


def check_policy(policy: Policy, variable_sources: dict[str, str], scenarios, where: str = "policy.toml") -> None:
    """The policy against the model spec and the scenarios it serves: every granted scenario
    is configured, every granted variable exists and is granted only to the caller the spec
    names as its source (so a source cannot write another's record type). PolicyError names
    the file, the caller and the value."""
    for identity, caller in sorted(policy.callers.items()):
        at = f"{where}: callers.{identity}"
        for scenario in sorted(caller.scenarios):
            if scenario not in scenarios:
                raise PolicyError(f"{at}.scenarios: {scenario!r} is not a configured scenario")
        for variable in sorted(caller.variables):
            source = variable_sources.get(variable)
            if source is None:
                raise PolicyError(f"{at}.variables: {variable!r} is not a variable of the model")
            if source != identity:
                raise PolicyError(
                    f"{at}.variables: {variable!r} comes from source {source!r} in the model spec, not from {identity!r}"
                )
    for variable, source in variable_sources.items():  # and the other way: every record type has its writer
        writer = policy.callers.get(source)
        if writer is None or variable not in writer.variables:
            raise PolicyError(
                f"{where}: the model's variable {variable!r} comes from source {source!r}, which the policy does not let "
                f"write it: add {variable!r} to callers.{source}.variables"
                + ("" if writer is not None else f" (there is no [callers.{source}]; a source's identity is its caller name)")
            )


def load_tokens(path: str | Path) -> dict[str, str]:
    """Development bearer tokens: a TOML file of ``"<token>" = "<identity>"``."""
    path, doc = read_toml(path, None, PolicyError)
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


#: When the call being handled stops being worth answering (time.monotonic(); None: never).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("qianjiang_deadline", default=None)


def set_call_deadline(remaining: float | None) -> None:
    """The interceptor: the call must be answered within ``remaining`` seconds (None: no
    bound). Travels with the call into the threads it is offloaded to (servicers.py)."""
    _deadline.set(None if remaining is None else time.monotonic() + remaining)


def check_call_deadline() -> None:
    """Right before a disclosure is audited: a call whose deadline has passed gets no answer,
    so nothing is disclosed and nothing is audited (DeadlineExceeded)."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(started=True)


class Authenticator:
    """Turns a call's credentials into a Caller with its grants."""

    def __init__(self, mode: str, policy: Policy, tokens: dict[str, str] | None = None, identity_of=None,
                 end_user_keys: dict | None = None):
        if mode not in ("insecure", "token", "mtls"):
            raise ValueError(f"security mode {mode!r}: expected insecure, token or mtls")
        if mode == "token" and not tokens:
            raise ValueError("token mode needs a tokens file")
        self.mode, self.policy, self.tokens = mode, policy, tokens or {}
        self._identity_of = identity_of  # mtls: context -> identity (server/tls.py)
        self.end_user_keys = end_user_keys or {}  # citizen app identity -> Ed25519 public key

    def bind(self, caller: Caller, method: str, context) -> Caller:
        """A citizen app's call about a person carries the end user it authenticated, signed
        with its key (server/end_user.py): the caller, bound to that citizen. Other roles,
        and the insecure development mode, are returned as they are."""
        if caller.role != "citizen_app" or caller.unrestricted or method in UNBOUND_METHODS:
            return caller
        from server.end_user import METADATA_KEY, verify_assertion

        headers = [value for key, value in context.invocation_metadata() if key == METADATA_KEY]
        if len(headers) != 1:
            raise Unauthenticated(f"{caller.identity} calls {method} for a citizen: send the end user it authenticated "
                                  f"as one {METADATA_KEY} header, signed with its key" if not headers else
                                  f"{METADATA_KEY}: sent {len(headers)} times; a call is bound to one citizen")
        citizen = verify_assertion(headers[0], self.end_user_keys, caller.identity)
        return dataclasses.replace(caller, citizen=citizen)

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
