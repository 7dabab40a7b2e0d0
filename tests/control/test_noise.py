"""supervisor.control.noise: the plain Noise IK core against the public
cacophony test vector, then Tailscale's ts2021 framing around it."""
from __future__ import annotations

import struct

import pytest

from supervisor.control import noise
from supervisor.control.noise import (
    CipherState,
    IKHandshake,
    NoiseError,
    error_frame,
    finish,
    initiate,
    parse_record_header,
    public_key,
    respond,
    seal,
)

# --- Known-answer test --------------------------------------------------------
# The Noise_IK_25519_ChaChaPoly_BLAKE2s vector from the cacophony test vectors:
# repo haskell-cryptography/cacophony, path vectors/cacophony.txt
# (commit 8ee9d41e34a1a596cfa3ab12aa4069ff87dc1247). Copied verbatim.
# messages[0] -> (init), [1] <- (resp), then transport messages alternating
# init->resp / resp->init, each direction's nonce counting 0, 1, ...
KAT_PROLOGUE = bytes.fromhex("4a6f686e2047616c74")  # "John Galt"
KAT_INIT_STATIC = bytes.fromhex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1")
KAT_INIT_EPHEMERAL = bytes.fromhex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a")
KAT_INIT_REMOTE_STATIC = bytes.fromhex("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62")
KAT_RESP_STATIC = bytes.fromhex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893")
KAT_RESP_EPHEMERAL = bytes.fromhex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b")
KAT_HANDSHAKE_HASH = bytes.fromhex("48f3cb8bc9319da4ba1e9933991b1c4ed4034f1f126a76d3a1fbcfd7f94248d4")
KAT_MESSAGES = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in [
    ("4c756477696720766f6e204d69736573",
     "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79440b03ddc7aac5123d06a1b23b71670e32"
     "e76c28239a7ca4ac8f784de7e44c1adbfc6e83fef7352a58d9d56157400c0a737b1d171ce368229c7b752ac25b8faf4e"
     "ca690f6d896f543be02c996ab2b86b76"),
    ("4d757272617920526f746862617264",
     "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d9b5a8927f0ac9655ef76833bc7e5561"
     "f42e691ac8404efd6fbd6308b6a27c"),
    ("462e20412e20486179656b",
     "2c256ed08fcd08c2980f954ee4beaccb61c9581340f5dd2fd1cf3b"),
    ("4361726c204d656e676572",
     "d6033f70eee20945c7c9dba304e397ee3b284ff5e00fd9efb095d3"),
    ("4a65616e2d426170746973746520536179",
     "a9c068ca5d8babf72560652d8e851adbfac35c8a66e810d560863173e96adf4cfe"),
    ("457567656e2042f6686d20766f6e2042617765726b",
     "2a09d8f459e5927e40fdd2eddc99bdafb04e13a26f145cb5cfe9e6ba34c94331ebc17d5156"),
]]


def kat_handshake() -> tuple[IKHandshake, IKHandshake]:
    """Both sides of the vector's handshake, run to completion with checks."""
    init = IKHandshake(initiator=True, s=KAT_INIT_STATIC, rs=KAT_INIT_REMOTE_STATIC,
                       prologue=KAT_PROLOGUE, e=KAT_INIT_EPHEMERAL)
    resp = IKHandshake(initiator=False, s=KAT_RESP_STATIC, rs=None,
                       prologue=KAT_PROLOGUE, e=KAT_RESP_EPHEMERAL)
    (p0, c0), (p1, c1) = KAT_MESSAGES[:2]
    assert init.write_message_1(p0) == c0
    assert resp.read_message_1(c0) == p0
    assert resp.write_message_2(p1) == c1
    assert init.read_message_2(c1) == p1
    return init, resp


def test_kat_remote_static_is_responders_public_key():
    assert public_key(KAT_RESP_STATIC) == KAT_INIT_REMOTE_STATIC


def test_kat_handshake_messages_and_hash():
    init, resp = kat_handshake()
    assert init.h == resp.h == KAT_HANDSHAKE_HASH
    assert resp.rs == public_key(KAT_INIT_STATIC)  # the responder learned the initiator
    assert init.split() == resp.split()


def test_kat_first_transport_messages_nonce_zero():
    init, _ = kat_handshake()
    k1, k2 = init.split()
    (p2, c2), (p3, c3) = KAT_MESSAGES[2:4]
    # n = 0: all-zero counter bytes, so big- and little-endian agree.
    assert CipherState(k1).encrypt(p2) == c2
    assert CipherState(k2).encrypt(p3) == c3
    assert CipherState(k1).decrypt(c2) == p2
    assert CipherState(k2).decrypt(c3) == p3


