"""RFC 3461 parameters as the policy core judges them: xtext, values, which command, once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.policy import dsn
from smtpproxy.server import split_dsn


@pytest.mark.parametrize("value", ["abc", "Env+2BId.42", "+2B+3D", "a!b~c", "x" * 100])
def test_valid_xtext_envid_is_accepted(value: str) -> None:
    assert dsn.check_mail((f"ENVID={value}",), offered=True) == (None, True)


@pytest.mark.parametrize("value", ["a+b", "a=b", "a+2b", "a+2", "caf\u00e9", "x" * 101])
def test_bad_envid_is_501_5_5_4(value: str) -> None:
    refusal, given = dsn.check_mail((f"ENVID={value}",), offered=True)
    assert given and refusal is not None
    assert (refusal.code, refusal.enhanced) == (501, "5.5.4") and "ENVID" in refusal.text


@pytest.mark.parametrize(
    "params",
    [
        ("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;user@example.org"),
        ("notify=never",),
        ("NOTIFY=DELAY",),
        ("ORCPT=utf-8;User+2Bx@Example.org",),
    ],
)
def test_valid_rcpt_parameters(params: tuple[str, ...]) -> None:
    assert dsn.check_rcpt(params, offered=True) == (None, True)


@pytest.mark.parametrize(
    ("params", "word"),
    [
        (("NOTIFY=NEVER,SUCCESS",), "NOTIFY"),
        (("NOTIFY=SOMETIMES",), "NOTIFY"),
        (("NOTIFY=SUCCESS,SUCCESS",), "NOTIFY"),
        (("ORCPT=user@example.org",), "ORCPT"),
        (("ORCPT=rfc822;a b",), "ORCPT"),
        (("ORCPT=rfc822;a+b@example.org",), "ORCPT"),
        (("ORCPT=rfc822;",), "ORCPT"),
        (("NOTIFY=SUCCESS", "NOTIFY=FAILURE"), "twice"),
        (("NOTIFY",), "value"),
    ],
)
def test_bad_rcpt_parameters_are_501_5_5_4(params: tuple[str, ...], word: str) -> None:
    refusal, _ = dsn.check_rcpt(params, offered=True)
    assert refusal is not None and (refusal.code, refusal.enhanced) == (501, "5.5.4")
    assert word in refusal.text


def test_ret_values_and_wrong_command() -> None:
    assert dsn.check_mail(("RET=hdrs",), offered=True) == (None, True)
    bad, _ = dsn.check_mail(("RET=BODY",), offered=True)
    assert bad is not None and bad.code == 501
    wrong, _ = dsn.check_rcpt(("RET=FULL",), offered=True)
    assert wrong is not None and (wrong.code, wrong.enhanced) == (555, "5.5.4") and "MAIL FROM" in wrong.text
    wrong, _ = dsn.check_mail(("NOTIFY=NEVER",), offered=True)
    assert wrong is not None and wrong.code == 555 and "RCPT TO" in wrong.text


def test_not_offered_is_refused_with_the_reason_and_other_params_are_not_looked_at() -> None:
    refusal, given = dsn.check_rcpt(("NOTIFY=SUCCESS",), offered=False)
    assert given and refusal is not None and (refusal.code, refusal.enhanced) == (555, "5.5.4")
    assert "offers no DSN" in refusal.text
    assert dsn.check_mail(("BODY=8BITMIME", "SIZE=10"), offered=False) == (None, False)


def test_decode_xtext() -> None:
    assert dsn.decode_xtext("User+2Bx+3D@Example.org") == "User+x=@Example.org"


def test_dsn_parameters_are_set_aside_in_their_own_case() -> None:
    rest, aside = split_dsn("SIZE=10 notify=Success ORCPT=rfc822;User@Example.org BODY=8BITMIME")
    assert rest == "SIZE=10 BODY=8BITMIME"
    assert aside == ["notify=Success", "ORCPT=rfc822;User@Example.org"]
    assert split_dsn("SIZE=10") == ("SIZE=10", [])
    assert split_dsn("") == ("", []) and split_dsn(None) == (None, [])


@settings(max_examples=500, deadline=None)
@given(
    name=st.sampled_from(["RET", "ENVID", "NOTIFY", "ORCPT", "notify", "Orcpt", "SIZE"]),
    value=st.text(max_size=120),
    offered=st.booleans(),
)
def test_any_parameter_value_gets_a_reply_or_passes_never_an_exception(
    name: str, value: str, offered: bool
) -> None:
    for check in (dsn.check_mail, dsn.check_rcpt):
        refusal, given = check((f"{name}={value}",), offered=offered)
        assert given == (name.upper() in dsn.KEYWORDS)
        if refusal is not None:
            assert refusal.code in (501, 555) and refusal.enhanced == "5.5.4"
        elif given:
            assert offered and (dsn.is_xtext(value) or name.upper() in ("RET", "NOTIFY"))
