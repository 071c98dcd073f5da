"""The milter codec byte by byte: whole packets out of any split of the input; bad packets raise."""

from __future__ import annotations

import struct

import pytest
from miltertest import codec as reference
from miltertest import constants as c

from smtpproxy.milter import codec
from smtpproxy.milter.codec import Decoder, MilterProtocolError

# One session as an MTA sends it, encoded by the independent miltertest package.
SESSION = b"".join(
    [
        reference.encode_optneg(c.SMFI_V6_ACTS, c.SMFI_V6_PROT),
        reference.encode_msg(
            c.SMFIC_MACRO, cmdcode=c.SMFIC_CONNECT, nameval=["j", "mx.example", "{client_addr}", "192.0.2.1"]
        ),
        reference.encode_msg(
            c.SMFIC_CONNECT, hostname="client.example", family="4", port=4567, address="192.0.2.1"
        ),
        reference.encode_msg(c.SMFIC_HELO, helo="client.example"),
        reference.encode_msg(c.SMFIC_MAIL, args=["<a@sender.example>", "BODY=8BITMIME"]),
        reference.encode_msg(c.SMFIC_RCPT, args=["<user@example.org>"]),
        reference.encode_msg(c.SMFIC_HEADER, name="Subject", value=" hi\n there"),
        reference.encode_msg(c.SMFIC_EOH),
        reference.encode_msg(c.SMFIC_BODY, buf="line\r\n" * 1000),
        reference.encode_msg(c.SMFIC_BODYEOB),
        codec.packet("U", b"XYZZY\0"),  # miltertest does not know SMFIC_UNKNOWN
        reference.encode_msg(c.SMFIC_ABORT),
        reference.encode_msg(c.SMFIC_QUIT),
    ]
)

EXPECTED = [
    codec.OptNeg(6, c.SMFI_V6_ACTS, c.SMFI_V6_PROT),
    codec.Macros("C", {"j": "mx.example", "client_addr": "192.0.2.1"}),
    codec.Connect("client.example", "4", 4567, "192.0.2.1"),
    codec.Helo("client.example"),
    codec.Mail("<a@sender.example>", ("BODY=8BITMIME",)),
    codec.Rcpt("<user@example.org>", ()),
    codec.Header(b"Subject", b" hi\n there"),
    codec.Simple("N"),
    codec.Body(b"line\r\n" * 1000),
    codec.EndOfMessage(b""),
    codec.Unknown("XYZZY"),
    codec.Simple("A"),
    codec.Simple("Q"),
]


@pytest.mark.parametrize("size", [1, 3, 16, 4096, len(SESSION)])
def test_any_split_gives_the_same_commands(size: int) -> None:
    decoder = Decoder()
    got: list[codec.Command] = []
    for start in range(0, len(SESSION), size):
        decoder.feed(SESSION[start : start + size])
        got += list(decoder.commands())
    assert got == EXPECTED
    assert decoder.pending == 0


def test_a_packet_waits_for_its_last_byte() -> None:
    decoder = Decoder()
    decoder.feed(SESSION[:-1])
    assert list(decoder.commands()) == EXPECTED[:-1]
    assert decoder.pending == 4  # the length of QUIT, without its command byte
    decoder.feed(SESSION[-1:])
    assert list(decoder.commands()) == [codec.Simple("Q")]


def test_oversized_packet_is_refused_from_its_length_alone() -> None:
    decoder = Decoder()
    decoder.feed(struct.pack(">I", codec.MAX_PACKET + 1) + b"B")
    with pytest.raises(MilterProtocolError) as err:
        list(decoder.commands())
    assert err.value.kind == "oversized"


@pytest.mark.parametrize(
    ("packet", "kind"),
    [
        (struct.pack(">I", 0), "malformed"),
        (codec.packet("O", b"\0\0\0\6"), "malformed"),
        (codec.packet("H", b"no terminating nul"), "malformed"),
        (codec.packet("C", b"host\0X\0\0addr\0"), "malformed"),
        (codec.packet("C", b"host\0"), "malformed"),
        (codec.packet("L", b"Subject\0"), "malformed"),
        (codec.packet("D", b"Cj\0"), "malformed"),
        (codec.packet("Z"), "unknown"),
    ],
)
def test_malformed_packets_raise_with_a_kind(packet: bytes, kind: str) -> None:
    decoder = Decoder()
    decoder.feed(packet)
    with pytest.raises(MilterProtocolError) as err:
        list(decoder.commands())
    assert err.value.kind == kind


def test_connect_of_unknown_family_and_ipv6() -> None:
    assert codec.decode("C", b"localhost\0U") == codec.Connect("localhost", "U", 0, "")
    data = reference.encode_msg(
        c.SMFIC_CONNECT, hostname="h", family="6", port=25, address="IPv6:2001:db8::1"
    )
    decoder = Decoder()
    decoder.feed(data)
    assert list(decoder.commands()) == [codec.Connect("h", "6", 25, "IPv6:2001:db8::1")]


def test_replies_decode_with_the_independent_codec() -> None:
    data = b"".join(
        [
            codec.encode_optneg(0x21, 0x80),  # miltertest cannot read macro lists (tested below)
            codec.encode_replycode(["550-5.7.1 first", "550 5.7.1 second"]),
            codec.encode_insert_header(0, "Authentication-Results", " mx; spf=pass"),
            codec.encode_change_header(2, "Authentication-Results", ""),
            codec.encode_add_header("Subject", " [SPAM]"),
            codec.encode_quarantine("rule exe"),
            codec.ACCEPT,
            codec.CONTINUE,
            codec.PROGRESS,
        ]
    )
    out = []
    while data:
        cmd, fields, data = reference.decode_msg(data)
        out.append((cmd, fields))
    assert out[0][0] == c.SMFIC_OPTNEG and out[0][1]["actions"] == 0x21 and out[0][1]["protocol"] == 0x80
    assert out[1][0] == c.SMFIR_REPLYCODE
    assert out[1][1]["smtpcode"] == "550" and "second" in str(out[1][1]["text"])
    assert out[2][0] == c.SMFIR_INSHEADER and out[2][1]["index"] == 0
    assert out[3][0] == c.SMFIR_CHGHEADER and out[3][1]["index"] == 2 and out[3][1]["value"] == ""
    assert [o[0] for o in out[4:]] == ["h", "q", "a", "c", "p"]


def test_optneg_carries_the_macro_lists() -> None:
    data = codec.encode_optneg(0x100, 0, {codec.Stage.MAIL: "i {mail_addr}"})
    assert data[5:17] == struct.pack(">III", 6, 0x100, 0)
    assert data[17:] == struct.pack(">I", 2) + b"i {mail_addr}\0"