@pytest.mark.parametrize("index, key_index", [(4, 0), (5, 1)])
def test_kat_later_transport_messages_little_vs_big_endian(index, key_index):
    init, _ = kat_handshake()
    key = init.split()[key_index]
    payload, expected = KAT_MESSAGES[index]
    # Standard Noise (little-endian counter) reproduces the vector at n = 1:
    # the key schedule is right.
    le = CipherState(key, little_endian=True)
    le.encrypt(KAT_MESSAGES[index - 2][0])
    assert le.n == 1
    assert le.encrypt(payload) == expected
    # Tailscale's big-endian counter gives a different nonce at n = 1.
    be = CipherState(key)
    be.encrypt(KAT_MESSAGES[index - 2][0])
    assert be.n == 1
    assert be.encrypt(payload) != expected
    be.n = 1
    with pytest.raises(NoiseError):
        be.decrypt(expected)


# --- ts2021 round trip --------------------------------------------------------

VERSION = 133


def handshake(version: int = VERSION):
    client, server = noise.generate_private(), noise.generate_private()
    init_msg, hs = initiate(client, public_key(server), version)
    response, server_session = respond(server, init_msg)
    client_session = finish(hs, response, version)
    return client, server, init_msg, response, server_session, client_session


def test_round_trip_lengths_version_and_machine_key():
    client, _, init_msg, response, ss, cs = handshake()
    assert len(init_msg) == noise.INITIATION_LEN == 101
    assert len(response) == noise.RESPONSE_LEN == 51
    assert struct.unpack(">HBH", init_msg[:5]) == (VERSION, 1, 96)
    assert response[:3] == b"\x02\x00\x30"
    assert ss.version == cs.version == VERSION
    assert ss.machine_key == cs.machine_key == public_key(client)
    assert ss.handshake_hash == cs.handshake_hash


def test_round_trip_records_both_ways():
    *_, ss, cs = handshake()
    to_server = seal(cs.tx, b"hello server")
    assert parse_record_header(to_server[:3]) == len(to_server) - 3
    assert ss.rx.decrypt(to_server[3:]) == b"hello server"
    to_client = seal(ss.tx, b"hello client")
    assert cs.rx.decrypt(to_client[3:]) == b"hello client"
    # Second records use n = 1 on each side.
    assert ss.rx.decrypt(seal(cs.tx, b"again")[3:]) == b"again"
    assert cs.rx.decrypt(seal(ss.tx, b"back")[3:]) == b"back"


def test_version_in_prologue_must_match():
    client, server = noise.generate_private(), noise.generate_private()
    init_msg, _ = initiate(client, public_key(server), VERSION)
    tampered = struct.pack(">H", VERSION + 1) + init_msg[2:]
    with pytest.raises(NoiseError, match="authentication"):
        respond(server, tampered)


def test_response_to_another_handshake_rejected():
    client, server = noise.generate_private(), noise.generate_private()
    _, hs = initiate(client, public_key(server), VERSION)
    other_msg, _ = initiate(client, public_key(server), VERSION)  # new ephemeral
    response, _ = respond(server, other_msg)
    with pytest.raises(NoiseError, match="authentication"):
        finish(hs, response, VERSION)


# --- bad input ----------------------------------------------------------------

@pytest.fixture
def initiation():
    client, server = noise.generate_private(), noise.generate_private()
    msg, _ = initiate(client, public_key(server), VERSION)
    return server, msg


@pytest.mark.parametrize("cut", [100, 102])
def test_initiation_wrong_length(initiation, cut):
    server, msg = initiation
    bad = msg[:cut] if cut < len(msg) else msg + b"\0" * (cut - len(msg))
    with pytest.raises(NoiseError, match=f"{cut} bytes"):
        respond(server, bad)


def test_initiation_wrong_type(initiation):
    server, msg = initiation
    with pytest.raises(NoiseError, match="not an initiation"):
        respond(server, msg[:2] + b"\x02" + msg[3:])


def test_initiation_wrong_length_field(initiation):
    server, msg = initiation
    with pytest.raises(NoiseError, match="not an initiation"):
        respond(server, msg[:3] + struct.pack(">H", 95) + msg[5:])


@pytest.mark.parametrize("pos", [5 + 32 + 5, 5 + 32 + 47, 100])  # enc(s), its tag, payload tag
def test_initiation_flipped_ciphertext_byte(initiation, pos):
    server, msg = initiation
    bad = bytearray(msg)
    bad[pos] ^= 0x01
    with pytest.raises(NoiseError, match="authentication"):
        respond(server, bytes(bad))


