"""Noise IK for Tailscale's control protocol (ts2021), responder and initiator.

`Noise_IK_25519_ChaChaPoly_BLAKE2s` with Tailscale's framing (facts §1.3):
the initiation is `u16be version | 0x01 | u16be 96 | e | enc(s) | tag`, the
response `0x02 | u16be 48 | e | tag`, records `0x04 | u16be len | ciphertext`
with a **big-endian** counter in the nonce. The core (`IKHandshake`) is plain
Noise with a prologue and payloads, so it can be checked against the public
Noise test vectors; the Tailscale wrappers only add the headers.
"""
from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

PROTOCOL_NAME = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE_PREFIX = b"Tailscale Control Protocol v"

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_ERROR = 3
MSG_RECORD = 4
INITIATION_LEN = 101  # 5 header + 32 e + 48 enc(s) + 16 tag
RESPONSE_LEN = 51  # 3 header + 32 e + 16 tag
MAX_FRAME = 4096  # whole record frame, header included
MAX_PLAINTEXT = MAX_FRAME - 3 - 16


class NoiseError(Exception):
    """A handshake or record that does not decrypt or parse; the connection is dropped."""


def _hash(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def _hkdf(ck: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """RFC 5869 with HMAC-BLAKE2s, salt = chaining key, empty info, two outputs."""
    prk = hmac.new(ck, ikm, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    return t1, t2


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw 32-byte private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_private() -> bytes:
    return X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # an all-zero shared secret: a low-order point
        raise NoiseError(f"bad public key: {e}") from None


class CipherState:
    """One direction of a session: ChaCha20-Poly1305 with a big-endian counter nonce."""

    def __init__(self, key: bytes, *, little_endian: bool = False) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._fmt = "<Q" if little_endian else ">Q"
        self.n = 0

    def _nonce(self) -> bytes:
        return bytes(4) + struct.pack(self._fmt, self.n)

    def encrypt(self, plaintext: bytes, ad: bytes | None = None) -> bytes:
        ct = self._aead.encrypt(self._nonce(), plaintext, ad)
        self.n += 1
        return ct

    def decrypt(self, ciphertext: bytes, ad: bytes | None = None) -> bytes:
        try:
            pt = self._aead.decrypt(self._nonce(), ciphertext, ad)
        except InvalidTag:
            raise NoiseError("record failed authentication") from None
        self.n += 1
        return pt


class IKHandshake:
    """Plain Noise IK (one side), with payloads: the part the test vectors check."""

    def __init__(self, *, initiator: bool, s: bytes, rs: bytes | None, prologue: bytes,
                 e: bytes | None = None) -> None:
        self.initiator = initiator
        self.s, self.rs = s, rs
        self.e = e if e is not None else generate_private()
        self.re: bytes | None = None
        self.h = _hash(PROTOCOL_NAME) if len(PROTOCOL_NAME) > 32 else PROTOCOL_NAME.ljust(32, b"\0")
        self.ck = self.h
        self.k: bytes | None = None
        self._mix_hash(prologue)
        responder_static = public_key(s) if not initiator else rs
        assert responder_static is not None
        self._mix_hash(responder_static)  # <- s

    def _mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h, data)

    def _mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm)

    def _encrypt_and_hash(self, pt: bytes) -> bytes:
        ct = pt if self.k is None else ChaCha20Poly1305(self.k).encrypt(bytes(12), pt, self.h)
        self._mix_hash(ct)
        return ct

    def _decrypt_and_hash(self, ct: bytes) -> bytes:
        if self.k is None:
            pt = ct
        else:
            try:
                pt = ChaCha20Poly1305(self.k).decrypt(bytes(12), ct, self.h)
            except InvalidTag:
                raise NoiseError("handshake failed authentication") from None
        self._mix_hash(ct)
        return pt

    # -> e, es, s, ss
    def write_message_1(self, payload: bytes = b"") -> bytes:
        assert self.rs is not None
        e_pub = public_key(self.e)
        self._mix_hash(e_pub)
        self._mix_key(_dh(self.e, self.rs))
        enc_s = self._encrypt_and_hash(public_key(self.s))
        self._mix_key(_dh(self.s, self.rs))
        return e_pub + enc_s + self._encrypt_and_hash(payload)

    def read_message_1(self, msg: bytes) -> bytes:
        if len(msg) < 32 + 48 + 16:
            raise NoiseError("initiation too short")
        self.re = msg[:32]
        self._mix_hash(self.re)
        self._mix_key(_dh(self.s, self.re))
        self.rs = self._decrypt_and_hash(msg[32:80])
        self._mix_key(_dh(self.s, self.rs))
        return self._decrypt_and_hash(msg[80:])

    # <- e, ee, se
    def write_message_2(self, payload: bytes = b"") -> bytes:
        assert self.re is not None and self.rs is not None
        e_pub = public_key(self.e)
        self._mix_hash(e_pub)
        self._mix_key(_dh(self.e, self.re))
        self._mix_key(_dh(self.e, self.rs))
        return e_pub + self._encrypt_and_hash(payload)

    def read_message_2(self, msg: bytes) -> bytes:
        if len(msg) < 32 + 16:
            raise NoiseError("response too short")
        self.re = msg[:32]
        self._mix_hash(self.re)
        self._mix_key(_dh(self.e, self.re))
        self._mix_key(_dh(self.s, self.re))
        return self._decrypt_and_hash(msg[32:])

    def split(self) -> tuple[bytes, bytes]:
        """(initiator→responder key, responder→initiator key)."""
        return _hkdf(self.ck, b"")


@dataclass
class Session:
    """What a finished handshake gives the server: who it is and how to talk."""

    version: int
    machine_key: bytes  # the client's static key
    rx: CipherState
    tx: CipherState
    handshake_hash: bytes


def prologue(version: int) -> bytes:
    return PROLOGUE_PREFIX + str(version).encode()


def respond(server_private: bytes, initiation: bytes, *,
            ephemeral: bytes | None = None) -> tuple[bytes, Session]:
    """Answer a 101-byte ts2021 initiation: (the 51-byte response, the session)."""
    if len(initiation) != INITIATION_LEN:
        raise NoiseError(f"initiation is {len(initiation)} bytes, want {INITIATION_LEN}")
    version, mtype, length = struct.unpack(">HBH", initiation[:5])
    if mtype != MSG_INITIATION or length != INITIATION_LEN - 5:
        raise NoiseError(f"not an initiation (type {mtype}, length {length})")
    hs = IKHandshake(initiator=False, s=server_private, rs=None, prologue=prologue(version), e=ephemeral)
    if hs.read_message_1(initiation[5:]):
        raise NoiseError("initiation carries a payload")
    body = hs.write_message_2()
    k1, k2 = hs.split()
    assert hs.rs is not None
    return (struct.pack(">BH", MSG_RESPONSE, len(body)) + body,
            Session(version, hs.rs, CipherState(k1), CipherState(k2), hs.h))


def initiate(client_private: bytes, server_public: bytes, version: int, *,
             ephemeral: bytes | None = None) -> tuple[bytes, IKHandshake]:
    """A client's 101-byte initiation (tests and the benchmark speak as a node with it)."""
    hs = IKHandshake(initiator=True, s=client_private, rs=server_public,
                     prologue=prologue(version), e=ephemeral)
    body = hs.write_message_1()
    return struct.pack(">HBH", version, MSG_INITIATION, len(body)) + body, hs


def finish(hs: IKHandshake, response: bytes, version: int) -> Session:
    """The client's side of the response: its session (tx = to server)."""
    if len(response) < 3:
        raise NoiseError("response too short")
    mtype, length = struct.unpack(">BH", response[:3])
    if mtype == MSG_ERROR:
        raise NoiseError("server error: " + response[3:3 + length].decode("utf-8", "replace"))
    if mtype != MSG_RESPONSE or length != RESPONSE_LEN - 3 or len(response) != RESPONSE_LEN:
        raise NoiseError(f"not a response (type {mtype}, length {length})")
    if hs.read_message_2(response[3:]):
        raise NoiseError("response carries a payload")
    k1, k2 = hs.split()
    return Session(version, public_key(hs.s), rx=CipherState(k2), tx=CipherState(k1), handshake_hash=hs.h)


def error_frame(text: str) -> bytes:
    data = text.encode()[:0xFFFF]
    return struct.pack(">BH", MSG_ERROR, len(data)) + data


def seal(cs: CipherState, data: bytes) -> bytes:
    """Encrypt a byte stream into record frames of at most 4096 bytes."""
    out = []
    for i in range(0, len(data), MAX_PLAINTEXT):
        ct = cs.encrypt(data[i:i + MAX_PLAINTEXT])
        out.append(struct.pack(">BH", MSG_RECORD, len(ct)) + ct)
    return b"".join(out)


def parse_record_header(header: bytes) -> int:
    """The ciphertext length (16..4093 bytes) a 3-byte record header announces, or NoiseError."""
    if len(header) != 3:
        raise NoiseError(f"record header of {len(header)} bytes, want 3")
    mtype, length = struct.unpack(">BH", header)
    if mtype != MSG_RECORD:
        raise NoiseError(f"unexpected message type {mtype} in session")
    if length + 3 > MAX_FRAME:
        raise NoiseError(f"record of {length + 3} bytes exceeds {MAX_FRAME}")
    if length < 16:
        raise NoiseError(f"record of {length} bytes is shorter than its tag")
    return length
