"""WeComCrypto against the simulator's independent implementation, and every failure mode."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from qywx_ray.errors import CryptoError
from qywx_ray.testing.wecomsim import sim_decrypt, sim_encrypt, sim_sign
from qywx_ray.wecom.crypto import (
    BadBase64Error,
    BadKeyError,
    BadLengthError,
    BadPaddingError,
    BadSignatureError,
    ReceiveIdMismatchError,
    WeComCrypto,
)

TOKEN = "QDG6eK"
AES_KEY = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C"
CORP = "wx5823bf96d3bd56c7"
RAND16 = bytes(range(16))


@pytest.fixture
def crypto() -> WeComCrypto:
    return WeComCrypto(TOKEN, AES_KEY, CORP)


def _raw_encrypt(plain: bytes, key_b64: str = AES_KEY) -> str:
    """AES-CBC of already padded bytes (to craft malformed plaintexts)."""
    key = base64.b64decode(key_b64 + "=")
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(plain) + enc.finalize()).decode()


def test_signature_matches_independent_implementation(crypto: WeComCrypto) -> None:
    enc = sim_encrypt(AES_KEY, CORP, "hello", RAND16)
    assert crypto.signature("1409659813", "1372623149", enc) == sim_sign(
        TOKEN, "1409659813", "1372623149", enc
    )
    crypto.verify(sim_sign(TOKEN, "1", "2", enc), "1", "2", enc)


def test_encrypt_is_byte_identical_to_simulator_with_same_random(crypto: WeComCrypto) -> None:
    text = "<xml><Content><![CDATA[你好, WeCom]]></Content></xml>"
    assert crypto.encrypt(text, random16=RAND16) == sim_encrypt(AES_KEY, CORP, text, RAND16)


def test_ciphertext_is_padded_to_32_byte_blocks(crypto: WeComCrypto) -> None:
    for n in range(0, 70):
        raw = base64.b64decode(crypto.encrypt("a" * n, random16=RAND16))
        assert len(raw) % 32 == 0
        # a plaintext already a multiple of 32 gets a whole extra block of padding
        assert len(raw) >= 16 + 4 + n + len(CORP) + 1


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=3000), rand=st.binary(min_size=16, max_size=16))
def test_property_roundtrip_both_directions(text: str, rand: bytes) -> None:
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    ours = crypto.encrypt(text, random16=rand)
    assert sim_decrypt(AES_KEY, ours) == (text, CORP)
    assert crypto.decrypt(sim_encrypt(AES_KEY, CORP, text, rand)) == text


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=5000)
)
def test_property_chinese_messages_of_any_length(text: str) -> None:
    crypto = WeComCrypto(TOKEN, AES_KEY, CORP)
    enc = crypto.encrypt(text)
    assert crypto.decrypt(enc) == text
    assert crypto.signature("1", "2", enc) == sim_sign(TOKEN, "1", "2", enc)


def test_random_prefix_makes_ciphertexts_differ(crypto: WeComCrypto) -> None:
    assert crypto.encrypt("same") != crypto.encrypt("same")


def test_bad_signature(crypto: WeComCrypto) -> None:
    enc = crypto.encrypt("x")
    good = crypto.signature("1", "2", enc)
    with pytest.raises(BadSignatureError):
        crypto.verify(good[:-1] + ("0" if good[-1] != "0" else "1"), "1", "2", enc)
    with pytest.raises(BadSignatureError):
        crypto.verify(good, "1", "3", enc)  # nonce changed
    with pytest.raises(BadSignatureError):
        crypto.verify("", "1", "2", enc)
    other = WeComCrypto("other-token", AES_KEY, CORP)
    with pytest.raises(BadSignatureError):
        other.verify(good, "1", "2", enc)


def test_bad_base64(crypto: WeComCrypto) -> None:
    with pytest.raises(BadBase64Error, match="base64"):
        crypto.decrypt("not base64 !!!")
    with pytest.raises(BadBase64Error, match="multiple of 16"):
        crypto.decrypt(base64.b64encode(b"x" * 20).decode())
    with pytest.raises(BadBase64Error):
        crypto.decrypt("")


@pytest.mark.parametrize("pad", [0, 33, 200])
def test_bad_padding_value(crypto: WeComCrypto, pad: int) -> None:
    body = RAND16 + struct.pack(">I", 1) + b"a" + CORP.encode()
    body += b"\x00" * (-(len(body) + 1) % 32)
    with pytest.raises(BadPaddingError, match="padding"):
        crypto.decrypt(_raw_encrypt(body + bytes([pad])))


def test_inconsistent_padding_bytes(crypto: WeComCrypto) -> None:
    body = RAND16 + struct.pack(">I", 1) + b"a" + CORP.encode()  # 39 bytes → 25 of padding
    fill = 32 - len(body) % 32
    assert fill == 25
    with pytest.raises(BadPaddingError):
        crypto.decrypt(_raw_encrypt(body + b"\x07" + bytes([fill]) * (fill - 1)))


def test_wrong_key_is_detected(crypto: WeComCrypto) -> None:
    other_key = "A" * 43
    enc = sim_encrypt(other_key, CORP, "secret text", RAND16)
    with pytest.raises(CryptoError):
        crypto.decrypt(enc)


def _padded(plain: bytes) -> bytes:
    n = 32 - len(plain) % 32
    return plain + bytes([n]) * n


def test_length_out_of_range(crypto: WeComCrypto) -> None:
    plain = RAND16 + struct.pack(">I", 10_000) + b"short" + CORP.encode()
    with pytest.raises(BadLengthError, match="length"):
        crypto.decrypt(_raw_encrypt(_padded(plain)))
    with pytest.raises(BadLengthError):
        crypto.decrypt(_raw_encrypt(_padded(RAND16[:10])))  # shorter than the header


def test_wrong_receive_id(crypto: WeComCrypto) -> None:
    enc = sim_encrypt(AES_KEY, "wwSOMEOTHERCORP", "hello", RAND16)
    with pytest.raises(ReceiveIdMismatchError, match="CorpID"):
        crypto.decrypt(enc)


@pytest.mark.parametrize("key", ["", "a" * 42, "a" * 44, "!" * 43])
def test_key_of_wrong_length_or_alphabet(key: str) -> None:
    with pytest.raises(BadKeyError, match="EncodingAESKey"):
        WeComCrypto(TOKEN, key, CORP)


def test_errors_are_distinct_crypto_errors_and_never_show_secrets(crypto: WeComCrypto) -> None:
    kinds = {BadSignatureError, BadBase64Error, BadPaddingError, BadLengthError}
    kinds |= {ReceiveIdMismatchError, BadKeyError}
    assert all(issubclass(k, CryptoError) for k in kinds)
    assert len(kinds) == 6
    with pytest.raises(BadKeyError) as bad_key:
        WeComCrypto(TOKEN, AES_KEY[:-1], CORP)
    assert AES_KEY[:-1] not in str(bad_key.value)
    assert TOKEN not in repr(crypto)
    assert AES_KEY not in repr(crypto)
