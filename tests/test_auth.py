"""The auth file: its format, bearer parsing, roles, and rotation without a restart.

Reloads are made deterministic with check_interval=0 (every call looks at the file) and
os.utime pushing mtime forward, so no test sleeps."""

import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

import tidegate.auth as auth_module
from tidegate.auth import AuthFile, Principal, Role, hash_token, new_token, parse_auth_file
from tidegate.errors import ConfigError, Forbidden, Unauthorized

READER_TOKEN = "reader-token-0123456789"
OPERATOR_TOKEN = "operator-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789"


def _entry(name: str, token: str, roles: list[str]) -> str:
    quoted = ", ".join(f'"{role}"' for role in roles)
    return f'[tokens.{name}]\nsha256 = "{hash_token(token)}"\nroles = [{quoted}]\n\n'


def _write(path: Path, text: str) -> Path:
    """Writes `text` and moves mtime a second past the previous one, so a change is seen
    even on a filesystem whose timestamps are coarser than the test is fast."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text, encoding="utf-8")
    later = max(path.stat().st_mtime_ns, before + 1_000_000_000)
    os.utime(path, ns=(later, later))
    return path


def _standard(path: Path) -> Path:
    return _write(
        path,
        "# tidegate auth file\n"
        + _entry("dashboard", READER_TOKEN, ["reader"])
        + _entry("ci-deployer", OPERATOR_TOKEN, ["operator", "reader"])
        + _entry("root", ADMIN_TOKEN, ["admin"]),
    )


def _bearer(token: str) -> str:
    return f"Bearer {token}"


# --- tokens and hashes -------------------------------------------------------------------


def test_hash_token_is_the_hex_sha256_of_the_utf8_token():
    for token in ("abc", "é-token", new_token()):
        assert hash_token(token) == hashlib.sha256(token.encode("utf-8")).hexdigest()


def test_new_tokens_are_long_random_and_url_safe():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) >= 43
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


# --- parsing -----------------------------------------------------------------------------


def test_a_good_file_parses_to_principals_keyed_by_hash(tmp_path: Path):
    path = _standard(tmp_path / "auth.toml")
    principals = parse_auth_file(path)
    assert principals == {
        hash_token(READER_TOKEN): Principal("dashboard", frozenset({Role.READER})),
        hash_token(OPERATOR_TOKEN): Principal(
            "ci-deployer", frozenset({Role.OPERATOR, Role.READER})
        ),
        hash_token(ADMIN_TOKEN): Principal("root", frozenset({Role.ADMIN})),
    }


def test_uppercase_hex_and_quoted_dotted_names_are_accepted(tmp_path: Path):
    digest = hash_token("x").upper()
    path = _write(
        tmp_path / "auth.toml", f'[tokens."svc.v2_a-b"]\nsha256 = "{digest}"\nroles = ["reader"]\n'
    )
    assert parse_auth_file(path) == {
        digest.lower(): Principal("svc.v2_a-b", frozenset({Role.READER}))
    }


GOOD = f'sha256 = "{hash_token("t")}"\nroles = ["reader"]\n'


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[tokens.a]\nsha256 = "abc"\nroles = ["reader"]\n', ["tokens.a.sha256", "64 hex"]),
        (f'[tokens.a]\nsha256 = "{"g" * 64}"\nroles = ["reader"]\n', ["tokens.a.sha256"]),
        ('[tokens.a]\nsha256 = 12\nroles = ["reader"]\n', ["tokens.a.sha256"]),
        (f"[tokens.a]\n{GOOD}role = 'x'\n", ["unknown key tokens.a.role"]),
        (f'[tokens.a]\nsha256 = "{hash_token("t")}"\n', ["tokens.a.roles is missing"]),
        ("[tokens.a]\nroles = ['reader']\n", ["tokens.a.sha256 is missing"]),
        (
            f'[tokens.a]\nsha256 = "{hash_token("t")}"\nroles = ["reader", "superuser"]\n',
            ["tokens.a.roles", "'superuser'"],
        ),
        (f'[tokens.a]\nsha256 = "{hash_token("t")}"\nroles = []\n', ["tokens.a.roles"]),
        (f'[tokens.a]\nsha256 = "{hash_token("t")}"\nroles = "reader"\n', ["tokens.a.roles"]),
        (f"[tokens.a]\n{GOOD}\n[tokens.b]\n{GOOD}", ["tokens.b.sha256", "tokens.a.sha256"]),
        (f'[tokens."a b"]\n{GOOD}', ["tokens.'a b'", "[A-Za-z0-9_.-]+"]),
        (f"[tokens.a]\n{GOOD}\n[extra]\nx = 1\n", ["unknown key 'extra'"]),
        ("tokens = 3\n", ["tokens"]),
        ("tokens.a = 'x'\n", ["tokens.a must be a table"]),
        ("", ["no tokens"]),
        ("[tokens.a\n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_is_a_config_error_naming_file_and_key(
    tmp_path: Path, text: str, names: list[str]
):
    path = _write(tmp_path / "auth.toml", text)
    with pytest.raises(ConfigError) as caught:
        parse_auth_file(path)
    assert str(path) in caught.value.message
    for name in names:
        assert name in caught.value.message


def test_a_token_pasted_in_place_of_its_hash_is_not_echoed(tmp_path: Path):
    secret = new_token()
    path = _write(tmp_path / "auth.toml", f'[tokens.a]\nsha256 = "{secret}"\nroles = ["reader"]\n')
    with pytest.raises(ConfigError) as caught:
        parse_auth_file(path)
    assert "tokens.a.sha256" in caught.value.message
    assert secret not in caught.value.message


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        parse_auth_file(path)
    with pytest.raises(ConfigError, match=r"nowhere\.toml"):
        AuthFile(path)


# --- authentication ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Bearer " + OPERATOR_TOKEN,
        "bearer " + OPERATOR_TOKEN,
        "BEARER " + OPERATOR_TOKEN,
        "  Bearer   " + OPERATOR_TOKEN + "  ",
        "Bearer\t" + OPERATOR_TOKEN,
    ],
)
def test_a_known_bearer_token_authenticates(tmp_path: Path, header: str):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    assert auth.authenticate(header) == Principal(
        "ci-deployer", frozenset({Role.OPERATOR, Role.READER})
    )
    assert auth.tokens == 3


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (None, "no bearer token"),
        ("", "no bearer token"),
        ("   ", "no bearer token"),
        (OPERATOR_TOKEN, "Bearer scheme"),
        ("Basic " + OPERATOR_TOKEN, "Bearer scheme"),
        ("Bearer", "no token after 'Bearer'"),
        ("Bearer " + OPERATOR_TOKEN + " extra", "more than one word"),
        ("Bearer " + OPERATOR_TOKEN + "x", "unknown bearer token"),
        ("Bearer " + hash_token(OPERATOR_TOKEN), "unknown bearer token"),  # the hash is no key
    ],
)
def test_a_missing_malformed_or_unknown_token_is_unauthorized(
    tmp_path: Path, header: str | None, problem: str
):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    with pytest.raises(Unauthorized) as caught:
        auth.authenticate(header)
    assert problem in caught.value.message
    assert caught.value.status == 401
    assert OPERATOR_TOKEN not in caught.value.message
    assert "Authorization: Bearer <token>" in caught.value.message or problem.startswith("unk")


# --- roles -------------------------------------------------------------------------------


def test_principal_has_its_roles_and_admin_has_all():
    operator = Principal("op", frozenset({Role.OPERATOR, Role.READER}))
    assert operator.has(Role.OPERATOR)
    assert operator.has(Role.READER)
    assert not operator.has(Role.INFERENCE)
    assert not operator.has(Role.ADMIN)
    admin = Principal("root", frozenset({Role.ADMIN}))
    assert all(admin.has(role) for role in Role)


def test_authorize_passes_a_token_with_the_role(tmp_path: Path):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    principal = auth.authorize(_bearer(OPERATOR_TOKEN), Role.OPERATOR, "POST /load")
    assert principal.name == "ci-deployer"
    assert auth.authorize(_bearer(READER_TOKEN), Role.READER, "GET /v2").name == "dashboard"


@pytest.mark.parametrize("role", list(Role))
def test_admin_is_authorized_for_every_role(tmp_path: Path, role: Role):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    assert auth.authorize(_bearer(ADMIN_TOKEN), role, "anything").name == "root"


def test_a_missing_role_is_forbidden_naming_token_role_action_and_roles_held(tmp_path: Path):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    action = "POST /v2/models/iris/infer"
    with pytest.raises(Forbidden) as caught:
        auth.authorize(_bearer(OPERATOR_TOKEN), Role.INFERENCE, action)
    assert caught.value.status == 403
    assert caught.value.message == (
        f"token 'ci-deployer' lacks role 'inference' (needed for {action}); "
        "it has: reader, operator"
    )
    assert OPERATOR_TOKEN not in caught.value.message


def test_authorize_with_an_unknown_token_is_unauthorized_not_forbidden(tmp_path: Path):
    auth = AuthFile(_standard(tmp_path / "auth.toml"))
    with pytest.raises(Unauthorized):
        auth.authorize(_bearer("nope"), Role.READER, "GET /v2/health/ready")


# --- rotation ----------------------------------------------------------------------------


def test_a_rewritten_file_rotates_the_token_without_a_new_authfile(tmp_path: Path):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["inference"]))
    reloads: list[tuple[bool, str]] = []
    auth = AuthFile(path, check_interval=0, on_reload=lambda ok, d: reloads.append((ok, d)))
    assert auth.authenticate(_bearer("token-A")).name == "svc"
    assert reloads == []  # the first load is not a reload

    _write(path, _entry("svc", "token-B", ["inference"]) + _entry("x", "token-C", ["reader"]))
    with pytest.raises(Unauthorized):
        auth.authenticate(_bearer("token-A"))
    assert auth.authenticate(_bearer("token-B")).name == "svc"
    assert auth.tokens == 2
    assert reloads == [(True, "2 tokens")]


def test_a_file_renamed_over_the_old_one_is_picked_up(tmp_path: Path):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    auth = AuthFile(path, check_interval=0)
    staged = _write(tmp_path / "auth.toml.new", _entry("svc", "token-B", ["reader"]))
    staged.replace(path)
    assert auth.authenticate(_bearer("token-B")).name == "svc"


def test_the_file_is_not_looked_at_again_before_check_interval(tmp_path: Path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(auth_module.time, "monotonic", lambda: clock[0])
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    auth = AuthFile(path, check_interval=5.0)
    _write(path, _entry("svc", "token-B", ["reader"]))
    clock[0] += 4.9
    assert auth.authenticate(_bearer("token-A")).name == "svc"  # not checked yet
    clock[0] += 0.2
    assert auth.authenticate(_bearer("token-B")).name == "svc"
    with pytest.raises(Unauthorized):
        auth.authenticate(_bearer("token-A"))


def test_a_broken_rewrite_keeps_the_old_tokens_and_reports_once(tmp_path: Path, caplog):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    reloads: list[tuple[bool, str]] = []
    auth = AuthFile(path, check_interval=0, on_reload=lambda ok, d: reloads.append((ok, d)))
    _write(path, _entry("svc", "token-B", ["reader", "root"]))
    with caplog.at_level(logging.ERROR, logger="tidegate.auth"):
        assert auth.authenticate(_bearer("token-A")).name == "svc"
        assert auth.authenticate(_bearer("token-A")).name == "svc"
    with pytest.raises(Unauthorized):
        auth.authenticate(_bearer("token-B"))
    assert len(reloads) == 1
    ok, reason = reloads[0]
    assert not ok
    assert "tokens.svc.roles" in reason
    assert str(path) in reason
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "keeping the previous 1 tokens" in caplog.text

    _write(path, _entry("svc", "token-B", ["reader"]))  # fixed: now it takes
    assert auth.authenticate(_bearer("token-B")).name == "svc"
    assert reloads[-1] == (True, "1 tokens")


def test_a_deleted_file_keeps_the_old_tokens_until_it_returns(tmp_path: Path):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    reloads: list[tuple[bool, str]] = []
    auth = AuthFile(path, check_interval=0, on_reload=lambda ok, d: reloads.append((ok, d)))
    path.unlink()
    assert auth.authenticate(_bearer("token-A")).name == "svc"
    assert auth.tokens == 1
    assert reloads == [(False, reloads[0][1])]
    assert not reloads[0][0]
    assert "cannot read" in reloads[0][1]

    _write(path, _entry("svc", "token-B", ["reader"]))
    assert auth.authenticate(_bearer("token-B")).name == "svc"
    assert reloads[-1] == (True, "1 tokens")


def test_a_failing_on_reload_does_not_fail_the_request(tmp_path: Path, caplog):
    def explode(ok: bool, detail: str) -> None:
        raise RuntimeError("callback broke")

    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    auth = AuthFile(path, check_interval=0, on_reload=explode)
    _write(path, _entry("svc", "token-B", ["reader"]))
    with caplog.at_level(logging.ERROR, logger="tidegate.auth"):
        assert auth.authenticate(_bearer("token-B")).name == "svc"
    assert "on_reload callback failed" in caplog.text


def test_no_log_line_contains_a_token(tmp_path: Path, caplog):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    with caplog.at_level(logging.DEBUG, logger="tidegate"):
        auth = AuthFile(path, check_interval=0)
        _write(path, _entry("svc", "token-B", ["reader"]))
        auth.authenticate(_bearer("token-B"))
        _write(path, '[tokens.svc]\nsha256 = "token-C"\nroles = ["reader"]\n')
        for header in (_bearer("token-B"), _bearer("token-Z"), "token-Y"):
            try:
                auth.authenticate(header)
            except Unauthorized:
                pass
    assert caplog.records  # the reloads were logged
    for secret in ("token-A", "token-B", "token-C", "token-Y", "token-Z"):
        assert secret not in caplog.text


def test_threads_see_the_old_set_or_the_new_one_during_rotation(tmp_path: Path):
    path = _write(tmp_path / "auth.toml", _entry("svc", "token-A", ["reader"]))
    auth = AuthFile(path, check_interval=0)
    results: list[str] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        for _ in range(300):
            for token in ("token-A", "token-B"):
                try:
                    results.append(auth.authenticate(_bearer(token)).name)
                except Unauthorized:
                    pass
                except BaseException as exc:  # anything else is a bug
                    errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    _write(path, _entry("svc", "token-B", ["reader"]))
    for thread in threads:
        thread.join()
    assert errors == []
    assert auth.authenticate(_bearer("token-B")).name == "svc"
    with pytest.raises(Unauthorized):
        auth.authenticate(_bearer("token-A"))
    assert set(results) == {"svc"}
