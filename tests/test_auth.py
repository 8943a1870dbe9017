"""Access control with MONAI Label's authentication on, against a real server over HTTP.

A minimal Keycloak-style realm runs on loopback inside the test (:class:`Issuer`): the
realm JSON with its RSA ``public_key`` (what MONAI Label fetches from
``MONAI_LABEL_AUTH_REALM_URI``), the OpenID configuration, its JWKS and a password-grant
token endpoint. Its key is generated here and the tokens are signed with it. The server
is started with ``MONAI_LABEL_AUTH_ENABLE=true`` pointing at it; then requests without a
token, with bad ones and with too few roles are refused (401/403) and change nothing, and
valid annotator and admin tokens do what their roles allow.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from conftest import Server, sha256, snapshot

REALM = "spine-test"
CLIENT_ID = "monailabel-app"
USER, ANNOTATOR, REVIEWER, ADMIN = "monailabel-user", "monailabel-annotator", "monailabel-reviewer", "monailabel-admin"
#: roles as Keycloak puts them in a token when each role is a composite of the ones below it
ROLES = {"viewer": [USER], "annotator": [ANNOTATOR, USER], "admin": [ADMIN, REVIEWER, ANNOTATOR, USER]}
PASSWORDS = {"viewer": "v-pass", "annotator": "a-pass", "admin": "adm-pass"}
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """A Keycloak-like realm on a loopback port, signing tokens with its own RSA key."""

    def __init__(self):
        self.key = new_key()
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.fetches = []  # paths the server fetched
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                issuer.fetches.append(self.path)
                documents = {issuer.path: issuer.realm_json(), f"{issuer.path}/.well-known/openid-configuration":
                             issuer.openid_configuration(), f"{issuer.path}/protocol/openid-connect/certs": issuer.jwks()}
                self._answer(200, documents[self.path]) if self.path in documents else self._answer(404, {})

            def do_POST(self):
                if self.path != f"{issuer.path}/protocol/openid-connect/token":
                    return self._answer(404, {})
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                user, password = form.get("username", [""])[0], form.get("password", [""])[0]
                if form.get("grant_type") != ["password"] or PASSWORDS.get(user) != password:
                    return self._answer(401, {"error": "invalid_grant"})
                self._answer(200, {"access_token": issuer.token(user), "token_type": "Bearer", "expires_in": 300})

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"
        self.path = f"/realms/{REALM}"
        self.realm_uri = self.base + self.path
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def realm_json(self) -> dict:
        body = b"".join(self.public_pem.strip().splitlines()[1:-1]).decode()  # PEM body, as Keycloak sends it
        return {"realm": REALM, "public_key": body, "token-service": f"{self.realm_uri}/protocol/openid-connect",
                "account-service": f"{self.realm_uri}/account", "tokens-not-before": 0}

    def openid_configuration(self) -> dict:
        return {"issuer": self.realm_uri, "token_endpoint": f"{self.realm_uri}/protocol/openid-connect/token",
                "jwks_uri": f"{self.realm_uri}/protocol/openid-connect/certs",
                "id_token_signing_alg_values_supported": ["RS256"]}

    def jwks(self) -> dict:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": "test", "use": "sig", "alg": "RS256"}]}

    def claims(self, user: str, roles=None, expires_in: float = 300) -> dict:
        now = int(time.time())
        return {"preferred_username": user, "email": f"{user}@example.org", "name": user.title(),
                "realm_access": {"roles": ROLES.get(user, []) if roles is None else roles},
                "iat": now, "exp": now + expires_in, "iss": self.realm_uri, "aud": "account", "azp": CLIENT_ID}

    def token(self, user: str, roles=None, expires_in: float = 300, key=None, algorithm: str = "RS256") -> str:
        return jwt.encode(self.claims(user, roles, expires_in), key or self.key, algorithm=algorithm,
                          headers={"kid": "test"})

    def stop(self):
        self.httpd.shutdown()


def hs256_with_public_key(issuer: Issuer) -> str:
    """The algorithm-confusion attack: an HMAC token keyed with the (public) realm key."""
    header, payload = b64url(b'{"alg":"HS256","typ":"JWT"}'), b64url(json.dumps(issuer.claims("admin")).encode())
    signature = hmac.new(issuer.public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


class AuthServer(Server):
    """The real server; ready when its public ``/auth/`` answers (``/info/`` needs a token now)."""

    def wait_ready(self, timeout: float = 180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/auth/", timeout=5).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-4000:]}")


@contextlib.contextmanager
def environment(**variables):
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def nifti(path: Path, array: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from lib.pipeline.networks import build_network
    from lib.pipeline.plans import SpinePlan

    root = tmp_path_factory.mktemp("auth")
    studies, model_dir = root / "studies", root / "model"
    (studies / "labels" / "final").mkdir(parents=True)
    model_dir.mkdir()
    rng = np.random.default_rng(0)
    for image_id in ("scan_a", "scan_b"):
        nifti(studies / f"{image_id}.nii.gz", rng.normal(300, 50, (40, 40, 20)).astype(np.int16))
    label = np.zeros((40, 40, 20), np.uint8)
    label[10:20, 10:20, 5:10] = 1
    nifti(studies / "labels" / "final" / "scan_a.nii.gz", label)
    torch.save(build_network(SpinePlan.from_conf({"preset": "tiny"})).state_dict(), model_dir / "spine.pt")
    issuer = Issuer()
    with environment(MONAI_LABEL_AUTH_ENABLE="true", MONAI_LABEL_AUTH_REALM_URI=issuer.realm_uri,
                     MONAI_LABEL_AUTH_CLIENT_ID=CLIENT_ID, MONAI_LABEL_AUTH_TIMEOUT="5"):
        server = AuthServer(studies, model_dir, workdir=root)
    files = {"label": (studies / "labels" / "final" / "scan_a.nii.gz").read_bytes(),
             "image": (studies / "scan_b.nii.gz").read_bytes(), "model": (model_dir / "spine.pt").read_bytes()}
    yield {"server": server, "issuer": issuer, "studies": studies, "model_dir": model_dir, "files": files}
    server.stop()
    issuer.stop()


def act(site, action: str, token: str | None = None, scheme: str = "Bearer") -> requests.Response:
    """One protected action over HTTP, with ``token`` (or none)."""
    url, files = site["server"].url, site["files"]
    headers = {"Authorization": f"{scheme} {token}"} if token else {}
    calls = {  # action -> (method, path, keyword arguments of requests.request)
        "info": ("GET", "/info/", {}),
        "list images": ("GET", "/datastore/", {"params": {"output": "all"}}),
        "infer": ("POST", "/infer/spine", {"params": {"image": "scan_b", "output": "json"}}),
        "save label": ("PUT", "/datastore/label", {"params": {"image": "scan_a", "tag": "final"},
                                                    "files": {"label": ("scan_a.nii.gz", files["label"])}}),
        "upload image": ("PUT", "/datastore/", {"params": {"image": "scan_new"},
                                                "files": {"file": ("scan_new.nii.gz", files["image"])}}),
        "delete image": ("DELETE", "/datastore/image", {"params": {"id": "scan_new"}}),
        "start training": ("POST", "/train/spine", {"json": {}}),
        "download model": ("GET", "/model/spine", {}),
        "upload model": ("PUT", "/model/spine", {"files": {"file": ("spine.pt", files["model"])}}),
        "delete model": ("DELETE", "/model/spine", {}),
        "reload app": ("POST", "/reload", {}),
    }
    method, path, kwargs = calls[action]
    return requests.request(method, url + path, headers=headers, timeout=300, **kwargs)


EVERY_ACTION = ["info", "list images", "infer", "save label", "upload image", "delete image", "start training",
                "download model", "upload model", "delete model", "reload app"]
WRITES = ["save label", "upload image", "delete image", "start training", "upload model", "delete model",
          "reload app"]


def state(site) -> dict:
    """Images, labels and model files (not the datastore index, which a background scoring may rewrite)."""
    studies = {k: v for k, v in snapshot(site["studies"]).items() if k != "datastore_v2.json"}
    return {**studies, **{f"model/{k}": v for k, v in snapshot(site["model_dir"]).items()}}


def test_auth_is_announced_and_the_realm_key_is_fetched(site):
    r = requests.get(f"{site['server'].url}/auth/", timeout=30)
    assert r.status_code == 200 and r.json() == {"enabled": True, "client_id": CLIENT_ID, "realm": site["issuer"].realm_uri}
    assert act(site, "info", site["issuer"].token("viewer")).status_code == 200
    assert site["issuer"].path in site["issuer"].fetches


def test_without_a_token_everything_is_refused(site):
    before = state(site)
    for action in EVERY_ACTION:
        r = act(site, action)
        assert r.status_code == 401, (action, r.status_code, r.text[:200])
        assert r.headers.get("WWW-Authenticate") == "Bearer", action
    assert state(site) == before


BAD_TOKENS = {
    "garbage": lambda issuer: "not.a.token",
    "foreign key": lambda issuer: issuer.token("admin", key=new_key()),
    "expired": lambda issuer: issuer.token("admin", expires_in=-120),
    "no expiry": lambda issuer: jwt.encode({k: v for k, v in issuer.claims("admin").items() if k != "exp"},
                                           issuer.key, algorithm="RS256"),
    "alg none": lambda issuer: jwt.encode(issuer.claims("admin"), None, algorithm="none"),
    "hs256 keyed with the public key": hs256_with_public_key,
    "tampered roles": lambda issuer: tamper(issuer.token("viewer"), ROLES["admin"]),
}


def tamper(token: str, roles) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["realm_access"]["roles"] = roles
    return ".".join([header, b64url(json.dumps(claims).encode()), signature])


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
def test_bad_tokens_are_refused(site, kind):
    token = BAD_TOKENS[kind](site["issuer"])
    before = state(site)
    for action in EVERY_ACTION:
        r = act(site, action, token)
        assert r.status_code == 401, (kind, action, r.status_code, r.text[:200])
    assert state(site) == before


def test_a_token_sent_with_another_scheme_is_refused(site):
    r = act(site, "save label", site["issuer"].token("admin"), scheme="Basic")
    assert r.status_code == 401, r.text


@pytest.mark.parametrize("user,refused", [
    ("viewer", WRITES + ["download model"]),
    ("annotator", ["delete image", "start training", "download model", "upload model", "delete model", "reload app"]),
    ("nobody", EVERY_ACTION),  # signed and valid, but no role at all
])
def test_missing_roles_are_refused(site, user, refused):
    token = site["issuer"].token(user, roles=[] if user == "nobody" else None)
    before = state(site)
    for action in refused:
        r = act(site, action, token)
        assert r.status_code == 403, (user, action, r.status_code, r.text[:200])
        assert "is required" in r.json()["detail"]
    assert state(site) == before


def test_viewer_may_read_and_infer(site):
    token = site["issuer"].token("viewer")
    for action in ("info", "list images", "infer"):
        r = act(site, action, token)
        assert r.status_code == 200, (action, r.status_code, r.text[:200])
    assert "model_version" in act(site, "infer", token).json()


def test_annotator_saves_labels_and_uploads_images(site):
    token, label_path = site["issuer"].token("annotator"), site["studies"] / "labels" / "final" / "scan_a.nii.gz"
    label_before = np.asanyarray(nib.load(label_path).dataobj).copy()
    r = act(site, "save label", token)
    assert r.status_code == 200, r.text[:300]
    assert np.array_equal(np.asanyarray(nib.load(label_path).dataobj), label_before)
    r = act(site, "upload image", token)
    assert r.status_code == 200, r.text[:300]
    assert sha256((site["studies"] / "scan_new.nii.gz").read_bytes()) == sha256(site["files"]["image"])


def test_admin_manages_models_images_and_training(site):
    token, weights = site["issuer"].token("admin"), site["model_dir"] / "spine.pt"
    r = act(site, "download model", token)
    assert r.status_code == 200 and sha256(r.content) == sha256(weights.read_bytes())  # no diff of MBs on failure
    r = act(site, "upload model", token)  # the same weights again: allowed, nothing changes
    assert r.status_code == 200, r.text[:300]
    assert sha256(weights.read_bytes()) == sha256(site["files"]["model"])
    if not (site["studies"] / "scan_new.nii.gz").exists():
        assert act(site, "upload image", token).status_code == 200
    r = act(site, "delete image", token)
    assert r.status_code == 200, r.text[:300]
    assert not (site["studies"] / "scan_new.nii.gz").exists()
    r = act(site, "start training", token)
    assert r.status_code == 200, r.text[:300]
    status = wait_for_training(site["server"].url, token)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))


def wait_for_training(url: str, token: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", params={"check_if_running": "false"},
                              headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        if status and status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(2)
    raise TimeoutError(f"training still running after {timeout} s")


def test_login_through_the_server_gives_a_working_token(site):
    """Slicer's flow: ``POST /auth/token`` (the server asks the realm's token endpoint) then use the token."""
    url = site["server"].url
    r = requests.post(f"{url}/auth/token", data={"username": "annotator", "password": PASSWORDS["annotator"]}, timeout=30)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    me = requests.get(f"{url}/auth/token/valid", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert me.status_code == 200 and me.json()["username"] == "annotator" and ANNOTATOR in me.json()["roles"]
    assert act(site, "list images", token).status_code == 200


def test_an_unreachable_realm_is_503_not_500(monkeypatch):
    """The middleware alone (the server's realm key is cached once fetched): no key, no guess."""
    import asyncio

    from monailabel.config import settings

    from conftest import free_port
    from lib.server.auth import AccessControl

    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_REALM_URI", f"http://127.0.0.1:{free_port()}/realms/gone")
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_TIMEOUT", 2)
    sent = []

    async def app(scope, receive, send):
        raise AssertionError("a request without a checked token must not reach the app")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/info/", "headers": [(b"authorization", b"Bearer a.b.c")]}
    asyncio.run(AccessControl(app)(scope, None, send))
    assert sent[0]["status"] == 503
    assert "cannot fetch the public key" in json.loads(sent[1]["body"])["detail"]