def test_initiation_for_another_server():
    client, server, other = (noise.generate_private() for _ in range(3))
    msg, _ = initiate(client, public_key(other), VERSION)
    with pytest.raises(NoiseError, match="authentication"):
        respond(server, msg)


def test_response_flipped_byte_rejected():
    client, server = noise.generate_private(), noise.generate_private()
    msg, hs = initiate(client, public_key(server), VERSION)
    response, _ = respond(server, msg)
    bad = bytearray(response)
    bad[-1] ^= 0x80
    with pytest.raises(NoiseError, match="authentication"):
        finish(hs, bytes(bad), VERSION)


def test_finish_on_error_frame():
    client, server = noise.generate_private(), noise.generate_private()
    _, hs = initiate(client, public_key(server), VERSION)
    frame = error_frame("nope")
    assert frame == b"\x03\x00\x04nope"
    with pytest.raises(NoiseError, match="nope"):
        finish(hs, frame, VERSION)


def test_parse_record_header():
    assert parse_record_header(b"\x04\x00\x10") == 16
    assert parse_record_header(struct.pack(">BH", 4, 4093)) == 4093
    with pytest.raises(NoiseError, match="type 3"):
        parse_record_header(b"\x03\x00\x10")
    with pytest.raises(NoiseError, match="exceeds"):
        parse_record_header(struct.pack(">BH", 4, 4094))
    with pytest.raises(NoiseError, match="shorter than its tag"):
        parse_record_header(b"\x04\x00\x0f")


def test_tampered_record_rejected():
    *_, ss, cs = handshake()
    rec = bytearray(seal(cs.tx, b"payload"))
    rec[5] ^= 0x01
    with pytest.raises(NoiseError, match="authentication"):
        ss.rx.decrypt(bytes(rec[3:]))


def test_replayed_record_rejected():
    *_, ss, cs = handshake()
    rec = seal(cs.tx, b"once")
    assert ss.rx.decrypt(rec[3:]) == b"once"
    assert ss.rx.n == 1
    with pytest.raises(NoiseError):
        ss.rx.decrypt(rec[3:])


def test_seal_splits_large_data_into_frames():
    *_, ss, cs = handshake()
    data = bytes(i % 251 for i in range(10000))
    stream = seal(cs.tx, data)
    out, pos, frames = b"", 0, 0
    while pos < len(stream):
        n = parse_record_header(stream[pos:pos + 3])
        assert n + 3 <= noise.MAX_FRAME
        out += ss.rx.decrypt(stream[pos + 3:pos + 3 + n])
        pos += 3 + n
        frames += 1
    assert pos == len(stream)
    assert frames == 3  # 4077 + 4077 + 1846
    assert out == data


# --- Tailscale-format regression ---------------------------------------------
# Fixed keys; expected bytes were generated once by running this module after
# the cacophony known-answer tests above passed (so the Noise core is proven),
# and pin the ts2021 framing and prologue ("Tailscale Control Protocol v133").
REG_CLIENT_STATIC = bytes(range(32))
REG_CLIENT_EPHEMERAL = bytes(range(32, 64))
REG_SERVER_STATIC = bytes(range(64, 96))
REG_SERVER_EPHEMERAL = bytes(range(96, 128))
REG_INITIATION = bytes.fromhex(
    "0085010060358072d6365880d1aeea329adf9121383851ed21a28e3b75e965d0d2cd166254ad5b8febedeb97415be536"
    "12205e6bfab385e34cb127dd8854c4f9afb10f9b0eebeb923b31523974e7e6af8c4b653546c09aef9d4746f03785992d"
    "702804d0ea")
REG_RESPONSE = bytes.fromhex(
    "020030675dd574ed7789310b3d2e7681f3790b466c773b1521fecf36577958371ea52ff3ef91ec4238707a9100cc915e"
    "d54df8")


def test_ts2021_regression_bytes():
    init_msg, hs = initiate(REG_CLIENT_STATIC, public_key(REG_SERVER_STATIC), VERSION,
                            ephemeral=REG_CLIENT_EPHEMERAL)
    assert init_msg.hex() == REG_INITIATION.hex()
    response, ss = respond(REG_SERVER_STATIC, init_msg, ephemeral=REG_SERVER_EPHEMERAL)
    assert response.hex() == REG_RESPONSE.hex()
    cs = finish(hs, response, VERSION)
    assert ss.machine_key == public_key(REG_CLIENT_STATIC)
    assert ss.rx.decrypt(seal(cs.tx, b"x")[3:]) == b"x"
