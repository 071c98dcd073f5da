"""The fast paths of HTML text, links and URL hosts give exactly what the plain regexes give."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.rules.htmltext import collapse_spaces, html_to_text, link_targets, url_domain

HREF = re.compile(r"""\b(?:href|src)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""", re.IGNORECASE)
SPACES = re.compile(r"[ \t\r\f\v]+")


def reference_links(markup: str) -> list[str]:
    return [a or b or c for a, b, c in HREF.findall(markup)]


def reference_domain(url: str) -> str:
    target = url if "://" in url else "http://" + url
    try:
        host = urlsplit(target).hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".").lower()


@pytest.mark.parametrize(
    "markup",
    [
        "<a href=x>",
        "<A HREF='Mixed.Case/Path'>",
        'xhref=a src="b"',
        "hReF = c  SRC\t=\n'd'",
        'src="a href=b" href=c',
        "éhref=a _src=b 1src=c -src=d",
        "\u017frc=long-s href=b",
        "\u0130 href=a src=b",
        'href= src=""',
        "href",
        "",
    ],
)
def test_link_targets_are_those_of_the_regex(markup: str) -> None:
    assert link_targets(markup) == reference_links(markup)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "href",
                "HREF",
                "src",
                "Src",
                "=",
                " ",
                "\t",
                '"',
                "'",
                ">",
                "<a ",
                "x",
                "é",
                "_",
                "\u017f",
                "\u0130",
            ]
        ),
        max_size=40,
    )
)
def test_generated_markup_gives_the_regex_links(pieces: list[str]) -> None:
    markup = "".join(pieces)
    assert link_targets(markup) == reference_links(markup)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from(" \t\r\f\v\nab\u00a0"), max_size=60))
def test_collapse_spaces_is_the_regex_substitution(text: str) -> None:
    assert collapse_spaces(text) == SPACES.sub(" ", text)


@pytest.mark.parametrize(
    "url",
    [
        "https://Shop.Example.com/x",
        "HTTP://a.b.",
        "hTtPs://A.B?q#f",
        "www.Example.org/p?q",
        "ftp://x.y#f",
        "https://u@h.com/",
        "https://[::1]/",
        "https://[bad/",
        "https://h.com:80/",
        "https://h%41.com",
        "http://",
        "https://a b.com/",
        "https://\u00e9.com/",
        "https://\u212a.com/",
        "www.x.com/a://b",
        "http://h.com\t/x",
        "http://h.com/\x7f",
        "mailto://x",
    ],
)
def test_url_domain_is_the_urlsplit_host(url: str) -> None:
    assert url_domain(url) == reference_domain(url)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["http://", "HTTPS://", "ftp://", "www.", "gopher://", ""]),
    st.text(st.sampled_from("aZ.-@:[]%/?#\t \u00e9\u017f1"), max_size=20),
)
def test_generated_urls_give_the_urlsplit_host(prefix: str, rest: str) -> None:
    assert url_domain(prefix + rest) == reference_domain(prefix + rest)


def test_html_text_collapses_spaces_and_keeps_links() -> None:
    text, links = html_to_text("<p>a  \t b</p>\n<a HREF=\"https://x.example/1\">x</a> <img src='y.gif'>")
    assert text == " a b \n x "
    assert links == ["https://x.example/1", "y.gif"]
